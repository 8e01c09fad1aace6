"""Sinks: explicit schemas, Arrow conversion, and the commit of a run."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import commit, models, sinks
from natvision.transforms.records import (EmbeddingResult, ErrorRecord, ImageRef,
                                PredictionResult)
from natvision.transforms.runtimes import RuntimeDecision

IRV2, FUNGI = models.resolve_models(["inception_resnet_v2", "fungi_mobile_v1"],
                                    "/m")
CARRIED = (("site", pa.string()), ("lat", pa.float64()))


def _ref(i):
  return ImageRef(image_id=f"id{i}", uri=f"/p/{i}.jpg",
                  extra=(("site", f"s{i}"), ("lat", i / 2)))


def _sizes(i):
  # A 4032x3024 photo decoded at 1/8 scale, a different one per row.
  return {"source_width": 4032 + i, "source_height": 3024,
          "decoded_width": 504, "decoded_height": 378 - i}


def test_embeddings_table_has_fixed_width_and_metadata():
  decision = RuntimeDecision("onnx", note="ONNX Runtime; max difference 1e-06")
  schema = sinks.embeddings_schema(IRV2.with_decision(decision), CARRIED)
  rows = [EmbeddingResult(_ref(i), "inception_resnet_v2",
                          np.full(1536, i, np.float32), **_sizes(i))
          for i in range(3)]
  table = sinks.results_to_table(rows, schema, CARRIED)
  assert table.schema.field("embedding").type == pa.list_(pa.float32(), 1536)
  assert table.column("embedding")[2].values.to_numpy().tolist() == [2.0] * 1536
  assert table.column("lat").to_pylist() == [0.0, 0.5, 1.0]
  meta = json.loads(table.schema.metadata[sinks.METADATA_KEY])
  assert meta["model"]["name"] == "inception_resnet_v2"
  assert meta["model"]["path"] == "/m/inception_resnet_v2"
  assert meta["runtime"] == "onnx" and meta["version"]
  assert meta["model"]["runtime"] == "onnx"
  assert meta["model"]["runtime_note"] == decision.note
  assert meta["color_profile"] == "ignore"


def test_size_columns_come_before_the_carried_ones_and_hold_the_sizes():
  for schema in (sinks.embeddings_schema(IRV2, CARRIED),
                 sinks.predictions_schema(FUNGI, CARRIED)):
    names = schema.names
    assert names[-6:] == list(sinks.SIZE_COLUMNS) + ["site", "lat"]
    for name in sinks.SIZE_COLUMNS:
      assert schema.field(name).type == pa.int32()
      assert not schema.field(name).nullable
  rows = [EmbeddingResult(_ref(i), "inception_resnet_v2",
                          np.zeros(1536, np.float32), **_sizes(i))
          for i in range(2)]
  table = sinks.results_to_table(
      rows, sinks.embeddings_schema(IRV2, CARRIED), CARRIED)
  assert table.select(list(sinks.SIZE_COLUMNS)).to_pylist() == [
      {"source_width": 4032, "source_height": 3024, "decoded_width": 504,
       "decoded_height": 378},
      {"source_width": 4033, "source_height": 3024, "decoded_width": 504,
       "decoded_height": 377}]


def test_color_profile_is_recorded_in_every_tables_metadata():
  for schema in (sinks.embeddings_schema(IRV2, CARRIED, "srgb"),
                 sinks.predictions_schema(FUNGI, CARRIED, "srgb"),
                 sinks.schema_for(IRV2, CARRIED, "srgb"),
                 sinks.errors_schema(CARRIED, [IRV2], "srgb")):
    meta = json.loads(schema.metadata[sinks.METADATA_KEY])
    assert meta["color_profile"] == "srgb"


def test_predictions_table_types():
  schema = sinks.predictions_schema(FUNGI, CARRIED)
  row = PredictionResult(_ref(1), "fungi_mobile_v1",
                         np.array([7, 3], np.int32),
                         np.array([0.6, 0.3], np.float32), ("a", "b"),
                         **_sizes(1))
  table = sinks.results_to_table([row], schema, CARRIED)
  got = table.to_pylist()[0]
  assert (got["label_id"], got["label"], got["top_k_labels"]) == (7, "a",
                                                                 ["a", "b"])
  assert got["score"] == pytest.approx(0.6)
  assert (got["source_width"], got["decoded_height"]) == (4033, 377)
  assert table.schema.field("label_id").type == pa.int32()
  assert table.schema.field("top_k_scores").type == pa.list_(pa.float32())


def test_errors_table_allows_null_model():
  schema = sinks.errors_schema(CARRIED, [IRV2])
  table = sinks.errors_to_table(
      [ErrorRecord(_ref(1), "decode", "truncated"),
       ErrorRecord(_ref(2), "inference", "oom", model="inception_resnet_v2")],
      schema, CARRIED)
  assert table.column("model").to_pylist() == [None, "inception_resnet_v2"]
  assert table.column("site").to_pylist() == ["s1", "s2"]


def _stage(root, run_id, names_per_table):
  staging = commit.staging_dir(root, run_id)
  specs = []
  for name, files in names_per_table.items():
    staged = os.path.join(staging, name)
    final = os.path.join(root, name)
    schema = pa.schema([("image_id", pa.string())])
    os.makedirs(staged, exist_ok=True)
    for f in files:
      pq.write_table(pa.table({"image_id": [f"{run_id}/{f}"]}, schema=schema),
                     os.path.join(staged, f))
    specs.append(commit.TableSpec(name, staged, final, schema))
  return specs, staging


def test_commit_replaces_previous_run_and_fills_empty_tables(tmp_path):
  root = str(tmp_path)
  specs, staging = _stage(root, "r1", {"a": ["part-00000-of-00002.parquet",
                                             "part-00001-of-00002.parquet"],
                                       "b": []})
  commit.commit_tables(specs, staging)
  assert commit.count_rows(os.path.join(root, "a")) == 2
  assert commit.count_rows(os.path.join(root, "b")) == 0
  assert os.listdir(os.path.join(root, "b")) == ["part-00000-of-00001.parquet"]
  specs, staging = _stage(root, "r2", {"a": ["part-00000-of-00001.parquet"],
                                       "b": []})
  commit.commit_tables(specs, staging)
  table = pq.read_table(os.path.join(root, "a"))
  assert table.column("image_id").to_pylist() == [
      "r2/part-00000-of-00001.parquet"]
  assert not os.path.exists(os.path.join(root, "_staging"))


def test_commit_retried_after_failing_part_way_loses_nothing(tmp_path,
                                                            monkeypatch):
  root = str(tmp_path)
  specs, staging = _stage(root, "r1", {"a": ["part-00000-of-00001.parquet"],
                                       "b": ["part-00000-of-00001.parquet"]})
  real_rename = FileSystems.rename
  calls = []

  def rename_then_die(sources, targets):
    calls.append(sources)
    if len(calls) == 2:
      raise IOError("worker lost")
    return real_rename(sources, targets)

  monkeypatch.setattr(FileSystems, "rename", rename_then_die)
  with pytest.raises(IOError):
    commit.commit_tables(specs, staging)
  monkeypatch.setattr(FileSystems, "rename", real_rename)
  commit.commit_tables(specs, staging)  # the runner retries the step
  for name in ("a", "b"):
    assert pq.read_table(os.path.join(root, name)).column(
        "image_id").to_pylist() == ["r1/part-00000-of-00001.parquet"], name


def test_failed_listing_fails_the_commit_and_keeps_previous_rows(
    tmp_path, monkeypatch):
  """A storage error while listing staged files is not "no files"."""
  from apache_beam.io.filesystem import BeamIOError
  from natvision.transforms import storage
  root = str(tmp_path)
  specs, staging = _stage(root, "r1", {"a": ["part-00000-of-00001.parquet"]})
  commit.commit_tables(specs, staging)
  specs, staging = _stage(root, "r2", {"a": ["part-00000-of-00002.parquet",
                                             "part-00001-of-00002.parquet"]})
  real_match = FileSystems.match

  def forbidden(patterns, limits=None):
    raise BeamIOError("Match operation failed",
                      {patterns[0]: IOError("403 Forbidden")})

  monkeypatch.setattr(FileSystems, "match", forbidden)
  with pytest.raises(storage.StorageError, match="403 Forbidden") as err:
    commit.commit_tables(specs, staging)
  assert staging in str(err.value)
  monkeypatch.setattr(FileSystems, "match", real_match)
  assert pq.read_table(os.path.join(root, "a")).column(
      "image_id").to_pylist() == ["r1/part-00000-of-00001.parquet"]
  commit.commit_tables(specs, staging)  # the clean rerun of the step
  assert sorted(pq.read_table(os.path.join(root, "a")).column(
      "image_id").to_pylist()) == ["r2/part-00000-of-00002.parquet",
                                   "r2/part-00001-of-00002.parquet"]


def test_listing_a_missing_folder_is_empty_not_an_error(tmp_path):
  from natvision.transforms import storage
  assert storage.match(str(tmp_path / "nowhere" / "*.parquet")) == []
  assert commit.list_parquet(str(tmp_path / "nowhere")) == []
  assert storage.exists(str(tmp_path / "nowhere")) is False
