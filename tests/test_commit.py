"""transforms/commit.py: the commit's invariant under every failing call.

A run's tables replace the previous run's.  Whatever storage call fails,
and wherever the commit stops, each table holds exactly the previous rows
or exactly the new rows (never fewer, never both), the failure is raised
(never read as "nothing there"), and running the commit again converges to
the new tables with nothing left in staging.

Storage here is ``faulty://`` (tests/faulty_fs.py): local files behind a
Beam filesystem that fails the k-th call of a kind.  A clean commit is
recorded first; then every call it made is failed in turn, in-process.
tests/test_storage_faults.py makes the same checks through the loopback GCS
server for whole jobs.
"""
# pylint: disable=redefined-outer-name

import collections
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import faulty_fs
from tests.faulty_fs import FAULTS
from natvision.transforms import commit, sinks, storage

SCHEMA = pa.schema([("image_id", pa.string())])
TABLES = ("embeddings/inaturalist_v2", "errors")
PREVIOUS = {"embeddings/inaturalist_v2": ["a", "b", "c"], "errors": ["x"]}
NEW = {"embeddings/inaturalist_v2": ["b", "c", "d", "e"], "errors": []}
RUN_ID = "20240101T000000Z-00000000"


def _write(path, ids):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.table({"image_id": ids}, schema=SCHEMA), path)


def _shard(n, of):
  return f"{sinks.FILE_PREFIX}-{n:05d}-of-{of:05d}{sinks.FILE_SUFFIX}"


def _make_output(root):
  """The previous run's tables and the new run's staged shards, locally.

  Returns:
    (output folder as faulty://, the staged shards the writes emitted).
  """
  for table, ids in PREVIOUS.items():
    _write(os.path.join(root, table, "old-" + _shard(0, 1)), ids)
  staged = []
  for table, ids in NEW.items():
    # Two shards per table where there are rows; none for an empty table
    # (the commit then writes an empty file with the schema).
    for n, part in enumerate((ids[:2], ids[2:]) if ids else ()):
      path = os.path.join(root, commit.STAGING, RUN_ID, table, _shard(n, 2))
      _write(path, part)
      staged.append(faulty_fs.remote(path))
  return faulty_fs.remote(root), staged


def _specs(out):
  staging = commit.staging_dir(out, RUN_ID)
  return [commit.TableSpec(name=t, staged=commit.table_dir(staging, t),
                           final=commit.table_dir(out, t), schema=SCHEMA)
          for t in TABLES], staging


def _rows(out):
  """{table: Counter(image_id)} of what a reader of ``out`` finds."""
  found = {}
  for table in TABLES:
    folder = faulty_fs.local(commit.table_dir(out, table))
    ids = collections.Counter()
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
      if name.endswith(sinks.FILE_SUFFIX):
        ids.update(pq.read_table(os.path.join(folder, name))
                   .column("image_id").to_pylist())
    found[table] = ids
  return found


def _state(rows):
  return {t: collections.Counter(ids) for t, ids in rows.items()}


@pytest.fixture(autouse=True)
def no_faults():
  FAULTS.clear()
  yield
  FAULTS.clear()


def _commit(out, staged):
  tables, staging = _specs(out)
  commit.commit_tables(tables, staging, files=staged)


def _left_in_staging(out):
  """Files left under ``_staging`` (as on an object store, empty folders
  do not count)."""
  root = os.path.join(faulty_fs.local(out), commit.STAGING)
  return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


def test_a_clean_commit_replaces_every_table(tmp_path):
  out, staged = _make_output(str(tmp_path / "out"))
  assert _rows(out) == _state(PREVIOUS)
  _commit(out, staged)
  assert _rows(out) == _state(NEW)
  assert not _left_in_staging(out)
  # The empty table got one file with the schema, so readers find it.
  errors = faulty_fs.local(commit.table_dir(out, "errors"))
  (name,) = os.listdir(errors)
  assert pq.read_schema(os.path.join(errors, name)).names == ["image_id"]


