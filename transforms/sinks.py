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

With ``--taxa`` (transforms/taxonomy.py) a predictions table also has
``label_taxon_id``, ``top_k_taxon_ids`` (null for an unmatched label) and
``rollup_taxon_id``, ``rollup_name``, ``rollup_rank``, ``rollup_score``
(null when no taxon reaches the threshold), after ``top_k_scores``.

each followed by the manifest's carried columns.  The sizes are upright (EXIF
orientation applied): ``source_*`` as stored in the file, ``decoded_*`` as
decoded (after any DCT-domain draft of a big JPEG).  Every file carries
key-value metadata (key ``natvision``, a JSON object).  Its ``spec`` field is
the run's ``transforms.spec.RunSpec`` (every model as decided and the
settings that change rows), which resume and search read back
(``recorded_spec``); the other fields (the model's description, runtime,
``color_profile``, the package version) are for people and are not read to
decide anything.

A run writes into ``DIR/_staging/<run_id>/`` and, only once the pipeline has
succeeded, ``commit_tables`` moves the files into place and removes what an
earlier run left there.  A run that dies part-way therefore leaves nothing
that a reader of ``DIR/<table>/...`` picks up, and a rerun replaces rather
than duplicates rows.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from natvision import transforms
from natvision.transforms import models as models_lib
from natvision.transforms import rgb
from natvision.transforms import spec as spec_lib
from natvision.transforms import storage
from natvision.transforms import taxonomy
from natvision.transforms.records import ErrorRecord, ImageRef

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
                   color_profile: str = rgb.COLOR_PROFILE_IGNORE,
                   run: Optional[spec_lib.RunSpec] = None,
                   **extra) -> dict:
  """The JSON stored under ``natvision`` in every file's metadata.

  Args:
    model: the model whose table this is; None for the errors table.
    color_profile: how embedded ICC profiles were treated when decoding
      (``--color_profile``: ``ignore`` or ``srgb``); with ``run``, the
      run's.
    run: the run's spec, recorded as ``spec``; None records none (such a
      table is never reused by resume, nor searched by photo).
    extra: further keys.
  """
  if run is not None:
    color_profile = run.color_profile
  meta = {"package": "natvision", "version": transforms.__version__,
          "color_profile": color_profile}
  if model is not None:
    meta["model"] = model.describe()
    meta["runtime"] = model.runtime
  if run is not None:
    meta["spec"] = run.to_dict()
  meta.update(extra)
  return meta


def recorded_spec(schema: pa.Schema) -> Optional[spec_lib.RunSpec]:
  """The run spec a file's metadata records; None when it records none.

  Args:
    schema: a Parquet file's Arrow schema (its footer's metadata).

  Raises:
    spec_lib.SpecError: a ``spec`` is there but cannot be read.
  """
  raw = (schema.metadata or {}).get(METADATA_KEY)
  if not raw:
    return None
  try:
    meta = json.loads(raw)
  except ValueError as e:
    raise spec_lib.SpecError(f"unreadable {METADATA_KEY.decode()} "
                             f"metadata: {e}") from e
  if not isinstance(meta, dict) or meta.get("spec") is None:
    return None
  return spec_lib.RunSpec.from_dict(meta["spec"])


def embeddings_schema(model: models_lib.ResolvedModel,
                      carried: Carried = (),
                      color_profile: str = rgb.COLOR_PROFILE_IGNORE,
                      run: Optional[spec_lib.RunSpec] = None) -> pa.Schema:
  fields = _base_fields() + [
      pa.field("embedding",
               pa.list_(pa.float32(), model.spec.output_width), nullable=False),
  ] + _size_fields()
  return _with_metadata(fields, carried,
                        table_metadata(model, color_profile, run))


# The predictions' taxonomy columns, with --taxa only.
TAXON_COLUMNS = ("label_taxon_id", "top_k_taxon_ids", "rollup_taxon_id",
                 "rollup_name", "rollup_rank", "rollup_score")


