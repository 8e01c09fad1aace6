"""Resume: reuse what a dead attempt of the same job finished.

A run writes its tables as closed Parquet shards under
``OUT/_staging/<run_id>/`` (``sinks.WriteTable``) and commits them only at
the end.  When a run dies (a killed process, a cancelled Dataflow job), its
staging folder stays behind.  Running the same command again into the same
``--output_dir`` takes over the complete shards of such dead attempts:

1. ``plan_resume`` (launcher) lists the dead attempts' shards, keeps those
   whose footer reads, whose columns and types are this run's table's, and
   whose recorded run spec (``transforms.spec.RunSpec``: every model as
   decided, with its fingerprint, runtime, precision, preparation and
   top-k, and the colour-profile handling) equals this run's, and reads
   only their id columns.  A shard cut short by the kill has no footer and
   is ignored; so is a shard that records no spec (written by an older
   natvision): whether its rows were made the way this run makes them
   cannot be told.
2. A photo is *complete* when every model of the job has its row (or an
   error row for that model) in such shards, or when a photo-level error row
   (``model`` null: read, decode or prepare failed) is there.  Only complete
   photos are reused; the others are processed again from scratch, for every
   model, so a photo never ends up half from the dead attempt and half from
   this one.
3. In the pipeline, ``ReuseShards`` copies the complete photos' rows (the
   first copy of each, should a retried bundle have written one twice) into
   this run's staging with this run's schema, and the input leaves the
   complete photos out.  The commit then moves them like any other shard,
   and removes the dead attempts' folders.

Each photo therefore still appears exactly once per model, in a table or in
the errors table.  The launcher holds the ids of reused photos in memory
(about 100 bytes each).  One job at a time may write into an output folder:
a second job running at the same time would be taken for a dead one.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import logging
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms import commit
from transforms import sinks
from transforms import spec as spec_lib
from transforms import storage

# The launcher's console shows natvision's INFO and WARNING lines.
_LOG = logging.getLogger("natvision")


@dataclasses.dataclass(frozen=True)
class ReusedShard:
  """Rows of one dead attempt's shard that this run takes over.

  Attributes:
    table: the table name (``embeddings/<model>``, ``errors``).
    path: the shard in the dead attempt's staging folder.
    keep: (image_id, model) of the rows to copy; model is None for a
      photo-level error row.
  """

  table: str
  path: str
  keep: FrozenSet[Tuple[str, Optional[str]]]


@dataclasses.dataclass(frozen=True)
class ResumePlan:
  """What this run reuses: the complete photos and where their rows are."""

  complete: FrozenSet[str] = frozenset()
  shards: Tuple[ReusedShard, ...] = ()
  dead_runs: Tuple[str, ...] = ()

  @property
  def reused_photos(self) -> int:
    return len(self.complete)


def _why_not_reused(found: pa.Schema, wanted: pa.Schema,
                    run: spec_lib.RunSpec) -> Optional[str]:
  """Why a dead attempt's shard cannot be reused; None when it can.

  It can when its columns and types are the table's and its recorded spec
  equals this run's.
  """
  if found.remove_metadata() != wanted.remove_metadata():
    return "its columns differ from this run's"
  try:
    recorded = sinks.recorded_spec(found)
  except spec_lib.SpecError as e:
    return f"its run spec cannot be read ({e})"
  if recorded is None:
    return ("it records no run spec (written by an older natvision), so "
            "how its rows were made cannot be compared")
  if recorded != run:
    return ("it was made another way (" +
            "; ".join(recorded.differences(run)) + ", recorded != this run)")
  return None


def _read_ids(path: str, schema: pa.Schema, run: spec_lib.RunSpec,
              with_model: bool
              ) -> Tuple[Optional[List[Tuple[str, Optional[str]]]],
                         Optional[str]]:
  """(image_id, model) of every row of a complete, matching shard.

  Returns:
    (rows, None) for a shard this run reuses; (None, why) for one it does
    not: cut short (no footer), other columns, or another run spec.

  Raises:
    storage.StorageError: the shard could not be opened (a storage fault,
      as opposed to a file cut short).
  """
  try:
    f = FileSystems.open(path)
  except Exception as e:  # noqa: BLE001
    raise storage.StorageError(f"reading {path} failed: {e}") from e
  with f:
    try:
      shard = pq.ParquetFile(f)
    except pa.ArrowInvalid as e:  # no footer: cut short by the kill
      logging.info("resume: ignoring %s, cut short (%s)", path, e)
      return None, None
    why = _why_not_reused(shard.schema_arrow, schema, run)
    if why is not None:
      return None, why
    columns = ["image_id", "model"] if with_model else ["image_id"]
    table = shard.read(columns=columns)
  ids = table.column("image_id").to_pylist()
  models = (table.column("model").to_pylist() if with_model
            else [None] * len(ids))
  return list(zip(ids, models)), None


def dead_attempts(output_dir: str, current_run_id: str) -> List[str]:
  """Staging folders of other runs under ``output_dir/_staging``."""
  root = FileSystems.join(output_dir, "_staging")
  runs = set()
  for path in storage.match(FileSystems.join(root, "*", "**")):
    rest = path[len(root.rstrip("/")) + 1:]
    run = rest.split("/", 1)[0]
    if run and run != current_run_id and "/" in rest:
      runs.add(FileSystems.join(root, run))
  return sorted(runs)


def plan_resume(output_dir: str, run_id: str,
                tables: Sequence[commit.TableSpec], run: spec_lib.RunSpec
                ) -> ResumePlan:
  """Finds the complete photos of dead attempts and the shards holding them.

  Args:
    output_dir: this run's ``--output_dir``.
    run_id: this run's id (its own staging folder is not a dead attempt).
    tables: this run's tables; each dead attempt's tables are found at the
      same place under its staging folder.
    run: this run's spec; only shards recording an equal one are reused.

  Raises:
    storage.StorageError: a listing or a read failed.
  """
  staging_root = FileSystems.join(output_dir, "_staging")
  dead = dead_attempts(output_dir, run_id)
  if not dead:
    return ResumePlan()
  own = commit.staging_dir(output_dir, run_id).rstrip("/")
  # (table, image_id, model) -> the first shard holding that row.
  first: Dict[Tuple[str, str, Optional[str]], str] = {}
  covered: Dict[str, set] = collections.defaultdict(set)
  photo_errors = set()
  model_set = frozenset(m.name for m in run.models)
  refused: Dict[str, List[str]] = collections.defaultdict(list)
  for dead_run in dead:
    for table in tables:
      folder = dead_run + table.staged[len(own):]
      is_errors = table.name == sinks.ERRORS
      table_model = None if is_errors else table.name.split("/", 1)[1]
      for path in commit.list_parquet(folder):
        rows, why = _read_ids(path, table.schema, run, with_model=is_errors)
        if why is not None:
          refused[why].append(path)
        if rows is None:
          continue
        for image_id, model in rows:
          model = model if is_errors else table_model
          first.setdefault((table.name, image_id, model), path)
          if model is None:
            photo_errors.add(image_id)
          elif model in model_set:
            covered[image_id].add(model)
  complete = frozenset(photo_errors | {
      i for i, done in covered.items() if done >= model_set})
  keep: Dict[Tuple[str, str], set] = collections.defaultdict(set)
  for (table, image_id, model), path in first.items():
    if image_id not in complete:
      continue
    if image_id in photo_errors and model is not None:
      continue  # a photo-level error wins: the photo has no other rows
    keep[(table, path)].add((image_id, model))
  shards = tuple(ReusedShard(table=t, path=p, keep=frozenset(ids))
                 for (t, p), ids in sorted(keep.items()))
  for why, paths in sorted(refused.items()):
    _LOG.warning("resume: not reusing %d shard(s) of dead attempts in %s "
                 "(first %s): %s; their photos are made again",
                 len(paths), staging_root, paths[0], why)
  if complete:
    logging.info("resume: reusing %d photo(s) from %d dead attempt(s) in %s",
                 len(complete), len(dead), staging_root)
  return ResumePlan(complete=complete, shards=shards, dead_runs=tuple(dead))


def _copy_rows(shard: ReusedShard, tables: Dict[str, commit.TableSpec]
               ) -> Iterable:
  """Copies a reused shard's kept rows into this run's staging.

  Yields the staged copy's path, and for the errors table also the rows
  (tagged ``ERROR_ROWS``), which the run summary counts.
  """
  table = tables[shard.table]
  with storage.failing_as("reading", shard.path), FileSystems.open(
      shard.path) as f:
    rows = pq.ParquetFile(f).read()
  ids = rows.column("image_id").to_pylist()
  models = rows.column("model").to_pylist()
  if shard.table != sinks.ERRORS:
    models = [shard.table.split("/", 1)[1]] * len(ids)
  seen = set()
  mask = []
  for key in zip(ids, models):
    mask.append(key in shard.keep and key not in seen)
    seen.add(key)
  rows = rows.filter(pa.array(mask, pa.bool_()))
  rows = pa.Table.from_arrays(
      [rows.column(n) for n in table.schema.names], schema=table.schema)
  name = hashlib.sha256(shard.path.encode()).hexdigest()[:20]
  target = FileSystems.join(
      table.staged, f"{sinks.FILE_PREFIX}-reused-{name}{sinks.FILE_SUFFIX}")
  data = io.BytesIO()
  pq.write_table(rows, data, compression="zstd")
  storage.write_bytes(target, data.getvalue())
  yield target
  if shard.table == sinks.ERRORS:
    yield beam.pvalue.TaggedOutput(ERROR_ROWS, rows)


# Outputs of ReuseShards: the staged copies' paths, and the reused error rows.
WRITTEN = "written"
ERROR_ROWS = "error_rows"


class ReuseShards(beam.PTransform):
  """PBegin -> {written: staged copies' paths, error_rows: pa.Table}."""

  def __init__(self, plan: ResumePlan, tables: Sequence[commit.TableSpec]):
    super().__init__()
    self._plan = plan
    self._tables = {t.name: t for t in tables}

  def expand(self, pbegin):
    return (pbegin
            | "ReusedShards" >> beam.Create(list(self._plan.shards))
            | "CopyRows" >> beam.FlatMap(_copy_rows, self._tables)
            .with_outputs(ERROR_ROWS, main=WRITTEN))
