"""The commit of a run: where tables are staged, and how they are moved in.

A run never writes where readers look.  Its table shards go to
``OUT/_staging/<run_id>/<table>/`` (``sinks.WriteTable``), and the
pipeline's last step, ``CommitRun``, which runs once every table is
written:

1. writes a plan, ``_commit_plan.json``, naming the shards each table ends
   with (only the shards the writes emitted: a failed and retried bundle's
   leftovers are never committed);
2. for each table, lists the previous run's files, moves the new shards in
   and deletes the previous files (a failure between the two is finished
   before the step fails, so a table never holds two runs' rows);
3. removes the staging folder and those of dead attempts it took over
   (transforms/resume.py), then calls the job's ``finish`` (run.json,
   ingestion's ``_SUCCESS`` markers, under ``OUT/_markers/``, outside the
   tables' folders).

A retried commit follows the plan, so it finishes the same commit.  Every
storage call goes through transforms/storage.py: a failed listing is an
error, never "no files".  This module is the protocol's one home; the jobs
(pipelines/) only choose the layout (``plan_layout``) and what ``finish``
writes.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import logging
import os
import shutil
import time
from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import models as models_lib
from natvision.transforms import rgb
from natvision.transforms import sinks
from natvision.transforms import spec as spec_lib
from natvision.transforms import storage

STAGING = "_staging"
SUCCESS_MARKER = "_SUCCESS"
# Where ingestion's markers go, outside the tables (``marker_path``).
MARKERS = "_markers"


def staging_dir(output_dir: str, run_id: str) -> str:
  return FileSystems.join(output_dir, STAGING, run_id)


def table_dir(root: str, table: str, model: Optional[str] = None) -> str:
  return FileSystems.join(root, table, model) if model else FileSystems.join(
      root, table)



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
  return storage.match(FileSystems.join(directory, "*" + sinks.FILE_SUFFIX))


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
            table.staged,
            f"{sinks.FILE_PREFIX}-00000-of-00001{sinks.FILE_SUFFIX}")
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

@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a run stages and commits its tables."""

  output_dir: str
  run_id: str
  tables: Tuple[TableSpec, ...]
  # Staging folders of dead attempts whose rows this run takes over; they
  # are removed once the commit is done (transforms/resume.py).
  reused_from: Tuple[str, ...] = ()

  @property
  def staging(self) -> str:
    return staging_dir(self.output_dir, self.run_id)

  def table(self, name: str) -> TableSpec:
    return next(t for t in self.tables if t.name == name)

  def model_table(self, model: models_lib.ResolvedModel) -> TableSpec:
    return self.table(table_name(model))


def table_name(model: models_lib.ResolvedModel) -> str:
  kind = (sinks.EMBEDDINGS if model.spec.kind == models_lib.EMBEDDER
          else sinks.PREDICTIONS)
  return f"{kind}/{model.name}"


def new_run_id() -> str:
  import uuid  # pylint: disable=import-outside-toplevel
  return datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def plan_layout(output_dir: str, models: Sequence[models_lib.ResolvedModel],
                carried: sinks.Carried, run_id: str,
                partition: Optional[str] = None,
                color_profile: Optional[str] = None,
                run: Optional[spec_lib.RunSpec] = None) -> Layout:
  """Names every table's staging and final folder.

  Args:
    partition: a sub-folder under each table (``snapshot_date=...``), for
      jobs that add one partition per run.
    color_profile: ``--color_profile``, recorded in every table's metadata;
      by default the run's (``ignore`` without a run).
    run: the run's spec (``transforms.spec.for_run``), recorded in every
      table's metadata; the launcher always passes it.

  Raises:
    ValueError: ``color_profile`` differs from the run's.
  """
  if run is not None:
    if color_profile not in (None, run.color_profile):
      raise ValueError(f"colour profile {color_profile!r} differs from the "
                       f"run spec's {run.color_profile!r}")
    color_profile = run.color_profile
  color_profile = color_profile or rgb.COLOR_PROFILE_IGNORE
  staging = staging_dir(output_dir, run_id)

  def under(root, *parts):
    path = table_dir(root, *parts)
    return FileSystems.join(path, partition) if partition else path

  tables = []
  for model in models:
    kind, name = table_name(model).split("/")
    tables.append(TableSpec(
        name=table_name(model), staged=under(staging, kind, name),
        final=under(output_dir, kind, name),
        schema=sinks.schema_for(model, carried, color_profile, run)))
  tables.append(TableSpec(
      name=sinks.ERRORS, staged=under(staging, sinks.ERRORS),
      final=under(output_dir, sinks.ERRORS),
      schema=sinks.errors_schema(carried, models, color_profile, run)))
  return Layout(output_dir=output_dir, run_id=run_id, tables=tuple(tables))



class CommitRun(beam.PTransform):
  """Commits a run's staged tables inside the pipeline, then finishes it.

  Takes the file names every table's write emits once its files are final,
  so the step runs after the last table is written, on a worker.  A job
  launched from a Dataflow template, whose launcher does not wait, thus
  still commits its own tables.  ``finish(layout, inputs, commit_started)``
  is called after the commit (to write the run summary) with the number of
  inputs and the time the commit step began (for ``run_timings``).

  Args:
    layout: the run's tables.
    finish: a picklable function of (layout, inputs).
    inputs: a singleton side input with the number of inputs.
    before: a picklable function of (layout), called in the commit step
      before anything moves (ingestion removes its _SUCCESS markers).
  """

  def __init__(self, layout: Layout, finish, inputs, before=None):
    super().__init__()
    self._layout = layout
    self._finish = finish
    self._inputs = inputs
    self._before = before

  def expand(self, written):
    return (written
            | "ListFiles" >> beam.combiners.ToList()
            | "Commit" >> beam.Map(_commit_and_finish, self._layout,
                                   self._finish, self._inputs, self._before))