def _recorded_calls(tmp_path):
  out, staged = _make_output(str(tmp_path / "clean"))
  FAULTS.clear()
  _commit(out, staged)
  counts = collections.Counter(op for op, _ in FAULTS.log)
  FAULTS.clear()
  return counts


def _complete(rows, table):
  """Whether a table holds one run's rows whole: exactly the new ones, or
  every previous row (plus, at most, some of the new ones)."""
  previous, new = _state(PREVIOUS)[table], _state(NEW)[table]
  return rows == new or (not previous - rows and not rows - (previous + new))


@pytest.mark.parametrize("for_good", [False, True], ids=["once", "for_good"])
def test_every_call_of_the_commit_failed_in_turn(tmp_path, for_good):
  """Failed once (a storage hiccup the commit outlives, or not): each table
  is the previous or the new one.  Failed for good: the commit cannot
  always finish a table it started replacing; it then says so, and a table
  never loses a run's rows.  Either way a rerun converges."""
  counts = _recorded_calls(tmp_path)
  # The commit reads, writes, moves and deletes: each kind is exercised.
  assert {"match", "exists", "create", "rename", "delete"} <= set(counts)
  cases = [(op, k) for op in sorted(counts) for k in range(1, counts[op] + 1)]
  assert len(cases) >= 15
  problems = []
  for i, (op, k) in enumerate(cases):
    out, staged = _make_output(str(tmp_path / f"case{i}"))
    FAULTS.fail(op, k, for_good=for_good)
    error = None
    try:
      _commit(out, staged)
    except Exception as e:  # noqa: BLE001 - whatever the commit raises
      error = e
    fired = FAULTS.fired
    FAULTS.clear()
    what = f"{op} call {k} of {counts[op]}"
    if not fired:
      problems.append(f"{what}: the call was never made")
      continue
    if error is None:
      problems.append(f"{what}: the commit ended as if nothing failed")
    after = _rows(out)
    both_said = error is not None and "rows of both" in str(error)
    for table in TABLES:
      exact = after[table] in (_state(PREVIOUS)[table], _state(NEW)[table])
      if not (exact or (both_said and _complete(after[table], table))):
        problems.append(f"{what}: {table} holds {dict(after[table])} "
                        f"({error})")
    # Run again, as a runner retrying the step or a user rerunning it.
    _commit(out, staged)
    if _rows(out) != _state(NEW) or _left_in_staging(out):
      problems.append(f"{what}: no convergence: {_rows(out)}")
  assert problems == []


def test_a_failed_listing_is_an_error_never_an_empty_table(tmp_path):
  """The first listing of the table's previous files fails: the commit
  must not take the table for empty (and keep the old rows beside the
  new)."""
  out, staged = _make_output(str(tmp_path / "out"))
  FAULTS.fail("match", 1)
  with pytest.raises(storage.StorageError, match="listing .*failed"):
    _commit(out, staged)
  assert FAULTS.fired == 1
  assert _rows(out) == _state(PREVIOUS)


def test_the_faulty_filesystem_fails_only_the_chosen_call(tmp_path):
  path = faulty_fs.remote(str(tmp_path / "a.txt"))
  storage.write_bytes(path, b"a")
  FAULTS.fail("exists", 2)
  assert storage.exists(path)
  with pytest.raises(storage.StorageError, match="403"):
    storage.exists(path)
  assert storage.exists(path) and FAULTS.fired == 1
  assert storage.match(faulty_fs.remote(str(tmp_path)) + "/*") == [path]
  shutil.rmtree(tmp_path)
  assert storage.match(faulty_fs.remote(str(tmp_path)) + "/*") == []


def test_run_timings_adds_pipeline_and_commit_to_the_launchers_phases():
  launch = {"launch": 1.5, "model_checks": 30.25}
  timings = commit.run_timings(launch, 100.0, commit_started=108.0,
                               ended=108.5)
  assert timings == {"launch": 1.5, "model_checks": 30.25, "pipeline": 8.0,
                     "commit": 0.5}
  assert commit.format_timings(dict(sorted(timings.items()))) == (
      "launch 1.5s, model checks 30.2s, pipeline 8.0s, commit 0.5s")
  assert commit.run_timings(launch, 100.0, None, 108.5) == launch
