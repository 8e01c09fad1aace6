"""How far int8 outputs agree with fp32 ones: the figures and their minimums.

Decides what "agrees" means per kind of model (``FIGURES``), measured on
held-out photos of the job (``measure_agreement``): for a classifier the
share of photos whose top-1 label is the same (``top1_agreement``) and the
mean share of fp32's top-5 labels among int8's top-5 (``top5_overlap``);
for an embedder the mean and the 1st percentile of the cosine similarity
between the two embeddings of a photo (``mean_cosine``, ``p1_cosine``) and
the share of photos whose nearest neighbour among the other held-out photos
(by cosine) is the same photo in both (``nn_agreement``).  Also how one
sample of photos splits into calibration and held-out parts
(``split_sample``), and the default minimums.  Pure numpy: no model, no
file; ``quantize.decide_int8`` applies them.

Default minimums (``DEFAULT_MINIMUMS``): published post-training int8
results for ImageNet CNNs lose 0.1 to 2 points of top-1 accuracy
(per-channel MobileNetV2 the most), which is a few percent of labels
changing; a table that people read as "the species" should change at most
about one label in fifty, hence 0.98 top-1 agreement (one disagreement in
the 64 held-out photos passes, two fail) and 0.95 top-5 overlap.  For
embeddings a mean cosine of 0.995 keeps a photo's embedding within about
0.1 radians of its fp32 one on average, 0.98 at the 1st percentile bounds
the worst photos, and 0.9 nearest-neighbour agreement lets near-ties among
unrelated photos swap while catching a quantization that reorders the
space.  The held-out sample is small: each figure moves in steps of about
1/64; ``--agreement_photos`` buys precision with start-up time.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from natvision.transforms import models as models_lib

TOP1_AGREEMENT = "top1_agreement"
TOP5_OVERLAP = "top5_overlap"
MEAN_COSINE = "mean_cosine"
P1_COSINE = "p1_cosine"
NN_AGREEMENT = "nn_agreement"

# The figures measured per kind of model, in the order they are reported.
FIGURES: Dict[str, Tuple[str, ...]] = {
    models_lib.CLASSIFIER: (TOP1_AGREEMENT, TOP5_OVERLAP),
    models_lib.EMBEDDER: (MEAN_COSINE, P1_COSINE, NN_AGREEMENT),
}
DEFAULT_MINIMUMS: Dict[str, float] = {
    TOP1_AGREEMENT: 0.98,
    TOP5_OVERLAP: 0.95,
    MEAN_COSINE: 0.995,
    P1_COSINE: 0.98,
    NN_AGREEMENT: 0.9,
}

@dataclasses.dataclass(frozen=True)
class Agreement:
  """How int8 agreed with fp32 on the job's held-out photos.

  Attributes:
    figures: figure name -> value (see ``measure_agreement``).
    minimums: the ``--min_agreement`` of each figure.
    held_out: photos the figures were measured on.
    calibration: photos the quantization was calibrated on.
  """

  figures: Mapping[str, float]
  minimums: Mapping[str, float]
  held_out: int
  calibration: int

  def below(self) -> List[str]:
    """The figures below their minimum, in reporting order."""
    return [k for k, v in self.figures.items()
            if not v >= self.minimums.get(k, 0.0)]

  def summary(self) -> str:
    values = ", ".join(f"{k} {v:.4f}" for k, v in self.figures.items())
    return (f"{values} on {self.held_out} held-out photos (calibrated on "
            f"{self.calibration})")

  def as_dict(self) -> dict:
    return {"figures": dict(self.figures), "minimums": dict(self.minimums),
            "held_out": self.held_out, "calibration": self.calibration}


def classifier_figures(fp32: np.ndarray, int8: np.ndarray,
                       k: int = 5) -> Dict[str, float]:
  """Top-1 agreement and top-k overlap of two ``[n, classes]`` score arrays.

  Returns:
    ``top1_agreement``: share of rows whose highest-scoring class is the
    same; ``top5_overlap``: mean over rows of |top-k of fp32 ∩ top-k of
    int8| / k (k at most the number of classes).
  """
  fp32 = np.asarray(fp32, np.float64)
  int8 = np.asarray(int8, np.float64)
  k = min(k, fp32.shape[1])
  top1 = float(np.mean(np.argmax(fp32, axis=1) == np.argmax(int8, axis=1)))
  best_fp32 = np.argsort(-fp32, axis=1, kind="stable")[:, :k]
  best_int8 = np.argsort(-int8, axis=1, kind="stable")[:, :k]
  overlap = [len(set(a) & set(b)) / k for a, b in zip(best_fp32, best_int8)]
  return {TOP1_AGREEMENT: top1, TOP5_OVERLAP: float(np.mean(overlap))}


def embedder_figures(fp32: np.ndarray, int8: np.ndarray) -> Dict[str, float]:
  """Cosine agreement of two ``[n, width]`` embedding arrays, n >= 2.

  Returns:
    ``mean_cosine`` and ``p1_cosine`` (numpy's linear 1st percentile) of
    the cosine similarity between row i of each; ``nn_agreement``: share
    of rows whose nearest other row by cosine is the same in both.
  """
  fp32 = np.asarray(fp32, np.float64)
  int8 = np.asarray(int8, np.float64)
  unit_fp32 = fp32 / np.maximum(np.linalg.norm(fp32, axis=1, keepdims=True),
                                1e-12)
  unit_int8 = int8 / np.maximum(np.linalg.norm(int8, axis=1, keepdims=True),
                                1e-12)
  cosines = np.sum(unit_fp32 * unit_int8, axis=1)

  def nearest(unit):
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argmax(similarity, axis=1)

  same_neighbour = nearest(unit_fp32) == nearest(unit_int8)
  return {MEAN_COSINE: float(np.mean(cosines)),
          P1_COSINE: float(np.percentile(cosines, 1)),
          NN_AGREEMENT: float(np.mean(same_neighbour))}


def measure_agreement(kind: str, fp32: np.ndarray,
                      int8: np.ndarray) -> Dict[str, float]:
  """The figures of ``FIGURES[kind]`` for one model's outputs on photos."""
  if kind == models_lib.CLASSIFIER:
    return classifier_figures(fp32, int8)
  return embedder_figures(fp32, int8)


def split_sample(photos: Sequence[np.ndarray], calibration_photos: int,
                 agreement_photos: int
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """Calibration and held-out photos from one sample, disjoint.

  With enough photos, the first ``calibration_photos`` calibrate and the
  next ``agreement_photos`` are held out; with fewer, they are split in
  the same proportion, the held-out part getting at least 2.

  Args:
    photos: prepared uint8 ``[size, size, 3]`` arrays.

  Returns:
    (calibration, held_out): uint8 ``[n, size, size, 3]`` arrays.

  Raises:
    ModelError: fewer than 3 photos (one to calibrate, two to compare).
  """
  n = len(photos)
  if n < 3:
    raise models_lib.ModelError(
        f"--precision int8 needs at least 3 readable photos of the job (one "
        f"to calibrate, two to check); found {n}")
  wanted = calibration_photos + agreement_photos
  if n >= wanted:
    calibration = calibration_photos
  else:
    calibration = min(n - 2, max(1, round(n * calibration_photos / wanted)))
  held = min(n - calibration, agreement_photos)
  stacked = np.stack([np.asarray(p, np.uint8) for p in photos])
  return stacked[:calibration], stacked[calibration:calibration + held]
