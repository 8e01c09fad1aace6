"""Sinks: explicit Arrow schemas, Parquet writes, and the commit of a run.

Tables (``DIR`` is ``--output_dir``)::

    DIR/embeddings/<model>/part-*.parquet   image_id, uri, model, embedding,
                                            source_width, source_height,
                                            decoded_width, decoded_height
    DIR/predictions/<model>/part-*.parquet  image_id, uri, model, label_id,
                                            label, score, top_k_label_ids,
                                            top_k_labels, top_k_scores,
                                            source_width, ..., decoded_height
    DIR/errors/part-*.parquet               image_id, uri, model, stage, error

each followed by the manifest's carried columns.  The sizes are upright (EXIF
orientation applied): ``source_*`` as stored in the file, ``decoded_*`` as
decoded (after any DCT-domain draft of a big JPEG).  Every file carries
key-value metadata (key ``natvision``, a JSON object) naming the model, its
path, width, preparation, runtime, how embedded colour profiles were treated
(``color_profile``) and the package version.

A run writes into ``DIR/_staging/<run_id>/`` and, only once the pipeline has
succeeded, ``commit_tables`` moves the files into place and removes what an
earlier run left there.  A run that dies part-way therefore leaves nothing
that a reader of ``DIR/<table>/...`` picks up, and a rerun replaces rather
than duplicates rows.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

import transforms
from transforms import decode as decode_lib
from transforms import models as models_lib
from transforms import storage
from transforms.records import (EmbeddingResult, ErrorRecord, ImageRef,
                                PredictionResult)

EMBEDDINGS = "embeddings"
PREDICTIONS = "predictions"
ERRORS = "errors"
METADATA_KEY = b"natvision"
FILE_PREFIX = "part"
FILE_SUFFIX = ".parquet"

Carried = Tuple[Tuple[str, pa.DataType], ...]


def _base_fields() -> List[pa.Field]:
  return [
      pa.field("image_id", pa.string(), nullable=False),
      pa.field("uri", pa.string(), nullable=False),
      pa.field("model", pa.string()),
  ]


def _with_metadata(fields: List[pa.Field], carried: Carried,
                   metadata: dict) -> pa.Schema:
  fields = fields + [pa.field(name, dtype) for name, dtype in carried]
  return pa.schema(fields, metadata={METADATA_KEY: json.dumps(
      metadata, sort_keys=True).encode()})


# The photo's sizes, upright: in the file, and as decoded (after a draft).
SIZE_COLUMNS = ("source_width", "source_height", "decoded_width",
                "decoded_height")


def _size_fields() -> List[pa.Field]:
  return [pa.field(name, pa.int32(), nullable=False) for name in SIZE_COLUMNS]


def table_metadata(model: Optional[models_lib.ResolvedModel],
                   color_profile: str = decode_lib.COLOR_PROFILE_IGNORE,
                   **extra) -> dict:
  """The JSON stored under ``natvision`` in every file's metadata.

  Args:
    model: the model whose table this is; None for the errors table.
    color_profile: how embedded ICC profiles were treated when decoding
      (``--color_profile``: ``ignore`` or ``srgb``).
    extra: further keys.
  """
  meta = {"package": "natvision", "version": transforms.__version__,
          "color_profile": color_profile}
  if model is not None:
    meta["model"] = model.describe()
    meta["runtime"] = model.runtime
  meta.update(extra)
  return meta


def embeddings_schema(model: models_lib.ResolvedModel,
                      carried: Carried = (),
                      color_profile: str = decode_lib.COLOR_PROFILE_IGNORE
                      ) -> pa.Schema:
  fields = _base_fields() + [
      pa.field("embedding",
               pa.list_(pa.float32(), model.spec.output_width), nullable=False),
  ] + _size_fields()
  return _with_metadata(fields, carried, table_metadata(model, color_profile))


def predictions_schema(model: models_lib.ResolvedModel,
                       carried: Carried = (),
                       color_profile: str = decode_lib.COLOR_PROFILE_IGNORE
                       ) -> pa.Schema:
  fields = _base_fields() + [
      pa.field("label_id", pa.int32(), nullable=False),
      pa.field("label", pa.string()),
      pa.field("score", pa.float32(), nullable=False),
      pa.field("top_k_label_ids", pa.list_(pa.int32())),
      pa.field("top_k_labels", pa.list_(pa.string())),
      pa.field("top_k_scores", pa.list_(pa.float32())),
  ] + _size_fields()
  return _with_metadata(fields, carried, table_metadata(model, color_profile))


def errors_schema(carried: Carried = (),
                  models: Sequence[models_lib.ResolvedModel] = (),
                  color_profile: str = decode_lib.COLOR_PROFILE_IGNORE
                  ) -> pa.Schema:
  fields = _base_fields() + [
      pa.field("stage", pa.string(), nullable=False),
      pa.field("error", pa.string(), nullable=False),
  ]
  meta = table_metadata(None, color_profile,
                        models=[m.describe() for m in models])
  return _with_metadata(fields, carried, meta)


def schema_for(model: models_lib.ResolvedModel, carried: Carried = (),
               color_profile: str = decode_lib.COLOR_PROFILE_IGNORE
               ) -> pa.Schema:
  """The embeddings or predictions schema of a model, by its kind."""
  if model.spec.kind == models_lib.EMBEDDER:
    return embeddings_schema(model, carried, color_profile)
  return predictions_schema(model, carried, color_profile)


def output_columns() -> Tuple[str, ...]:
  """Every column the tables write before the carried ones, in schema order.

  Read from the schemas themselves (one per kind of registered model, and
  the errors table), so a column added to a schema is covered here too.
  """
  schemas = [errors_schema()]
  for spec in models_lib.REGISTRY.values():
    model = models_lib.ResolvedModel(spec=spec, path="", resize=spec.resize)
    schemas.append(schema_for(model))
  return tuple(dict.fromkeys(n for schema in schemas for n in schema.names))


def _carried_columns(refs: Sequence[ImageRef], carried: Carried) -> Dict[str, list]:
  columns = {name: [] for name, _ in carried}
  for ref in refs:
    values = ref.extra_dict()
    for name, _ in carried:
      columns[name].append(values.get(name))
  return columns


def results_to_table(results: Sequence, schema: pa.Schema,
                     carried: Carried = ()) -> pa.Table:
  """Converts one batch of EmbeddingResult or PredictionResult to a table."""
  refs = [r.ref for r in results]
  columns = {
      "image_id": [r.image_id for r in refs],
      "uri": [r.uri for r in refs],
      "model": [r.model for r in results],
  }
  if "embedding" in schema.names:
    width = schema.field("embedding").type.list_size
    flat = pa.array(
        _stack([r.embedding for r in results], width).reshape(-1),
        pa.float32())
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, width)
  else:
    columns["label_id"] = [int(r.label_ids[0]) for r in results]
    columns["label"] = [r.labels[0] for r in results]
    columns["score"] = [float(r.scores[0]) for r in results]
    columns["top_k_label_ids"] = [r.label_ids.tolist() for r in results]
    columns["top_k_labels"] = [list(r.labels) for r in results]
    columns["top_k_scores"] = [r.scores.tolist() for r in results]
  for name in SIZE_COLUMNS:
    columns[name] = [getattr(r, name) for r in results]
  columns.update(_carried_columns(refs, carried))
  return pa.Table.from_pydict(columns, schema=schema)


def _stack(arrays, width) -> np.ndarray:
  if not arrays:
    return np.zeros((0, width), np.float32)
  return np.stack(arrays).astype(np.float32, copy=False)


def errors_to_table(errors: Sequence[ErrorRecord], schema: pa.Schema,
                    carried: Carried = ()) -> pa.Table:
  refs = [e.ref for e in errors]
  columns = {
      "image_id": [r.image_id for r in refs],
      "uri": [r.uri for r in refs],
      "model": [e.model for e in errors],
      "stage": [e.stage for e in errors],
      "error": [e.error for e in errors],
  }
  columns.update(_carried_columns(refs, carried))
  return pa.Table.from_pydict(columns, schema=schema)


def staging_dir(output_dir: str, run_id: str) -> str:
  return FileSystems.join(output_dir, "_staging", run_id)


def table_dir(root: str, table: str, model: Optional[str] = None) -> str:
  return FileSystems.join(root, table, model) if model else FileSystems.join(
      root, table)


DEFAULT_SHARD_ROWS = 5000


class _WriteShardsFn(beam.DoFn):
  """pyarrow Tables -> closed Parquet shards of at most about ``max_rows``.

  Each shard is closed (footer written, so it is complete and readable) as
  soon as it holds ``max_rows`` rows, and the last one at the end of the
  bundle; its path is emitted then.  A run that dies therefore leaves whole
  shards that a rerun can reuse (see transforms/resume.py), and at most one
  shard per writer cut short, which has no footer and is ignored.  Files of
  a bundle that fails and is retried are never emitted, so the commit, which
  takes only emitted paths, never sees them.
  """

  def __init__(self, directory: str, schema: pa.Schema, max_rows: int):
    self._directory = directory
    self._schema = schema
    self._max_rows = max_rows
    self._writer = None
    self._file = None
    self._path = None
    self._rows = 0

  def start_bundle(self):
    self._writer = None

  def _open(self):
    import uuid  # pylint: disable=import-outside-toplevel
    self._path = FileSystems.join(
        self._directory, f"{FILE_PREFIX}-{uuid.uuid4().hex[:20]}{FILE_SUFFIX}")
    with storage.failing_as("writing", self._path):
      self._file = FileSystems.create(self._path)
      self._writer = pq.ParquetWriter(self._file, self._schema,
                                      compression="zstd")
    self._rows = 0

  def _close(self) -> str:
    with storage.failing_as("writing", self._path, abandon=self._file):
      self._writer.close()
      self._file.close()
    self._writer = None
    return self._path

  def process(self, table: pa.Table) -> Iterable[str]:
    if table.num_rows == 0:
      return
    if self._writer is None:
      self._open()
    with storage.failing_as("writing", self._path, abandon=self._file):
      self._writer.write_table(table)
    self._rows += table.num_rows
    if self._rows >= self._max_rows:
      yield self._close()

  def finish_bundle(self):
    if self._writer is not None:
      yield WindowedValue(self._close(), MIN_TIMESTAMP, [GlobalWindow()])


class WriteTable(beam.PTransform):
  """PCollection[pa.Table] (one per batch) -> paths of closed Parquet shards.

  Args:
    directory: the table's staging folder.
    schema: every batch's schema (carried into each file's footer).
    shard_rows: rows after which a shard is closed and a new one begun.
  """

  def __init__(self, directory: str, schema: pa.Schema,
               shard_rows: int = DEFAULT_SHARD_ROWS):
    super().__init__()
    if shard_rows < 1:
      raise ValueError("--shard_rows must be at least 1")
    self._directory = directory
    self._schema = schema
    self._shard_rows = shard_rows

  def expand(self, tables):
    return tables | "WriteShards" >> beam.ParDo(
        _WriteShardsFn(self._directory, self._schema, self._shard_rows))


class WriteErrors(beam.PTransform):
  """PCollection[ErrorRecord] -> DIR/errors shards (paths, as WriteTable)."""

  def __init__(self, directory: str, schema: pa.Schema, carried: Carried,
               shard_rows: int = DEFAULT_SHARD_ROWS):
    super().__init__()
    self._directory = directory
    self._schema = schema
    self._carried = carried
    self._shard_rows = shard_rows

  def expand(self, errors):
    schema, carried = self._schema, self._carried
    return (errors
            | "BatchErrors" >> beam.BatchElements(min_batch_size=1,
                                                  max_batch_size=1000)
            | "ErrorsToArrow" >> beam.Map(errors_to_table, schema, carried)
            | "Write" >> WriteTable(self._directory, schema,
                                    self._shard_rows))


@dataclasses.dataclass(frozen=True)
class TableSpec:
  """One table of a run: where it is staged, where it lands, its schema."""

  name: str  # e.g. "embeddings/inaturalist_v2" or "errors"
  staged: str
  final: str
  schema: pa.Schema


def list_parquet(directory: str) -> List[str]:
  """The Parquet files directly in ``directory``; [] when it does not exist.

  Raises:
    storage.StorageError: the listing failed (never read as "no files").
  """
  return storage.match(FileSystems.join(directory, "*" + FILE_SUFFIX))


def _basename(path: str) -> str:
  return path.rstrip("/").rsplit("/", 1)[-1]


def write_empty(path: str, schema: pa.Schema) -> None:
  data = io.BytesIO()
  pq.write_table(schema.empty_table(), data)
  storage.write_bytes(path, data.getvalue())


COMMIT_PLAN = "_commit_plan.json"


def commit_tables(tables: Sequence[TableSpec], staging_root: str,
                  files: Optional[Sequence[str]] = None) -> None:
  """Moves staged files into place and removes the previous run's files.

  Args:
    tables: the run's tables.
    staging_root: the run's staging folder (the plan is written there).
    files: the staged shards the pipeline's writes emitted.  Only these are
      committed: a shard left by a failed and retried bundle is never
      emitted, so it cannot add duplicate rows.  None: every Parquet file in
      each table's staging folder (for callers outside a pipeline).

  Safe to run again after a failure part-way (a runner retrying the commit
  step): the first attempt records which files each table must end up with
  in ``<staging_root>/_commit_plan.json`` before moving anything, and a later
  attempt follows that plan instead of what is left in staging, so files
  already moved are neither lost nor taken for stale.

  A table with no rows gets one empty file with its schema, so that readers
  always find every table.
  """
  tables = list(tables)
  plan_path = FileSystems.join(staging_root, COMMIT_PLAN)
  if storage.exists(plan_path):
    plan = json.loads(storage.read_bytes(plan_path))
  else:
    plan = {}
    for table in tables:
      if files is None:
        staged = list_parquet(table.staged)
      else:
        staged = sorted(f for f in files
                        if storage.same_folder(f, table.staged))
      if not staged:
        empty = FileSystems.join(
            table.staged, f"{FILE_PREFIX}-00000-of-00001{FILE_SUFFIX}")
        write_empty(empty, table.schema)
        staged = [empty]
      plan[table.name] = [_basename(p) for p in staged]
    storage.write_bytes(plan_path, json.dumps(plan).encode())
  for table in tables:
    names = plan[table.name]
    sources = [FileSystems.join(table.staged, n) for n in names]
    targets = [FileSystems.join(table.final, n) for n in names]
    # Listed before anything moves: a failure up to the first move leaves
    # the previous table whole.
    stale = sorted(set(list_parquet(table.final)) - set(targets))
    if not storage.exists(table.final):
      FileSystems.mkdirs(table.final)  # a no-op on object stores
    pending = [(s, t) for s, t in zip(sources, targets)
               if storage.exists(s)]
    try:
      if pending:
        FileSystems.rename([s for s, _ in pending], [t for _, t in pending])
      if stale:
        FileSystems.delete(stale)
    except Exception as e:  # noqa: BLE001 - every filesystem raises its own
      _finish_replacing(table, pending, stale, e)
    logging.info("committed %s: %d file(s)", table.name, len(targets))
  remove_tree(staging_root)
  remove_empty_parent(staging_root)


def remove_empty_parent(staging_root: str) -> None:
  """Removes the local ``_staging`` folder once no run is using it."""
  parent = staging_root.rstrip("/").rsplit("/", 1)[0]
  if "://" not in parent and os.path.isdir(parent) and not os.listdir(parent):
    os.rmdir(parent)


def _finish_replacing(table: TableSpec, pending: Sequence[Tuple[str, str]],
                      stale: Sequence[str], error: Exception) -> None:
  """Completes a table whose replacement failed part-way, then fails.

  Moving this run's files in and the previous run's out are separate
  storage calls, so a failure between them leaves rows of both runs in the
  table.  The moves and deletions left are tried once more (each is
  idempotent), so that readers see this run's table; the run fails all the
  same.

  Args:
    table: the table being replaced.
    pending: its (staged, final) moves.
    stale: the previous run's files to remove.
    error: the failure.

  Raises:
    storage.StorageError: always, naming the table and saying whether it
      now holds this run's rows or may hold rows of both runs.
  """
  try:
    left = [(s, t) for s, t in pending if storage.exists(s)]
    if left:
      FileSystems.rename([s for s, _ in left], [t for _, t in left])
    old = [p for p in stale if storage.exists(p)]
    if old:
      FileSystems.delete(old)
  except Exception as again:  # noqa: BLE001
    raise storage.StorageError(
        f"committing {table.final} failed part-way ({error}) and could not "
        f"be finished ({again}): until the job is rerun it may hold rows of "
        f"both this run and the previous one") from error
  raise storage.StorageError(
      f"committing {table.final} failed part-way ({error}); the rest of its "
      f"files were then moved, so it holds this run's rows, but the run "
      f"fails") from error


def remove_tree(path: str) -> None:
  """Deletes a folder and everything under it, locally or in a bucket.

  Object stores have no folders: there the objects under ``path/`` are
  deleted (Beam's GCS filesystem deletes a prefix given with a trailing /,
  and only logs the objects it failed to delete, so what is left is
  listed again).

  Raises:
    storage.StorageError: objects could not be listed or deleted.
  """
  if "://" in path:
    prefix = path.rstrip("/") + "/"
    if storage.match(prefix + "**"):
      FileSystems.delete([prefix])
      left = storage.match(prefix + "**")
      if left:
        raise storage.StorageError(
            f"removing {prefix} failed: {len(left)} object(s) left, such "
            f"as {left[0]}")
  elif os.path.exists(path):
    FileSystems.delete([path])


def count_rows(directory: str) -> int:
  """Rows in the Parquet files of a directory, read from footers only."""
  total = 0
  for path in list_parquet(directory):
    with storage.failing_as("reading", path), FileSystems.open(path) as f:
      total += pq.ParquetFile(f).metadata.num_rows
  return total
