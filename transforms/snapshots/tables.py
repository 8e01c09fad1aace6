"""Finding a snapshot's tables and checking their columns (at launch).

iNaturalist publishes its open data as periodic snapshots of three tables
(``photos``, ``observations``, ``taxa``), tab-separated and unquoted,
optionally gzipped, or here also as Parquet with the same columns.  This
module finds each table under a snapshot folder (one file, or a folder of
parts) and reads only its header or Parquet footer, so that a missing table
or column fails before the job starts, naming what to fix.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
from typing import List, Optional, Tuple

import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import config
from natvision.transforms import storage

PHOTOS = "photos"
OBSERVATIONS = "observations"
TAXA = "taxa"
TABLES = (PHOTOS, OBSERVATIONS, TAXA)

TSV = "tsv"
PARQUET = "parquet"
# File names tried for each table, in order: name + suffix.
SUFFIXES = ((".csv", TSV), (".csv.gz", TSV), (".tsv", TSV), (".tsv.gz", TSV),
            (".parquet", PARQUET))

REQUIRED_COLUMNS = {
    PHOTOS: ("photo_id", "photo_uuid", "observation_uuid", "license"),
    OBSERVATIONS: ("observation_uuid", "taxon_id", "quality_grade",
                   "observed_on", "latitude", "longitude"),
    TAXA: ("taxon_id", "ancestry"),
}


class SnapshotError(config.ConfigError):
  """A snapshot folder that cannot be used; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class TableFiles:
  """One snapshot table: its files (all with the same columns) and format."""

  name: str
  fmt: str
  files: Tuple[str, ...]
  columns: Tuple[str, ...]

  def __post_init__(self):
    if self.fmt not in (TSV, PARQUET):
      raise ValueError(f"table {self.name}: format must be tsv or parquet")
    if not self.files:
      raise ValueError(f"table {self.name} has no files")


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """The tables of one snapshot folder."""

  root: str
  photos: TableFiles
  observations: TableFiles
  taxa: Optional[TableFiles] = None


def _open(path: str):
  raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
  if path.lower().endswith(".gz"):
    return gzip.GzipFile(fileobj=raw)
  return raw


def match_paths(pattern: str) -> List[str]:
  """Sorted paths matching a glob on any Beam filesystem; [] when none.

  Raises:
    storage.StorageError: the listing failed (an empty history would mean
      reprocessing everything, so a failure is never read as "none").
  """
  return storage.match(pattern)


def read_columns(path: str, fmt: str) -> Tuple[str, ...]:
  """The column names of one table file (the header line, or the schema).

  For Parquet only the footer is read: Beam's file handles are seekable.
  """
  if fmt == PARQUET:
    with _open(path) as f:
      return tuple(pq.ParquetFile(f).schema_arrow.names)
  with _open(path) as f:
    first = io.TextIOWrapper(f, encoding="utf-8-sig",
                             errors="replace").readline()
  return tuple(c.strip() for c in first.rstrip("\r\n").split("\t"))


def _candidates(root: str, name: str) -> List[Tuple[Tuple[str, ...], str]]:
  """(files, format) for each layout of ``name`` present under ``root``."""
  found = []
  for suffix, fmt in SUFFIXES:
    path = FileSystems.join(root, name + suffix)
    if storage.exists(path):
      found.append(((path,), fmt))
  if found:
    # A folder of parts is looked for only without a file: iNaturalist's
    # bucket holds photos.csv.gz next to photos/, its hundreds of millions
    # of photo files, which no one should list.
    return found
  folder = FileSystems.join(root, name)
  for suffix, fmt in SUFFIXES:
    parts = match_paths(FileSystems.join(folder, "*" + suffix))
    if parts:
      found.append((tuple(parts), fmt))
  return found


def find_table(root: str, name: str) -> Optional[TableFiles]:
  """Finds ``name.csv[.gz]``, ``name.tsv[.gz]``, ``name.parquet`` or a folder
  ``name/`` of such parts under ``root``; None when there is none.

  Raises:
    SnapshotError: several layouts of the same table, or parts whose
      columns differ.
  """
  found = _candidates(root, name)
  if not found:
    return None
  if len(found) > 1:
    raise SnapshotError(
        f"{root} holds the {name} table more than once "
        f"({', '.join(f[0][0] for f in found)}); keep one")
  files, fmt = found[0]
  try:
    headers = {path: read_columns(path, fmt) for path in files}
  except Exception as e:  # noqa: BLE001 - report any read failure
    raise SnapshotError(f"cannot read the {name} table in {root}: {e}") from e
  columns = headers[files[0]]
  for path, cols in headers.items():
    if cols != columns:
      raise SnapshotError(
          f"{path} has columns {', '.join(cols)} but {files[0]} has "
          f"{', '.join(columns)}; the parts of a table must agree")
  return TableFiles(name=name, fmt=fmt, files=files, columns=columns)


def open_snapshot(root: str, need_taxa: bool = False) -> Snapshot:
  """Finds the snapshot's tables and checks their columns.

  Args:
    root: the snapshot folder (local or gs://).
    need_taxa: whether a taxa table is required (taxonomy filters).

  Raises:
    SnapshotError: a table or a column missing, naming it.
  """
  tables = {}
  for name in TABLES:
    table = find_table(root, name)
    if table is None:
      if name == TAXA and not need_taxa:
        continue
      why = (" (--taxon_id and --route need it)" if name == TAXA else "")
      raise SnapshotError(
          f"{root} has no {name} table{why}: expected {name}.csv, "
          f"{name}.csv.gz or {name}.parquet (or a folder {name}/ of parts)")
    missing = [c for c in REQUIRED_COLUMNS[name] if c not in table.columns]
    if missing:
      hint = ("; the open-data tables are tab-separated, not comma-separated"
              if table.fmt == TSV and len(table.columns) == 1
              and "," in table.columns[0] else "")
      raise SnapshotError(
          f"the {name} table ({table.files[0]}) lacks column(s) "
          f"{', '.join(missing)} (it has: {', '.join(table.columns)}){hint}")
    tables[name] = table
  return Snapshot(root=root, photos=tables[PHOTOS],
                  observations=tables[OBSERVATIONS], taxa=tables.get(TAXA))
