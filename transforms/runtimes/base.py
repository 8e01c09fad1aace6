"""The interface every runtime implements, and the decision that picks one.

A runtime is what turns a batch of prepared photos into model outputs:
TensorFlow (the reference) or ONNX Runtime (the same graph, converted).  Its
shape follows Beam's ``ModelHandler``: the object is small and picklable
until ``load()`` brings the model into memory, once per worker process;
``predict`` then maps a uint8 batch ``[n, size, size, 3]`` to float32
``[n, width]``; ``describe()`` says what was loaded, for logs.

The launcher (``transforms.runtimes.chooser``) decides once which runtime
each model runs on and records why in a ``RuntimeDecision``; the decision
travels with the model (``ResolvedModel.decision``) so that every worker
runs the runtime the launcher checked, and the tables record it.

Also here: the fixed probe batch on which runtimes are compared, the
comparison itself, and the tolerance per kind of model.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Literal, Optional, Protocol, runtime_checkable

import numpy as np

from transforms import models as models_lib

RUNTIME_AUTO = "auto"
RUNTIME_TF = "tf"
RUNTIME_ONNX = "onnx"

# What --runtime may ask for, and what a decision may hold.
Requested = Literal["auto", "tf", "onnx"]
Decided = Literal["tf", "onnx"]
REQUESTS = models_lib.RUNTIME_REQUESTS
DECIDED = (RUNTIME_TF, RUNTIME_ONNX)

# Largest difference accepted between ONNX Runtime's and TensorFlow's outputs
# on the probe batch, as ``max|onnx - tf| / max(1, max|tf|)``: an absolute
# difference for outputs up to 1 (probabilities), relative to the largest
# output for larger embeddings.  Both runtimes compute in float32; they differ
# only in the order of the sums inside convolutions and in fused ops.  On the
# full-size stand-ins (probe batch and 7 real photos) the observed values were
# at most 1.3e-6 for the 4128-way softmax and 2.8e-6 for the embeddings
# (Inception-ResNet-V2's features reach 18, its absolute difference 1.7e-5),
# see benchmarks/RESULTS.md; these tolerances leave a margin of about 35x
# while still catching a real mistake (other weights, another
# preprocessing), which shows up at 1e-2 or more.
TOLERANCES: Dict[str, float] = {
    models_lib.EMBEDDER: 1e-4,
    models_lib.CLASSIFIER: 5e-5,
}

PROBE_SIZE = 4


@runtime_checkable
class Runtime(Protocol):
  """One model on one runtime.

  Attributes:
    name: ``tf`` or ``onnx``.
    resolved: the model.
  """

  name: str
  resolved: models_lib.ResolvedModel

  def load(self) -> None:
    """Brings the model into memory; a second call does nothing.

    Raises:
      ModelError: the model cannot be loaded (or, for ONNX, converted or
        checked against TensorFlow).
    """

  def predict(self, batch: np.ndarray) -> np.ndarray:
    """Runs one batch.

    Args:
      batch: uint8 ``[n, size, size, 3]`` (scaled to [0, 1] inside), or a
        float batch already in [0, 1].

    Returns:
      float32 ``[n, width]``.
    """

  def describe(self) -> dict:
    """A JSON-friendly summary of what was loaded, for logs."""


@dataclasses.dataclass(frozen=True)
class RuntimeDecision:
  """Which runtime a model runs on, decided once by the launcher, and why.

  Attributes:
    runtime: ``tf`` or ``onnx``, the runtime whose outputs go to the tables.
    note: one line on why, recorded in table metadata and run.json.
    max_diff: ``max|out - tf| / max(1, max|tf|)`` of the chosen runtime on
      the probe batch; 0.0 for ``tf`` (the reference itself).
    tolerance: the tolerance of the model's kind; None when ONNX was not
      tried.
    onnx_max_diff: the ONNX difference measured, also when ONNX was not
      chosen; None when ONNX never ran.
    onnx_path: the ONNX file the launcher checked; None when none.
    onnx_source: where that file came from: ``staged``, ``cached`` or
      ``converted``.
    fingerprint: the fingerprint of the model files that file was checked
      against (``transforms.runtimes.onnx.model_fingerprint``).
    tf_seconds, onnx_seconds: best time of one probe batch per runtime;
      None when not timed.
    fallback: why ``auto`` did not pick ONNX; None when it did, or when
      ONNX was not asked for.
  """

  runtime: Decided
  note: str
  max_diff: float = 0.0
  tolerance: Optional[float] = None
  onnx_max_diff: Optional[float] = None
  onnx_path: Optional[str] = None
  onnx_source: Optional[str] = None
  fingerprint: Optional[str] = None
  tf_seconds: Optional[float] = None
  onnx_seconds: Optional[float] = None
  fallback: Optional[str] = None

  def __post_init__(self):
    if self.runtime not in DECIDED:
      raise ValueError(
          f"a runtime decision names tf or onnx, not {self.runtime!r} "
          f"(auto is a request, decided by transforms.runtimes.chooser)")

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def probe_batch(size: int = 299, n: int = PROBE_SIZE) -> np.ndarray:
  """A fixed uint8 batch ``[n, size, size, 3]`` for comparing runtimes.

  Image ``i`` cycles through: seeded uniform noise (every pixel value, high
  frequencies); smooth colour ramps; smooth random colour patches (bilinear
  upsampling of a seeded 6x6 image, like out-of-focus backgrounds); and
  sinusoidal stripes.  The same arguments always give the same bytes.
  """
  rng = np.random.default_rng(20240601)
  ramp = np.linspace(0.0, 1.0, size, dtype=np.float64)
  yy, xx = np.meshgrid(ramp, ramp, indexing="ij")
  images = []
  for i in range(n):
    kind = i % 4
    if kind == 0:
      image = rng.integers(0, 256, (size, size, 3)).astype(np.float64)
    elif kind == 1:
      image = 255.0 * np.stack([xx, yy, (xx + yy) / 2], axis=-1)
    elif kind == 2:
      coarse = rng.integers(0, 256, (6, 6, 3)).astype(np.float64)
      pos = ramp * 5
      lo = np.minimum(pos.astype(int), 4)
      frac = (pos - lo)[:, None]
      rows = (coarse[lo] * (1 - frac[..., None]) +
              coarse[lo + 1] * frac[..., None])
      image = (rows[:, lo] * (1 - frac[None, :, :]) +
               rows[:, lo + 1] * frac[None, :, :])
    else:
      image = 127.5 + 127.5 * np.stack([
          np.sin(2 * np.pi * (3 * xx + 2 * yy)),
          np.sin(2 * np.pi * 7 * yy),
          np.cos(2 * np.pi * 11 * xx * yy)], axis=-1)
    images.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
  return np.stack(images)


def output_difference(out: np.ndarray, reference: np.ndarray) -> float:
  """``max|out - reference| / max(1, max|reference|)``, as in TOLERANCES.

  Args:
    out: float ``[n, width]`` of the runtime under test.
    reference: float ``[n, width]`` of TensorFlow.

  Returns:
    The scaled difference; infinity when the shapes differ or ``out`` is not
    finite.
  """
  out = np.asarray(out, np.float64)
  reference = np.asarray(reference, np.float64)
  if out.shape != reference.shape:
    return float("inf")
  if not np.isfinite(out).all():
    return float("inf")
  scale = max(1.0, float(np.abs(reference).max(initial=0.0)))
  return float(np.abs(out - reference).max(initial=0.0)) / scale
