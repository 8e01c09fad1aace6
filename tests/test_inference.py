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


# --------------------------------------------------------------------------
# --prior: the prior-adjusted top-k beside the image-only one.


def test_prior_answers_sit_beside_unchanged_image_only_results(tmp_path):
  import dataclasses  # pylint: disable=import-outside-toplevel
  import h3  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from natvision.transforms import prior, sinks, taxonomy  # pylint: disable=import-outside-toplevel
  resolved = models_lib.resolve_models(["fungi_mobile_v1"], "/m")[0]
  width = resolved.spec.output_width
  # Epithets of letters alone ("aa", "ab", ...): digits end a name.
  labels = ["Genus " + "".join(chr(97 + (i // 26 ** k) % 26)
                               for k in (2, 1, 0)) for i in range(width)]
  # Labels 0..3999 are taxa 1000+i; the rest match nothing.
  taxa = taxonomy.Taxa(kind=taxonomy.INATURALIST,
                       rank={1000 + i: "species" for i in range(4000)},
                       name={1000 + i: labels[i] for i in range(4000)},
                       ancestry={1000 + i: () for i in range(4000)})
  label_taxa = taxonomy.match_labels(labels, taxa)
  cell = h3.latlng_to_cell(55.68, 12.57, 4)
  # Two observations at (0, 0), photo c's place: under the minimum of 10.
  counts = {(1003, cell): 40, (1007, cell): 9,
            (1003, h3.latlng_to_cell(0.0, 0.0, 4)): 2}
  path = str(tmp_path / "prior.parquet")
  rows = sorted(counts.items())
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  pq.write_table(pa.Table.from_pydict(
      {"taxon_id": [t for (t, _), _ in rows], "h3_cell": [c for (_, c), _ in
                                                          rows],
       "n": [n for _, n in rows]}, schema=prior.prior_schema(
           {"resolution": 4})), path)
  alpha = 1.0
  settings = prior.settings_for(path, alpha, 10, label_taxa.label_taxon)
  plain_model = dataclasses.replace(resolved.with_decision(ON_TF),
                                    label_taxa=label_taxa)
  prior_model = dataclasses.replace(plain_model, prior=settings)
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, width))
  outputs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
             ).astype(np.float32)
  refs = [ImageRef("a", "mem://a", extra=(("decimalLatitude", "55.68"),
                                          ("decimalLongitude", "12.57"))),
          ImageRef("b", "mem://b"),
          ImageRef("c", "mem://c", extra=(("latitude", 0.0),
                                          ("longitude", 0.0)))]
  items = [PreparedImage(ref=r, arrays={}, source_width=1, source_height=1,
                         decoded_width=1, decoded_height=1) for r in refs]

  def results(model):
    fn = inference.RunModelFn(inference.InferenceConfig(model, top_k=5),
                              shared_handle=None)
    rollup = taxonomy.RollUp(label_taxa)
    lookup = (prior.PriorLookup(model.prior, label_taxa.label_taxon)
              if model.prior is not None else None)
    fn._held = inference._SharedModel(None, labels, rollup, lookup)  # pylint: disable=protected-access
    return fn._results(items, outputs)  # pylint: disable=protected-access

  plain, adjusted = results(plain_model), results(prior_model)
  for a, b in zip(plain, adjusted):
    assert a.prior is None and b.prior is not None
    np.testing.assert_array_equal(a.label_ids, b.label_ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert (a.labels, a.taxon_ids, a.rollup) == (b.labels, b.taxon_ids,
                                                 b.rollup)
  # Photo a: the formula, computed here over all 4128 labels.
  n_cell = np.zeros(width)
  n_cell[3], n_cell[7] = 40, 9
  n_all = n_cell.copy()
  n_all[3] += 2
  q = (outputs[0].astype(float) * (n_cell + alpha) / (49 + alpha * width)
       / ((n_all + alpha) / (51 + alpha * width)))
  q /= q.sum()
  want = np.argsort(-q, kind="stable")[:5]
  got = adjusted[0].prior
  assert got.applied and got.reason is None and got.h3_cell == cell
  assert got.cell_observations == 49
  assert got.label_ids.tolist() == want.tolist()
  np.testing.assert_allclose(got.scores, q[want], rtol=0, atol=1e-6)
  assert got.labels == tuple(labels[j] for j in want)
  assert got.taxon_ids == tuple(label_taxa.label_taxon[j] for j in want)
  # The image's top-1 label was not observed near a.
  top1 = int(plain[0].label_ids[0])
  assert got.expected_nearby is (top1 in (3, 7) if top1 < 4000 else None)
  # b has no coordinates, c too few observations: image scores, and why.
  for answer, reason, result in ((adjusted[1].prior, prior.NO_COORDINATES,
                                  plain[1]),
                                 (adjusted[2].prior, prior.FEW_OBSERVATIONS,
                                  plain[2])):
    assert not answer.applied and answer.reason == reason
    np.testing.assert_array_equal(answer.label_ids, result.label_ids)
    np.testing.assert_array_equal(answer.scores, result.scores)
  assert adjusted[1].prior.h3_cell is None
  assert adjusted[1].prior.expected_nearby is None
  assert adjusted[2].prior.cell_observations == 2
  # The tables: the image-only columns are equal, the prior ones follow.
  plain_table = sinks.results_to_table(plain, sinks.schema_for(plain_model))
  prior_table = sinks.results_to_table(adjusted,
                                       sinks.schema_for(prior_model))
  assert [n for n in prior_table.column_names
          if n not in sinks.PRIOR_COLUMNS] == plain_table.column_names
  for name in plain_table.column_names:
    assert prior_table.column(name).equals(plain_table.column(name)), name
  assert prior_table.column("prior_applied").to_pylist() == [True, False,
                                                             False]
  assert prior_table.column("prior_reason").to_pylist() == [
      None, prior.NO_COORDINATES, prior.FEW_OBSERVATIONS]
  assert prior_table.column("prior_top_k_label_ids").to_pylist()[0] == (
      want.tolist())
