"""tools/tables.py: reading the committed tables of an output folder.

An output folder is laid out here by hand, with plain and partitioned
files, staging folders and markers that are no table files: the listing
keeps exactly the table files, sorted; reading adds ``snapshot_date`` for
partitioned files and nulls for columns some files lack; a model that is
not there is named along with those that are.
"""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from natvision.tools import tables
from natvision.transforms import sinks


def _write(path, ids, extra=None, metadata=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  columns = {"image_id": pa.array(ids, pa.string())}
  columns.update(extra or {})
  table = pa.table(columns)
  if metadata is not None:
    table = table.replace_schema_metadata(
        {sinks.METADATA_KEY: json.dumps(metadata)})
  pq.write_table(table, path)
  return path


@pytest.fixture
def out(tmp_path):
  """embeddings/emb: one plain file and two partitions, plus non-table
  files; predictions/cls: one plain file; errors: one partition."""
  root = tmp_path / "out"
  emb = root / "embeddings" / "emb"
  _write(str(emb / "part-1.parquet"), ["a"], metadata={"model": {"v": 1}})
  _write(str(emb / "snapshot_date=2024-01-14" / "part-0.parquet"), ["c"],
         {"site": pa.array(["x"])})
  _write(str(emb / "snapshot_date=2024-01-07" / "part-0.parquet"), ["b"])
  _write(str(emb / "_staging" / "part-9.parquet"), ["staged"])
  _write(str(emb / ".index.parquet"), ["hidden"])
  _write(str(emb / "snapshot_date=2024-01-07" / "_tmp.parquet"), ["tmp"])
  _write(str(root / "predictions" / "cls" / "part-0.parquet"), ["p"])
  _write(str(root / "predictions" / "_runs" / "part-0.parquet"), ["r"])
  _write(str(root / "errors" / "snapshot_date=2024-01-07" / "p.parquet"),
         ["e"])
  return str(root)


def test_listing_keeps_table_files_only_sorted(out):
  root = os.path.join(out, "embeddings", "emb")
  files = tables.list_table_files(root)
  assert [(os.path.relpath(f.path, root), f.partition) for f in files] == [
      ("part-1.parquet", None),
      ("snapshot_date=2024-01-07/part-0.parquet", "2024-01-07"),
      ("snapshot_date=2024-01-14/part-0.parquet", "2024-01-14")]
  assert [f.partition for f in tables.list_table_files(
      root, partition="2024-01-14")] == ["2024-01-14"]
  assert tables.list_table_files(os.path.join(out, "nowhere")) == []
  assert [f.partition for f in tables.errors_files(out)] == ["2024-01-07"]


def test_reading_adds_the_partition_and_nulls_for_missing_columns(out):
  table = tables.open_model_table(out, "emb")
  assert (table.kind, table.model_info) == ("embedder", {"v": 1})
  assert [f.partition for f in table.files] == [None, "2024-01-07",
                                                "2024-01-14"]
  rows = table.read().to_pydict()
  assert rows == {"image_id": ["a", "b", "c"],
                  "site": [None, None, "x"],
                  "snapshot_date": [None, "2024-01-07", "2024-01-14"]}
  assert table.read(["image_id"]).column_names == ["image_id"]
  # In the schema's order: the first file's columns, then the others'.
  assert tables.carried_columns(table.read().schema) == ["snapshot_date",
                                                         "site"]
  assert tables.file_rows(table.files[0].path) == 1
  assert tables.file_metadata(table.files[1].path) == {}


def test_models_are_found_and_a_missing_one_is_named(out):
  assert tables.find_models(out) == {"cls": "classifier", "emb": "embedder"}
  with pytest.raises(tables.TableError) as raised:
    tables.open_model_table(out, "other")
  assert str(raised.value) == (
      f"no table of model 'other' under {out} (models found: cls, emb)")
  with pytest.raises(tables.TableError, match="partition snapshot_date=2025"):
    tables.open_model_table(out, "emb", partition="2025-01-01")
  with pytest.raises(tables.TableError, match="no Parquet files"):
    tables.read_files([])
