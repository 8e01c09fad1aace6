"""Finding and reading the committed tables of an output folder.

``natvision-embed`` writes ``OUT/<table>/<model>/part-*.parquet``;
``natvision-ingest`` writes the same tables split into Hive partitions,
``OUT/<table>/<model>/snapshot_date=YYYY-MM-DD/part-*.parquet``.  The tools
read both the same way: every Parquet file of a table, in a stable order
(sorted paths), with a ``snapshot_date`` column added for partitioned files.
Files and folders whose names start with ``_`` or ``.`` (staging, markers,
the search index) are never table files.  Every path goes through Beam's
``FileSystems``, so a table in a bucket reads like a local one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import models as models_lib
from natvision.transforms import sinks
from natvision.transforms import storage

PARTITION_KEY = "snapshot_date"
# Rows per record batch of ``iter_batches``.
BATCH_ROWS = 8192
KINDS = {sinks.EMBEDDINGS: models_lib.EMBEDDER,
         sinks.PREDICTIONS: models_lib.CLASSIFIER}
# Columns the jobs write themselves; any other column was carried from the
# manifest or the observation (or is the partition column).
SIZE_COLUMNS = ("source_width", "source_height", "decoded_width",
                "decoded_height")
MODEL_COLUMNS = frozenset({
    "image_id", "uri", "model", "embedding", "label_id", "label", "score",
    "top_k_label_ids", "top_k_labels", "top_k_scores", "stage", "error",
}) | frozenset(SIZE_COLUMNS)


class TableError(ValueError):
  """A table is missing or unusable; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class TableFile:
  """One Parquet file of a table.

  Attributes:
    path: full path on any Beam filesystem.
    partition: the partition value (``2024-05-27``) or None for a plain
      table.
  """

  path: str
  partition: Optional[str] = None


def _split_under(path: str, root: str) -> List[str]:
  rest = path[len(root.rstrip("/")):].lstrip("/")
  return [p for p in rest.split("/") if p]


def list_table_files(root: str, partition: Optional[str] = None
                     ) -> List[TableFile]:
  """The Parquet files of one table folder, plain and partitioned.

  Args:
    root: a table folder, e.g. ``OUT/embeddings/inaturalist_v2``.
    partition: keep only this partition (``2024-05-27``); None keeps all.

  Returns:
    Files sorted by path; [] when the folder holds none.

  Raises:
    storage.StorageError: a listing failed.
  """
  found = []
  for path in storage.match(FileSystems.join(root, "*.parquet")):
    parts = _split_under(path, root)
    if len(parts) == 1 and not parts[0].startswith(("_", ".")):
      found.append(TableFile(path))
  for path in storage.match(FileSystems.join(root, PARTITION_KEY + "=*",
                                             "*.parquet")):
    parts = _split_under(path, root)
    if len(parts) != 2 or parts[1].startswith(("_", ".")):
      continue
    value = parts[0].split("=", 1)[1]
    found.append(TableFile(path, value))
  if partition is not None:
    found = [f for f in found if f.partition == partition]
  return sorted(set(found), key=lambda f: f.path)


def file_metadata(path: str) -> dict:
  """The ``natvision`` key-value metadata of one Parquet file ({} if none)."""
  with FileSystems.open(path) as f:
    schema = pq.read_schema(f)
  raw = (schema.metadata or {}).get(sinks.METADATA_KEY)
  return json.loads(raw) if raw else {}


def file_rows(path: str) -> int:
  """Rows of one Parquet file, from its footer."""
  with FileSystems.open(path) as f:
    return pq.ParquetFile(f).metadata.num_rows


def read_files(files: Sequence[TableFile],
               columns: Optional[Sequence[str]] = None) -> pa.Table:
  """Reads files into one table, in the order given.

  Args:
    files: from ``list_table_files``.
    columns: columns to read (the partition column may be named); None
      reads all.  A column missing from some files is null there.

  Returns:
    The rows of every file; ``snapshot_date`` (string) is added when any
    file is partitioned.

  Raises:
    TableError: no files.
  """
  if not files:
    raise TableError("no Parquet files to read")
  partitioned = any(f.partition is not None for f in files)
  parts = []
  for table_file in files:
    with FileSystems.open(table_file.path) as f:
      parquet = pq.ParquetFile(f)
      names = parquet.schema_arrow.names
      wanted = None if columns is None else [c for c in columns if c in names]
      table = parquet.read(columns=wanted)
    table = table.replace_schema_metadata(None)
    if partitioned and (columns is None or PARTITION_KEY in columns):
      table = table.append_column(
          PARTITION_KEY, pa.array([table_file.partition] * table.num_rows,
                                  pa.string()))
    parts.append(table)
  return pa.concat_tables(parts, promote_options="default")


