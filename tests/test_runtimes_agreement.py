"""transforms/runtimes/agreement.py: the int8-vs-fp32 figures, the split.

Each figure is checked against an independent computation (plain loops,
sorted lists) on random arrays; the split against the photos it was given.
"""

import numpy as np
import pytest

from natvision.transforms import models as models_lib
from natvision.transforms import runtimes
from natvision.transforms.runtimes import agreement


def _top_k_set(row, k):
  return set(sorted(range(len(row)), key=lambda j: (-row[j], j))[:k])


def test_classifier_figures_equal_a_direct_count():
  rng = np.random.default_rng(1)
  fp32 = rng.random((40, 30))
  int8 = fp32 + rng.normal(0, 0.05, fp32.shape)
  figures = agreement.classifier_figures(fp32, int8)
  same = sum(int(np.argmax(a) == np.argmax(b)) for a, b in zip(fp32, int8))
  overlap = sum(len(_top_k_set(a, 5) & _top_k_set(b, 5)) / 5
                for a, b in zip(fp32, int8))
  assert figures["top1_agreement"] == pytest.approx(same / 40)
  assert figures["top5_overlap"] == pytest.approx(overlap / 40)
  assert 0 < figures["top1_agreement"] < 1  # the noise moved some
  assert agreement.classifier_figures(fp32, fp32) == {
      "top1_agreement": 1.0, "top5_overlap": 1.0}


def test_embedder_figures_equal_a_direct_computation():
  rng = np.random.default_rng(2)
  fp32 = rng.normal(size=(25, 16))
  int8 = fp32 + rng.normal(0, 0.3, fp32.shape)
  figures = agreement.embedder_figures(fp32, int8)
  cosines = sorted(
      float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
      for a, b in zip(fp32, int8))
  # Linear interpolation at rank 0.01 * (n - 1), as numpy's percentile.
  rank = 0.01 * (len(cosines) - 1)
  low = int(rank)
  p1 = cosines[low] + (rank - low) * (cosines[low + 1] - cosines[low])

  def nearest(vectors, i):
    def cos(j):
      return vectors[i] @ vectors[j] / (np.linalg.norm(vectors[i])
                                        * np.linalg.norm(vectors[j]))
    return max((j for j in range(len(vectors)) if j != i), key=cos)

  same = sum(nearest(fp32, i) == nearest(int8, i) for i in range(25))
  assert figures["mean_cosine"] == pytest.approx(np.mean(cosines))
  assert figures["p1_cosine"] == pytest.approx(p1)
  assert figures["nn_agreement"] == pytest.approx(same / 25)
  assert 0 < figures["nn_agreement"] < 1


def test_the_sample_splits_into_disjoint_parts():
  photos = list(runtimes.probe_batch(299, 12))
  calibration, held = agreement.split_sample(photos, 4, 6)
  assert len(calibration) == 4 and len(held) == 6
  np.testing.assert_array_equal(calibration, np.stack(photos[:4]))
  np.testing.assert_array_equal(held, np.stack(photos[4:10]))
  calibration, held = agreement.split_sample(photos[:6], 32, 64)
  assert (len(calibration), len(held)) == (2, 4)  # the same proportion
  with pytest.raises(models_lib.ModelError, match="at least 3"):
    agreement.split_sample(photos[:2], 32, 64)


