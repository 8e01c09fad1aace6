"""Inference stage: top-k, batching, per-photo failure isolation, load count.

These tests swap in a small fake runtime behind the ``runtimes.Runtime``
interface so that they run in milliseconds; the pipeline tests use real TF
stand-ins.  Loads are read from the stage's Beam counter.
"""

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from natvision.transforms import inference
from natvision.transforms import models as models_lib
from natvision.transforms import runtimes
from natvision.transforms.records import ImageRef, PreparedImage

ON_TF = runtimes.RuntimeDecision("tf", note="TensorFlow, as --runtime tf asked")


def test_top_k_sorted_descending_with_stable_ties():
  scores = np.array([[0.1, 0.5, 0.2, 0.5, 0.0],
                     [0.9, 0.0, 0.05, 0.03, 0.02]], np.float32)
  ids, values = inference.top_k(scores, 3)
  assert ids.tolist() == [[1, 3, 2], [0, 2, 3]]
  np.testing.assert_array_equal(
      values, np.array([[0.5, 0.5, 0.2], [0.9, 0.05, 0.03]], np.float32))
  assert ids.dtype == np.int32 and values.dtype == np.float32


def test_top_k_matches_full_sort_on_random_scores():
  rng = np.random.default_rng(0)
  scores = rng.random((7, 4128), dtype=np.float32)
  ids, values = inference.top_k(scores, 5)
  expected = np.argsort(-scores, axis=1, kind="stable")[:, :5]
  np.testing.assert_array_equal(ids, expected)
  assert (np.diff(values, axis=1) <= 0).all()


class _FakeRuntime:
  """Mean of the red channel, repeated; fails on photos whose pixels are 13."""

  name = "tf"

  def __init__(self, resolved):
    self.resolved = resolved
    self.width = resolved.spec.output_width
    self.loaded = False

  def load(self):
    self.loaded = True

  def predict(self, batch):
    if not self.loaded:
      raise RuntimeError("predict before load")
    if (batch == 13).all(axis=(1, 2, 3)).any():
      raise ValueError("poisoned pixels")
    means = batch[..., 0].astype(np.float32).mean(axis=(1, 2)) / 255.0
    return np.repeat(means[:, None], self.width, axis=1)

  def describe(self):
    return {"runtime": "fake"}


def _photo(i, value):
  ref = ImageRef(image_id=f"id{i}", uri=f"mem://{i}.jpg")
  return PreparedImage(ref=ref, arrays={"squash": np.full((4, 4, 3), value,
                                                          np.uint8)},
                       source_width=40 + i, source_height=30,
                       decoded_width=4, decoded_height=3)


def test_fake_runtime_implements_the_interface():
  resolved = models_lib.resolve_models(["inception_resnet_v2"], "/models")[0]
  assert isinstance(_FakeRuntime(resolved), runtimes.Runtime)


def test_run_model_isolates_failing_photo_and_loads_once():
  resolved = models_lib.resolve_models(["inception_resnet_v2"], "/models")[0]
  config = inference.InferenceConfig(resolved.with_decision(ON_TF),
                                     batch_size=3)
  photos = [_photo(i, 255 if i % 2 else 0) for i in range(7)]
  photos.append(_photo(99, 13))
  p = TestPipeline()
  out = (p | beam.Create(photos)
         | inference.RunModel(config, make_runtime=_FakeRuntime))
  rows = (out.results | beam.FlatMap(lambda batch: batch)
          | beam.Map(lambda r: (r.ref.image_id, float(r.embedding[0]),
                                r.embedding.shape[0], r.source_width,
                                r.source_height, r.decoded_width,
                                r.decoded_height)))
  errors = out.errors | beam.Map(lambda e: (e.ref.image_id, e.stage,
                                            e.model, "poisoned" in e.error))
  assert_that(rows, equal_to([(f"id{i}", 1.0 if i % 2 else 0.0, 1536,
                               40 + i, 30, 4, 3)
                              for i in range(7)]), label="rows")
  assert_that(errors, equal_to([("id99", "inference", "inception_resnet_v2",
                                 True)]), label="errors")
  result = p.run()
  result.wait_until_finish()
  loads = {c.key.metric.name: c.committed for c in
           result.metrics().query()["counters"]
           if c.key.metric.name.startswith("model_loads_")}
  assert loads == {"model_loads_inception_resnet_v2": 1}


def test_top_k_larger_than_classes_is_refused():
  resolved = models_lib.resolve_models(["fungi_mobile_v1"], "/m")[0]
  with pytest.raises(ValueError, match="top_k"):
    inference.InferenceConfig(resolved.with_decision(ON_TF), top_k=5000)
  with pytest.raises(ValueError, match="top_k"):
    inference.check_settings(resolved, batch_size=4, top_k=5000)


def test_a_model_without_a_runtime_decision_is_refused():
  resolved = models_lib.resolve_models(["fungi_mobile_v1"], "/m",
                                       requested_runtime="onnx")[0]
  with pytest.raises(ValueError, match="no runtime decision.*check_models"):
    inference.InferenceConfig(resolved)
  with pytest.raises(ValueError, match="no runtime decision"):
    inference.load_shared(resolved)
