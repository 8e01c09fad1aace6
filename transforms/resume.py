"""Resume: reuse what a dead attempt of the same job finished.

A run writes its tables as closed Parquet shards under
``OUT/_staging/<run_id>/`` (``sinks.WriteTable``) and commits them only at
the end.  When a run dies (a killed process, a cancelled Dataflow job), its
staging folder stays behind.  Running the same command again into the same
``--output_dir`` takes over the complete shards of such dead attempts:

1. ``plan_resume`` (launcher) lists the dead attempts' shards and keeps
   those whose footer reads, whose columns and types are this run's
   table's, and whose recorded run spec (``transforms.spec.RunSpec``: every
   model as decided, with its fingerprint, runtime, precision, preparation
   and top-k, and the colour-profile handling) equals this run's.  It reads
   footers only, never rows: the plan holds shard paths, as many as there
   are shards, and no photo ids.  A shard cut short by the kill has no
   footer and is ignored; so is a shard that records no spec (written by an
   older natvision): whether its rows were made the way this run makes
   them cannot be told.
2. In the graph, ``LeaveOutReused`` reads those shards' ``image_id`` (and
   ``model``) columns and joins them with the input's refs by image id
   (``CoGroupByKey``).  A photo of the input is *complete* when every model
   of the job has its row (or an error row for that model) in such shards,
   or when a photo-level error row (``model`` null: read, decode or prepare
   failed) is there (``reused_rows``).  Only complete photos are reused;
   the others go on to be processed again from scratch, for every model, so
   a photo never ends up half from the dead attempt and half from this one.
   A photo the input no longer names is not reused.
3. The complete photos' rows (the first copy of each, should a retried
   bundle have written one twice) are grouped by shard and copied into this
   run's staging with this run's schema (``_copy_rows``).  The commit then
   moves them like any other shard, and removes the dead attempts' folders.
   Each reused photo is counted as the ``reused_photos`` tally of the run
   summary (transforms/summary.py).

Each photo therefore still appears exactly once per model, in a table or in
the errors table.  Nothing in the launcher grows with the number of photos.
One job at a time may write into an output folder: a second job running at
the same time would be taken for a dead one.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import logging
from typing import (Dict, FrozenSet, Iterable, Iterator, List, NamedTuple,
                    Optional, Sequence, Tuple)

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import commit
from natvision.transforms import sinks
from natvision.transforms import spec as spec_lib
from natvision.transforms import storage

# The launcher's console shows natvision's INFO and WARNING lines.
_LOG = logging.getLogger("natvision")

# The run summary's tally of reused photos (run.json ``reused_photos``).
REUSED_PHOTOS = "reused_photos"


@dataclasses.dataclass(frozen=True)
class ReusableShard:
  """A dead attempt's whole shard that records this run's spec.

  Attributes:
    table: the table name (``embeddings/<model>``, ``errors``).
    path: the shard in the dead attempt's staging folder.
  """

  table: str
  path: str

  @property
  def model(self) -> Optional[str]:
    """The model of every row of a model's table; None for the errors
    table, whose rows name their own."""
    return None if self.table == sinks.ERRORS else self.table.split("/", 1)[1]


@dataclasses.dataclass(frozen=True)
class ResumePlan:
  """What this run may reuse: the dead attempts' whole, matching shards.

  Attributes:
    shards: the shards whose rows the graph may copy.
    dead_runs: the dead attempts' staging folders (removed by the commit).
    models: the run's models; a photo is complete when each has its row.
  """

  shards: Tuple[ReusableShard, ...] = ()
  dead_runs: Tuple[str, ...] = ()
  models: Tuple[str, ...] = ()


class DeadRow(NamedTuple):
  """Where one row of a photo sits in a reusable shard (keyed by its id)."""

  table: str
  path: str
  model: Optional[str]  # None: a photo-level error row


class KeptRow(NamedTuple):
  """A row to copy from a reusable shard (keyed by the shard's path)."""

  image_id: str
  model: Optional[str]


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


def _check_shard(path: str, schema: pa.Schema, run: spec_lib.RunSpec
                 ) -> Tuple[bool, Optional[str]]:
  """Whether a dead attempt's shard can be reused, from its footer alone.

  Returns:
    (True, None) for a shard this run may reuse; (False, why) for one it
    does not (why None: cut short, without a footer).

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
      found = pq.ParquetFile(f).schema_arrow
    except pa.ArrowInvalid as e:  # no footer: cut short by the kill
      logging.info("resume: ignoring %s, cut short (%s)", path, e)
      return False, None
  why = _why_not_reused(found, schema, run)
  return why is None, why


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
  """Lists the dead attempts' shards this run may reuse (footers only).

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
  shards = []
  refused: Dict[str, List[str]] = collections.defaultdict(list)
  for dead_run in dead:
    for table in tables:
      folder = dead_run + table.staged[len(own):]
      for path in commit.list_parquet(folder):
        ok, why = _check_shard(path, table.schema, run)
        if why is not None:
          refused[why].append(path)
        if ok:
          shards.append(ReusableShard(table=table.name, path=path))
  for why, paths in sorted(refused.items()):
    _LOG.warning("resume: not reusing %d shard(s) of dead attempts in %s "
                 "(first %s): %s; their photos are made again",
                 len(paths), staging_root, paths[0], why)
  if shards:
    logging.info("resume: %d whole shard(s) of %d dead attempt(s) in %s may "
                 "be reused; the job finds their complete photos",
                 len(shards), len(dead), staging_root)
  return ResumePlan(shards=tuple(shards), dead_runs=tuple(dead),
                    models=tuple(m.name for m in run.models))


def _shard_rows(shard: ReusableShard) -> Iterator[Tuple[str, DeadRow]]:
  """(image_id, DeadRow) for every row of a reusable shard."""
  columns = ["image_id"] if shard.model else ["image_id", "model"]
  with storage.failing_as("reading", shard.path), FileSystems.open(
      shard.path) as f:
    rows = pq.ParquetFile(f).read(columns=columns)
  ids = rows.column("image_id").to_pylist()
  models = (rows.column("model").to_pylist() if shard.model is None
            else [shard.model] * len(ids))
  for image_id, model in zip(ids, models):
    yield image_id, DeadRow(shard.table, shard.path, model)


def reused_rows(rows: Iterable[DeadRow], models: FrozenSet[str]
                ) -> List[Tuple[str, Optional[str]]]:
  """The rows to copy for one photo: (shard path, model) each; [] when the
  photo is not complete.

  Complete: a photo-level error row (model None) is there, or every one of
  ``models`` has a row.  A photo-level error wins (the photo has no other
  rows); of a row found twice (a retried bundle), the copy in the first
  shard by path is kept.
  """
  rows = list(rows)
  photo_error = any(r.model is None for r in rows)
  covered = {r.model for r in rows if r.model is not None}
  if not photo_error and not covered >= models:
    return []
  first: Dict[Tuple[str, Optional[str]], str] = {}
  for row in rows:
    if photo_error and row.model is not None:
      continue
    key = (row.table, row.model)
    first[key] = min(first.get(key, row.path), row.path)
  return sorted((path, model) for (_, model), path in first.items())


# Outputs of LeaveOutReused.
TODO = "todo"
KEPT = "kept"
TALLIES = "tallies"


def _join(item, models: FrozenSet[str]) -> Iterator:
  """(image_id, {refs, dead}) -> the ref to process, or the rows to copy
  (tagged ``KEPT``) and one ``reused_photos`` tally (tagged ``TALLIES``)."""
  image_id, grouped = item
  refs = list(grouped["refs"])
  if not refs:
    return  # in a dead attempt, no longer in the input
  kept = reused_rows(grouped["dead"], models)
  if not kept:
    yield from refs
    return
  for path, model in kept:
    yield beam.pvalue.TaggedOutput(KEPT, (path, KeptRow(image_id, model)))
  yield beam.pvalue.TaggedOutput(TALLIES, (REUSED_PHOTOS, 1))


def _copy_rows(item: Tuple[str, Iterable[KeptRow]],
               shards: Dict[str, ReusableShard],
               tables: Dict[str, commit.TableSpec]) -> Iterator:
  """(shard path, its kept rows) -> the rows copied into this run's staging.

  Yields the staged copy's path, and for the errors table also the rows
  (tagged ``ERROR_ROWS``), which the run summary counts.  Holds one shard.
  """
  path, kept = item
  keep = set(kept)
  shard = shards[path]
  table = tables[shard.table]
  with storage.failing_as("reading", path), FileSystems.open(path) as f:
    rows = pq.ParquetFile(f).read()
  ids = rows.column("image_id").to_pylist()
  models = (rows.column("model").to_pylist() if shard.model is None
            else [shard.model] * len(ids))
  seen = set()
  mask = []
  for key in zip(ids, models):
    key = KeptRow(*key)
    mask.append(key in keep and key not in seen)
    seen.add(key)
  rows = rows.filter(pa.array(mask, pa.bool_()))
  rows = pa.Table.from_arrays(
      [rows.column(n) for n in table.schema.names], schema=table.schema)
  name = hashlib.sha256(path.encode()).hexdigest()[:20]
  target = FileSystems.join(
      table.staged, f"{sinks.FILE_PREFIX}-reused-{name}{sinks.FILE_SUFFIX}")
  data = io.BytesIO()
  pq.write_table(rows, data, compression="zstd")
  storage.write_bytes(target, data.getvalue())
  yield target
  if shard.table == sinks.ERRORS:
    yield beam.pvalue.TaggedOutput(ERROR_ROWS, rows)


# Outputs of LeaveOutReused besides TODO and TALLIES: the staged copies'
# paths, and the reused error rows.
WRITTEN = "written"
ERROR_ROWS = "error_rows"


class LeaveOutReused(beam.PTransform):
  """PCollection[ImageRef] -> the refs still to process, and the reused
  photos' rows copied into this run's staging.

  The join of step 2 of the module docstring; the launcher's plan names
  only shards.

  Returns:
    A dict of PCollections: ``todo`` (ImageRef: the photos to process),
    ``written`` (paths of the staged copies), ``error_rows`` (pa.Table of
    the reused error rows) and ``tallies`` (one ``("reused_photos", 1)``
    per reused photo).
  """

  def __init__(self, plan: ResumePlan, tables: Sequence[commit.TableSpec]):
    super().__init__()
    self._plan = plan
    self._tables = {t.name: t for t in tables}

  def expand(self, refs):
    plan = self._plan
    dead = (refs.pipeline
            | "ReusableShards" >> beam.Create(list(plan.shards))
            | "Reshuffle" >> beam.Reshuffle()
            | "ReadIds" >> beam.FlatMap(_shard_rows))
    joined = (
        {"refs": refs | "KeyRefs" >> beam.Map(lambda r: (r.image_id, r)),
         "dead": dead}
        | "JoinById" >> beam.CoGroupByKey()
        | "Decide" >> beam.FlatMap(_join, frozenset(plan.models))
        .with_outputs(KEPT, TALLIES, main=TODO))
    copied = (joined[KEPT]
              | "ByShard" >> beam.GroupByKey()
              | "CopyRows" >> beam.FlatMap(
                  _copy_rows, {s.path: s for s in plan.shards}, self._tables)
              .with_outputs(ERROR_ROWS, main=WRITTEN))
    return {TODO: joined[TODO], WRITTEN: copied[WRITTEN],
            ERROR_ROWS: copied[ERROR_ROWS], TALLIES: joined[TALLIES]}