def iter_batches(files: Sequence[TableFile], columns: Sequence[str],
                 batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
  """Record batches of at most ``batch_rows`` rows of ``files``, in order.

  The bounded counterpart of ``read_files``: one file open at a time, one
  record batch of the named ``columns`` in memory at a time
  (``pyarrow.parquet.ParquetFile.iter_batches``).  A column missing from a
  file is missing from its batches (no null column is added); the
  partition column, when named, is added to each batch of a partitioned
  file.

  Raises:
    OSError: a file cannot be opened or read.
  """
  for table_file in files:
    with FileSystems.open(table_file.path) as f:
      parquet = pq.ParquetFile(f)
      wanted = [c for c in columns if c in parquet.schema_arrow.names]
      add_partition = (table_file.partition is not None
                       and PARTITION_KEY in columns
                       and PARTITION_KEY not in wanted)
      for batch in parquet.iter_batches(batch_size=batch_rows,
                                        columns=wanted):
        if add_partition:
          batch = batch.append_column(
              PARTITION_KEY, pa.array([table_file.partition]
                                      * batch.num_rows, pa.string()))
        yield batch


def carried_columns(schema: pa.Schema) -> List[str]:
  """Names of the manifest or observation columns (and the partition)."""
  return [n for n in schema.names if n not in MODEL_COLUMNS]


@dataclasses.dataclass(frozen=True)
class ModelTable:
  """One model's table in an output folder.

  Attributes:
    name: the model's registry name.
    kind: ``embedder`` or ``classifier``.
    root: the table folder.
    files: its Parquet files, sorted.
    metadata: the ``natvision`` metadata of its first file.
  """

  name: str
  kind: str
  root: str
  files: tuple
  metadata: dict

  def read(self, columns: Optional[Sequence[str]] = None) -> pa.Table:
    return read_files(self.files, columns)

  def schema(self) -> pa.Schema:
    with FileSystems.open(self.files[0].path) as f:
      return pq.read_schema(f)

  @property
  def model_info(self) -> dict:
    return self.metadata.get("model", {})


def find_models(output_dir: str) -> Dict[str, str]:
  """Model name -> kind, for every model table under ``output_dir``."""
  found = {}
  for table, kind in KINDS.items():
    base = FileSystems.join(output_dir, table)
    for pattern in ("*/*.parquet", "*/" + PARTITION_KEY + "=*/*.parquet"):
      for path in storage.match(FileSystems.join(base, pattern)):
        parts = _split_under(path, base)
        if parts and not parts[0].startswith(("_", ".")):
          found.setdefault(parts[0], kind)
  return dict(sorted(found.items()))


def open_model_table(output_dir: str, name: str,
                     partition: Optional[str] = None) -> ModelTable:
  """The table of model ``name`` under ``output_dir``.

  Raises:
    TableError: no table of that model, naming the models that are there.
  """
  for table, kind in KINDS.items():
    root = FileSystems.join(output_dir, table, name)
    files = list_table_files(root, partition)
    if files:
      return ModelTable(name=name, kind=kind, root=root, files=tuple(files),
                        metadata=file_metadata(files[0].path))
  there = ", ".join(find_models(output_dir)) or "none"
  where = f" partition {PARTITION_KEY}={partition}" if partition else ""
  if "://" not in output_dir and not os.path.isdir(output_dir):
    raise TableError(f"--output_dir {output_dir} is not a folder: give the "
                     f"--output_dir of a natvision run")
  raise TableError(f"no table of model {name!r} under {output_dir}{where} "
                   f"(models found: {there})")


def errors_files(output_dir: str, partition: Optional[str] = None
                 ) -> List[TableFile]:
  return list_table_files(FileSystems.join(output_dir, sinks.ERRORS),
                          partition)
