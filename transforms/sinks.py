"""Sinks: explicit Arrow schemas, Parquet writes, and the commit of a run.

Tables (``DIR`` is ``--output_dir``)::

    DIR/embeddings/<model>/part-*.parquet   image_id, uri, model, embedding
    DIR/predictions/<model>/part-*.parquet  image_id, uri, model, label_id,
                                            label, score, top_k_label_ids,
                                            top_k_labels, top_k_scores
    DIR/errors/part-*.parquet               image_id, uri, model, stage, error

each followed by the manifest's carried columns.  Every file carries
key-value metadata (key ``natvision``, a JSON object) naming the model, its
path, width, preparation, runtime and the package version.

A run writes into ``DIR/_staging/<run_id>/`` and, only once the pipeline has
succeeded, ``commit_tables`` moves the files into place and removes what an
earlier run left there.  A run that dies part-way therefore leaves nothing
that a reader of ``DIR/<table>/...`` picks up, and a rerun replaces rather
than duplicates rows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

import transforms
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


def table_metadata(model: Optional[models_lib.ResolvedModel], **extra) -> dict:
  meta = {"package": "natvision", "version": transforms.__version__}
  if model is not None:
    meta["model"] = model.describe()
    meta["runtime"] = model.runtime
  meta.update(extra)
  return meta


def embeddings_schema(model: models_lib.ResolvedModel,
                      carried: Carried = ()) -> pa.Schema:
  fields = _base_fields() + [
      pa.field("embedding",
               pa.list_(pa.float32(), model.spec.output_width), nullable=False),
  ]
  return _with_metadata(fields, carried, table_metadata(model))


def predictions_schema(model: models_lib.ResolvedModel,
                       carried: Carried = ()) -> pa.Schema:
  fields = _base_fields() + [
      pa.field("label_id", pa.int32(), nullable=False),
      pa.field("label", pa.string()),
      pa.field("score", pa.float32(), nullable=False),
      pa.field("top_k_label_ids", pa.list_(pa.int32())),
      pa.field("top_k_labels", pa.list_(pa.string())),
      pa.field("top_k_scores", pa.list_(pa.float32())),
  ]
  return _with_metadata(fields, carried, table_metadata(model))


def errors_schema(carried: Carried = (),
                  models: Sequence[models_lib.ResolvedModel] = ()) -> pa.Schema:
  fields = _base_fields() + [
      pa.field("stage", pa.string(), nullable=False),
      pa.field("error", pa.string(), nullable=False),
  ]
  meta = table_metadata(None, models=[m.describe() for m in models])
  return _with_metadata(fields, carried, meta)


def schema_for(model: models_lib.ResolvedModel,
               carried: Carried = ()) -> pa.Schema:
  if model.spec.kind == models_lib.EMBEDDER:
    return embeddings_schema(model, carried)
  return predictions_schema(model, carried)


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


class WriteTable(beam.PTransform):
  """Writes a PCollection of pyarrow Tables (one per batch) as Parquet."""

  def __init__(self, directory: str, schema: pa.Schema):
    super().__init__()
    self._directory = directory
    self._schema = schema

  def expand(self, tables):
    return tables | "WriteParquet" >> beam.io.parquetio.WriteToParquetBatched(
        FileSystems.join(self._directory, FILE_PREFIX),
        schema=self._schema,
        file_name_suffix=FILE_SUFFIX,
        codec="zstd")


class WriteErrors(beam.PTransform):
  """PCollection[ErrorRecord] -> DIR/errors/*.parquet."""

  def __init__(self, directory: str, schema: pa.Schema, carried: Carried):
    super().__init__()
    self._directory = directory
    self._schema = schema
    self._carried = carried

  def expand(self, errors):
    schema, carried = self._schema, self._carried
    return (errors
            | "BatchErrors" >> beam.BatchElements(min_batch_size=1,
                                                  max_batch_size=1000)
            | "ErrorsToArrow" >> beam.Map(errors_to_table, schema, carried)
            | "Write" >> WriteTable(self._directory, schema))


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
  with FileSystems.create(path) as f:
    pq.write_table(schema.empty_table(), f)


COMMIT_PLAN = "_commit_plan.json"


def commit_tables(tables: Sequence[TableSpec], staging_root: str) -> None:
  """Moves staged files into place and removes the previous run's files.

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
      staged = list_parquet(table.staged)
      if not staged:
        empty = FileSystems.join(
            table.staged, f"{FILE_PREFIX}-00000-of-00001{FILE_SUFFIX}")
        write_empty(empty, table.schema)
        staged = [empty]
      plan[table.name] = [_basename(p) for p in staged]
    with FileSystems.create(plan_path) as f:
      f.write(json.dumps(plan).encode())
  for table in tables:
    names = plan[table.name]
    if not storage.exists(table.final):
      FileSystems.mkdirs(table.final)  # a no-op on object stores
    sources = [FileSystems.join(table.staged, n) for n in names]
    targets = [FileSystems.join(table.final, n) for n in names]
    pending = [(s, t) for s, t in zip(sources, targets)
               if storage.exists(s)]
    if pending:
      FileSystems.rename([s for s, _ in pending], [t for _, t in pending])
    stale = sorted(set(list_parquet(table.final)) - set(targets))
    if stale:
      FileSystems.delete(stale)
    logging.info("committed %s: %d file(s)", table.name, len(targets))
  remove_tree(staging_root)
  parent = staging_root.rstrip("/").rsplit("/", 1)[0]
  if "://" not in parent and os.path.isdir(parent) and not os.listdir(parent):
    os.rmdir(parent)  # the local _staging folder, once no run is using it


def remove_tree(path: str) -> None:
  """Deletes a folder and everything under it, locally or in a bucket.

  Object stores have no folders: there the objects under ``path/`` are
  deleted (Beam's GCS filesystem deletes a prefix given with a trailing /).
  """
  if "://" in path:
    prefix = path.rstrip("/") + "/"
    if storage.match(prefix + "**"):
      FileSystems.delete([prefix])
  elif os.path.exists(path):
    FileSystems.delete([path])


def count_rows(directory: str) -> int:
  """Rows in the Parquet files of a directory, read from footers only."""
  total = 0
  for path in list_parquet(directory):
    with FileSystems.open(path) as f:
      total += pq.ParquetFile(f).metadata.num_rows
  return total