def _taxon_fields() -> List[pa.Field]:
  return [
      pa.field("label_taxon_id", pa.int64()),
      pa.field("top_k_taxon_ids", pa.list_(pa.int64())),
      pa.field("rollup_taxon_id", pa.int64()),
      pa.field("rollup_name", pa.string()),
      pa.field("rollup_rank", pa.string()),
      pa.field("rollup_score", pa.float32()),
  ]


def predictions_schema(model: models_lib.ResolvedModel,
                       carried: Carried = (),
                       color_profile: str = rgb.COLOR_PROFILE_IGNORE,
                       run: Optional[spec_lib.RunSpec] = None) -> pa.Schema:
  fields = _base_fields() + [
      pa.field("label_id", pa.int32(), nullable=False),
      pa.field("label", pa.string()),
      pa.field("score", pa.float32(), nullable=False),
      pa.field("top_k_label_ids", pa.list_(pa.int32())),
      pa.field("top_k_labels", pa.list_(pa.string())),
      pa.field("top_k_scores", pa.list_(pa.float32())),
  ] + (_taxon_fields() if model.label_taxa is not None else []) + (
      _size_fields())
  return _with_metadata(fields, carried,
                        table_metadata(model, color_profile, run))


def errors_schema(carried: Carried = (),
                  models: Sequence[models_lib.ResolvedModel] = (),
                  color_profile: str = rgb.COLOR_PROFILE_IGNORE,
                  run: Optional[spec_lib.RunSpec] = None) -> pa.Schema:
  fields = _base_fields() + [
      pa.field("stage", pa.string(), nullable=False),
      pa.field("error", pa.string(), nullable=False),
  ]
  meta = table_metadata(None, color_profile, run,
                        models=[m.describe() for m in models])
  return _with_metadata(fields, carried, meta)


def schema_for(model: models_lib.ResolvedModel, carried: Carried = (),
               color_profile: str = rgb.COLOR_PROFILE_IGNORE,
               run: Optional[spec_lib.RunSpec] = None) -> pa.Schema:
  """The embeddings or predictions schema of a model, by its kind."""
  if model.spec.kind == models_lib.EMBEDDER:
    return embeddings_schema(model, carried, color_profile, run)
  return predictions_schema(model, carried, color_profile, run)


def output_columns() -> Tuple[str, ...]:
  """Every column the tables write before the carried ones, in schema order.

  Read from the schemas themselves (one per kind of registered model, with
  and without ``--taxa``, and the errors table), so a column added to a
  schema is covered here too.
  """
  schemas = [errors_schema()]
  for spec in models_lib.REGISTRY.values():
    model = models_lib.ResolvedModel(spec=spec, path="", resize=spec.resize)
    schemas.append(schema_for(model))
    schemas.append(schema_for(dataclasses.replace(
        model, label_taxa=taxonomy.match_labels([], taxonomy.Taxa(
            kind=taxonomy.INATURALIST, rank={}, name={})))))
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
    if "rollup_taxon_id" in schema.names:
      columns.update(_taxon_columns(results))
  for name in SIZE_COLUMNS:
    columns[name] = [getattr(r, name) for r in results]
  columns.update(_carried_columns(refs, carried))
  return pa.Table.from_pydict(columns, schema=schema)


def _taxon_columns(results: Sequence) -> Dict[str, list]:
  """The taxonomy columns of a batch of PredictionResult."""
  taxa = [r.taxon_ids or (None,) * len(r.label_ids) for r in results]
  rollups = [r.rollup for r in results]
  return {
      "label_taxon_id": [t[0] for t in taxa],
      "top_k_taxon_ids": [list(t) for t in taxa],
      "rollup_taxon_id": [u.taxon_id if u else None for u in rollups],
      "rollup_name": [(u.name or None) if u else None for u in rollups],
      "rollup_rank": [(u.rank or None) if u else None for u in rollups],
      "rollup_score": [u.score if u else None for u in rollups],
  }


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