def _commit_and_finish(files: List[str], layout: Layout, finish, inputs: int,
                       before=None):
  # Every table is written by now; only the shards the writes emitted are
  # committed (see commit_tables).
  commit_started = time.time()
  if before is not None:
    before(layout)
  commit_tables(layout.tables, layout.staging, files)
  for dead in layout.reused_from:
    remove_tree(dead)  # what a dead attempt left, now taken over
  if layout.reused_from:
    remove_empty_parent(layout.staging)
  if finish is not None:
    finish(layout, inputs, commit_started)
  return layout.run_id



def write_json(path: str, payload: dict) -> None:
  storage.write_bytes(
      path, json.dumps(payload, indent=2, sort_keys=True).encode())



# The phases of a run's ``timings``, in the order they happen.
TIMING_PHASES = ("launch", "model_checks", "pipeline", "commit")


def run_timings(launch_timings: Dict[str, float], started_ts: float,
                commit_started: Optional[float], ended: float
                ) -> Dict[str, float]:
  """Seconds per phase of a run, for its summary.

  ``launch`` (flags, stand-ins, the input check) and ``model_checks``
  (loading, converting and checking the models) come from the launcher
  (``launch_timings``, the summary's base); ``pipeline`` runs from the
  job's ``started_ts`` (after the model checks) to the commit step, and
  ``commit`` from there to ``ended`` (seconds since the epoch).
  """
  timings = dict(launch_timings or {})
  if commit_started is not None:
    timings["pipeline"] = round(max(commit_started - started_ts, 0.0), 3)
    timings["commit"] = round(max(ended - commit_started, 0.0), 3)
  return timings


def format_timings(timings: dict) -> str:
  """'launch 1.2s, model checks 30.1s, pipeline 8.0s, commit 0.4s'."""
  return ", ".join(f"{phase.replace('_', ' ')} {timings[phase]:.1f}s"
                   for phase in TIMING_PHASES if phase in timings)


def iso(ts: float) -> str:
  return datetime.datetime.fromtimestamp(
      ts, datetime.timezone.utc).isoformat(timespec="seconds")



# Ingestion marks each committed partition with a _SUCCESS file, kept
# outside the tables' folders: OUT/_markers/<table>/<partition>/_SUCCESS.
# A table folder then holds Parquet files only, which every reader opens
# (Polars refuses a folder holding files of other extensions).


def marker_path(output_dir: str, table_name: str, partition: str) -> str:
  """Where the ``_SUCCESS`` of one committed partition lies.

  Args:
    output_dir: the job's ``--output_dir``.
    table_name: e.g. ``embeddings/inaturalist_v2`` or ``errors``.
    partition: e.g. ``snapshot_date=2024-01-07``.
  """
  return FileSystems.join(output_dir, MARKERS, *table_name.split("/"),
                          partition, SUCCESS_MARKER)


def _marker(layout: Layout, table: TableSpec) -> str:
  return marker_path(layout.output_dir, table.name, _basename(table.final))


def unmark_partition(layout: Layout) -> None:
  """Removes the date's ``_SUCCESS`` markers, before its files are replaced.

  Also the ones earlier versions wrote inside the partition folders, so a
  rerun of a date leaves its table folders holding Parquet files only.
  """
  candidates = [path for t in layout.tables
                for path in (_marker(layout, t),
                             FileSystems.join(t.final, SUCCESS_MARKER))]
  markers = [path for path in candidates if storage.exists(path)]
  if markers:
    FileSystems.delete(markers)


def write_markers(layout: Layout, snapshot_date: str, committed: str
                  ) -> None:
  """Writes each partition's ``_SUCCESS`` (a small JSON manifest), last.

  Args:
    snapshot_date: the partition's date, ``YYYY-MM-DD``.
    committed: when the run ended (ISO 8601).
  """
  for table in layout.tables:
    write_json(_marker(layout, table), {
        "run_id": layout.run_id,
        "snapshot_date": snapshot_date,
        "table": table.name,
        "rows": count_rows(table.final),
        "files": [FileSystems.split(p)[1]
                  for p in list_parquet(table.final)],
        "committed": committed,
    })


def remove_dead_attempts(output_dir: str, prefix: str, keep: str
                         ) -> List[str]:
  """Removes what dead runs whose id starts with ``prefix`` left in staging.

  Args:
    output_dir: the job's ``--output_dir``.
    prefix: run ids to consider (ingestion: the runs of one date).
    keep: this run's id.

  Returns:
    The staging folders removed.

  Raises:
    storage.StorageError: a listing or a deletion failed.
  """
  root = FileSystems.join(output_dir, STAGING)
  files = storage.match(FileSystems.join(root, prefix + "*", "**"))
  runs: Dict[str, List[str]] = {}
  for path in files:
    run_id = path[len(root):].lstrip("/").split("/", 1)[0]
    if run_id.startswith(prefix) and run_id != keep:
      runs.setdefault(run_id, []).append(path)
  if "://" not in root and os.path.isdir(root):
    # Local folders can outlive their files (a commit that died after
    # moving them): those are stale too.
    for run_id in os.listdir(root):
      if run_id.startswith(prefix) and run_id != keep:
        runs.setdefault(run_id, [])
  for run_id, paths in sorted(runs.items()):
    folder = FileSystems.join(root, run_id)
    logging.info("removing %s, left by a run that did not finish", folder)
    if "://" in folder:
      FileSystems.delete(paths)
    else:
      shutil.rmtree(folder, ignore_errors=True)
  if "://" not in root and os.path.isdir(root) and not os.listdir(root):
    os.rmdir(root)
  return [FileSystems.join(root, r) for r in sorted(runs)]
