"""transforms/snapshots/tables.py: finding the tables of a snapshot at launch.

Each table as one file (TSV, gzipped TSV, Parquet) or a folder of parts,
its columns read from the header or footer only; a table present twice, a
missing table or column, and a comma-separated file are refused with a
message that names them.
"""

import gzip
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.snapshot_helpers import world  # noqa: F401  (fixture)
from natvision.transforms import snapshots


@pytest.mark.parametrize("fmt", ["csv", "csv.gz", "parquet"])
def test_open_snapshot_finds_each_format(world, fmt):
  folder = world.write_snapshot(f"fmt-{fmt}", fmt=fmt)
  snap = snapshots.open_snapshot(folder, need_taxa=True)
  want = "parquet" if fmt == "parquet" else "tsv"
  assert snap.photos.fmt == snap.observations.fmt == snap.taxa.fmt == want
  assert snap.photos.files == (os.path.join(folder, f"photos.{fmt}"),)
  assert "photo_id" in snap.photos.columns
  assert "ancestry" in snap.taxa.columns


def test_folder_of_parts(tmp_path):
  parts = tmp_path / "photos"
  parts.mkdir()
  header = "photo_uuid\tphoto_id\tobservation_uuid\tlicense\n"
  for i in range(2):
    (parts / f"part-{i}.csv.gz").write_bytes(gzip.compress(
        (header + f"u{i}\t{i}\to{i}\tcc0\n").encode()))
  table = snapshots.find_table(str(tmp_path), "photos")
  assert table.fmt == "tsv" and len(table.files) == 2
  (parts / "part-2.csv.gz").write_bytes(gzip.compress(b"photo_id\n1\n"))
  with pytest.raises(snapshots.SnapshotError, match="must agree"):
    snapshots.find_table(str(tmp_path), "photos")


def test_table_present_twice_is_refused(world, tmp_path):
  folder = world.write_snapshot("twice", fmt="csv")
  pq.write_table(pa.table({"photo_id": [1]}),
                 os.path.join(folder, "photos.parquet"))
  with pytest.raises(snapshots.SnapshotError, match="more than once"):
    snapshots.open_snapshot(folder)
  del tmp_path


def test_missing_tables_and_columns_are_named(world, tmp_path):
  no_taxa = world.write_snapshot("no-taxa", taxa=False)
  assert snapshots.open_snapshot(no_taxa).taxa is None
  with pytest.raises(snapshots.SnapshotError, match="no taxa table"):
    snapshots.open_snapshot(no_taxa, need_taxa=True)
  with pytest.raises(snapshots.SnapshotError, match="no photos table"):
    snapshots.open_snapshot(str(tmp_path))
  (tmp_path / "photos.csv").write_text("photo_id\tobservation_uuid\n")
  (tmp_path / "observations.csv").write_text("observation_uuid\n")
  with pytest.raises(snapshots.SnapshotError) as e:
    snapshots.open_snapshot(str(tmp_path))
  assert "photo_uuid" in str(e.value) and "license" in str(e.value)


def test_comma_separated_file_gets_a_hint(tmp_path):
  (tmp_path / "photos.csv").write_text(
      "photo_uuid,photo_id,observation_uuid,license\n")
  (tmp_path / "observations.csv").write_text("x\n")
  with pytest.raises(snapshots.SnapshotError, match="tab-separated"):
    snapshots.open_snapshot(str(tmp_path))
