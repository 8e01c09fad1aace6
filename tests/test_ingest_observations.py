"""The ingest_observations job over a sequence of synthetic snapshots.

Real photo files, real (tiny) TF Hub models, real Parquet read back.  The
sequence: a first snapshot; a second with new observations, an upgrade from
needs_id to research, a photo shared by two observations and a deleted photo
file, then a rerun of the same date; a third (Parquet) snapshot with a model
added; a run whose commit step fails inside the pipeline, and its rerun; a
last run where the deleted photo has used up --max_attempts.  After each
step every model's table holds exactly the photos it should, each at most
once.  The commit, the summary and the markers are the pipeline's own last
steps: a pipeline run with no launcher code after it leaves the same result.
"""

import dataclasses
import datetime
import glob
import json
import os
import time

import apache_beam as beam
import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from natvision.pipelines import launch
from natvision.pipelines import ingest_observations as ingest
from natvision.transforms.config import ConfigError
from tests.snapshot_gen import FUNGI, SPECIES, SyntheticINat
from natvision.transforms import commit, run_summary, sinks, snapshots

EMB = "inaturalist_v2"
FUN = "fungi_mobile_v1"
IRV = "inception_resnet_v2"
TABLES = {EMB: "embeddings/inaturalist_v2", FUN: "predictions/fungi_mobile_v1",
          IRV: "embeddings/inception_resnet_v2"}
D1, D2, D3, D4, D5 = ("2024-01-07", "2024-01-14", "2024-01-21", "2024-01-28",
                      "2024-02-04")


def _marker(out, table, partition_folder):
  """Where a committed partition's _SUCCESS lies: outside the table."""
  return os.path.join(out, "_markers", table,
                      os.path.basename(partition_folder), "_SUCCESS")


def _files(out, table):
  return sorted(glob.glob(os.path.join(out, table, "snapshot_date=*",
                                       "*.parquet")))


def table_rows(out, table):
  """Every row of a partitioned table, with its partition date."""
  rows = []
  for path in _files(out, table):
    date = os.path.basename(os.path.dirname(path)).split("=", 1)[1]
    for row in pq.read_table(path).to_pylist():
      rows.append(dict(row, snapshot_date=date))
  return rows


def placed(out, model):
  """{image_id: partition date} of a model's table; fails on a duplicate."""
  ids = {}
  for row in table_rows(out, TABLES[model]):
    assert row["image_id"] not in ids, (model, row["image_id"])
    ids[row["image_id"]] = row["snapshot_date"]
  return ids


def errors_by_date(out):
  found = {}
  for row in table_rows(out, "errors"):
    found.setdefault(row["snapshot_date"], []).append(
        (row["image_id"], row["model"], row["stage"]))
  return {d: sorted(v, key=str) for d, v in found.items()}


def state(out):
  return ({m: placed(out, m) for m in TABLES}, errors_by_date(out))


def _argv(world, snapshot, out, models, date, tiny_models, *extra):
  return ["--snapshot_dir", snapshot, "--photo_uri_template", world.template,
          "--snapshot_date", date, "--output_dir", out, "--models",
          ",".join(models), "--model_root", tiny_models, "--route",
          f"{FUN}={FUNGI}", "--runtime", "tf", "--batch_size", "2",
          "--top_k", "2", *extra]


def _ids(*photos):
  return {str(p.photo_id) for p in photos}


class _Killed(RuntimeError):
  pass


@pytest.fixture(scope="module")
def sequence(tiny_models, tmp_path_factory):
  """Runs every step once; records the tables after each."""
  root = tmp_path_factory.mktemp("ingest")
  world = SyntheticINat(str(root / "world"), seed=3)
  out = str(root / "out")
  steps = {}

  def run(name, snapshot, models, date, *extra):
    report = ingest.run(_argv(world, snapshot, out, models, date,
                              tiny_models, *extra))
    steps[name] = {"report": report, "state": state(out)}
    return report

  # Snapshot 1: two research observations (one with two photos, one a
  # fungus), one needs_id and one casual; one malformed photos line.
  raven = world.observe(SPECIES["raven"], photos=2)
  agaric = world.observe(SPECIES["fly_agaric"], extension="png")
  daisy = world.observe(SPECIES["daisy"], quality_grade="needs_id")
  bolete_casual = world.observe(SPECIES["bolete"], quality_grade="casual")
  s1 = world.write_snapshot(D1, fmt="csv",
                            extra_lines={"photos": ["999\tnot enough"]})
  run("d1", s1, [EMB, FUN], D1)

  # Snapshot 2 (gzipped): the daisy upgraded, a new fungus, a raven whose
  # photo file was deleted, a photo shared by two fungus observations.
  world.regrade(daisy, "research")
  bolete = world.observe(SPECIES["bolete"])
  gone = world.observe(SPECIES["raven"])
  world.delete_photo_file(world.photos_of(gone)[0])
  shared_a = world.observe(SPECIES["fly_agaric"])
  shared_b = world.observe(SPECIES["fungi"], photos=0)
  world.add_photo(shared_b, photo_id=world.photos_of(shared_a)[0].photo_id)
  s2 = world.write_snapshot(D2, fmt="csv.gz")
  run("d2", s2, [EMB, FUN], D2)
  run("d2_rerun", s2, [EMB, FUN], D2)

  # Snapshot 3 (Parquet): a new plant; a third model joins.
  plant = world.observe(SPECIES["plant"])
  s3 = world.write_snapshot(D3, fmt="parquet")
  run("d3", s3, [EMB, FUN, IRV], D3)

  # Snapshot 4: a new fungus; the first run dies after staging its files:
  # the pipeline's commit step fails, and the job with it.
  late = world.observe(SPECIES["fly_agaric"])
  s4 = world.write_snapshot(D4, fmt="csv")

  def die(*args, **kwargs):
    raise _Killed("worker lost before commit")

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(commit, "commit_tables", die)
    with pytest.raises(_Killed):
      ingest.run(_argv(world, s4, out, [EMB, FUN, IRV], D4, tiny_models))
  steps["d4_killed"] = {
      "state": state(out),
      "staged": glob.glob(os.path.join(out, "_staging", "*", "**",
                                       "*.parquet"), recursive=True),
      "partitions": glob.glob(os.path.join(out, "*", "*", f"*={D4}")) +
                    glob.glob(os.path.join(out, "errors", f"*={D4}")),
      "summary": os.path.exists(os.path.join(out, "runs", f"{D4}.json")),
  }
  run("d4", s4, [EMB, FUN, IRV], D4)

  # Snapshot 5 = snapshot 4 again: nothing new; the deleted photo has now
  # failed three times.
  run("d5", s4, [EMB, FUN, IRV], D5)

  photos = {
      "raven": world.photos_of(raven), "agaric": world.photos_of(agaric),
      "daisy": world.photos_of(daisy), "casual": world.photos_of(bolete_casual),
      "bolete": world.photos_of(bolete), "gone": world.photos_of(gone),
      "shared": world.photos_of(shared_a), "plant": world.photos_of(plant),
      "late": world.photos_of(late),
  }
  obs = {"shared_a": shared_a, "shared_b": shared_b, "raven": raven}
  return {"out": out, "steps": steps, "photos": photos, "obs": obs,
          "world": world}


def _expect(ids_by_date):
  return {i: date for date, ids in ids_by_date.items() for i in ids}


def test_first_run_takes_research_grade_and_routes_fungi(sequence):
  p = sequence["photos"]
  tables, errors = sequence["steps"]["d1"]["state"]
  assert tables[EMB] == _expect({D1: _ids(*p["raven"], *p["agaric"])})
  assert tables[FUN] == _expect({D1: _ids(*p["agaric"])})
  assert tables[IRV] == {}
  assert errors == {}
  report = sequence["steps"]["d1"]["report"]
  snap = report["snapshot"]
  assert snap["photos"] == 5 and snap["observations"] == 4
  assert snap["photos_passed_filters"] == 3
  assert snap["bad_rows"]["photos"] == 1
  assert report["models"][EMB]["new"] == 3
  assert report["models"][FUN]["new"] == 1
  assert report["models"][FUN]["route"] == [FUNGI]


def test_second_run_adds_only_new_and_upgraded_photos(sequence):
  p = sequence["photos"]
  tables, errors = sequence["steps"]["d2"]["state"]
  assert tables[EMB] == _expect({
      D1: _ids(*p["raven"], *p["agaric"]),
      D2: _ids(*p["daisy"], *p["bolete"], *p["shared"])})
  assert tables[FUN] == _expect({D1: _ids(*p["agaric"]),
                                 D2: _ids(*p["bolete"], *p["shared"])})
  gone = str(p["gone"][0].photo_id)
  assert errors == {D2: [(gone, None, "read")]}
  report = sequence["steps"]["d2"]["report"]
  assert report["models"][EMB] == dict(
      report["models"][EMB], new=4, done_before=3, rows=3, failed=1)
  assert report["models"][FUN]["new"] == 2
  assert report["models"][FUN]["done_before"] == 1
  assert report["snapshot"]["duplicate_photo_rows"] == 1
  assert report["earlier_partitions"] == [D1]


def test_photo_in_two_observations_is_processed_once(sequence):
  shared = str(sequence["photos"]["shared"][0].photo_id)
  rows = [r for r in table_rows(sequence["out"], TABLES[FUN])
          if r["image_id"] == shared]
  assert len(rows) == 1
  want = min(sequence["obs"]["shared_a"].observation_uuid,
             sequence["obs"]["shared_b"].observation_uuid)
  assert rows[0]["observation_uuid"] == want


def test_rerun_of_same_date_changes_nothing(sequence):
  steps = sequence["steps"]
  assert steps["d2_rerun"]["state"] == steps["d2"]["state"]
  assert (steps["d2_rerun"]["report"]["models"] ==
          steps["d2"]["report"]["models"])


def test_added_model_gets_its_backlog(sequence):
  p = sequence["photos"]
  tables, errors = sequence["steps"]["d3"]["state"]
  before, _ = sequence["steps"]["d2"]["state"]
  assert tables[EMB] == dict(before[EMB], **_expect({D3: _ids(*p["plant"])}))
  assert tables[FUN] == before[FUN]
  assert tables[IRV] == _expect({D3: _ids(
      *p["raven"], *p["agaric"], *p["daisy"], *p["bolete"], *p["shared"],
      *p["plant"])})
  gone = str(p["gone"][0].photo_id)
  assert errors[D3] == [(gone, None, "read")]
  report = sequence["steps"]["d3"]["report"]
  assert report["models"][IRV]["new"] == 8  # 7 photos and the deleted one
  assert report["models"][IRV]["rows"] == 7
  assert report["models"][FUN]["new"] == 0
  assert report["models"][FUN]["rows"] == 0


def test_killed_run_leaves_nothing_and_rerun_completes_it(sequence):
  steps = sequence["steps"]
  killed = steps["d4_killed"]
  assert killed["state"] == steps["d3"]["state"]
  assert killed["staged"], "the killed run staged no files"
  assert killed["partitions"] == []
  assert not killed["summary"]
  p = sequence["photos"]
  tables, errors = steps["d4"]["state"]
  late = _ids(*p["late"])
  for model in (EMB, FUN, IRV):
    assert tables[model] == dict(steps["d3"]["state"][0][model],
                                 **_expect({D4: late})), model
  gone = str(p["gone"][0].photo_id)
  assert errors[D4] == [(gone, None, "read")]
  assert steps["d4"]["report"]["stale_staging_removed"]
  assert not os.path.exists(os.path.join(sequence["out"], "_staging"))


def test_max_attempts_stops_retries_and_summary_says_so(sequence, capsys):
  steps = sequence["steps"]
  tables, errors = steps["d5"]["state"]
  assert tables == steps["d4"]["state"][0]
  assert D5 not in errors
  report = steps["d5"]["report"]
  assert {m: report["models"][m]["held_back"] for m in TABLES} == {
      EMB: 1, FUN: 0, IRV: 1}
  assert all(report["models"][m]["new"] == 0 for m in TABLES)
  summary = ingest._summary(  # pylint: disable=protected-access
      run_summary.RunSummary.from_dict(report))
  assert "not retried: 1 photo(s) had failed --max_attempts 3 times for " \
         "inaturalist_v2" in summary
  del capsys


def test_rows_carry_observation_fields_with_types(sequence):
  out = sequence["out"]
  world = sequence["world"]
  raven = sequence["obs"]["raven"]
  schema = pq.read_schema(_files(out, TABLES[EMB])[0])
  assert schema.field("photo_id").type == pa.int64()
  assert schema.field("taxon_id").type == pa.int64()
  assert schema.field("latitude").type == pa.float64()
  assert schema.field("observed_on").type == pa.date32()
  assert schema.field("license").type == pa.string()
  photo = sequence["photos"]["raven"][0]
  row = next(r for r in table_rows(out, TABLES[EMB])
             if r["image_id"] == str(photo.photo_id))
  assert row["photo_id"] == photo.photo_id
  assert row["photo_uuid"] == photo.photo_uuid
  assert row["observation_uuid"] == raven.observation_uuid
  assert row["taxon_id"] == SPECIES["raven"]
  assert row["quality_grade"] == "research"
  assert row["observed_on"] == datetime.date(2024, 1, 1)
  assert row["latitude"] == pytest.approx(raven.latitude)
  assert row["longitude"] == pytest.approx(raven.longitude)
  assert row["license"] == "cc-by"
  assert row["uri"] == world.photo_path(photo)
  assert len(row["embedding"]) == 64


def test_partitions_read_as_one_table(sequence):
  out = sequence["out"]
  expected, _ = sequence["steps"]["d5"]["state"]
  con = duckdb.connect()
  pattern = os.path.join(out, TABLES[IRV], "*", "*.parquet")
  rows = con.execute(
      "select snapshot_date, count(*), count(distinct image_id) from "
      f"read_parquet('{pattern}', hive_partitioning=true) "
      "group by 1 order by 1").fetchall()
  assert [(str(d), n) for d, n, _ in rows] == [(D3, 7), (D4, 1)]
  assert all(n == distinct for _, n, distinct in rows)
  table = ds.dataset(os.path.join(out, TABLES[EMB]),
                     partitioning="hive").to_table()
  assert sorted(table.column("image_id").to_pylist()) == sorted(
      expected[EMB])
  for model, table_name in TABLES.items():
    for folder in glob.glob(os.path.join(out, table_name, "snapshot_date=*")):
      assert not os.path.exists(os.path.join(folder, "_SUCCESS"))
      with open(_marker(out, table_name, folder)) as f:
        marker = json.load(f)
      assert marker["table"] == table_name, model
      assert marker["rows"] == sum(
          pq.ParquetFile(p).metadata.num_rows
          for p in glob.glob(os.path.join(folder, "*.parquet")))


def _date(value):
  """A snapshot_date as each reader gives it (date, Timestamp, str)."""
  return str(value)[:10]


@pytest.mark.parametrize("table_name", sorted(TABLES.values()) + ["errors"])
def test_every_reader_opens_the_table_folders(sequence, table_name):
  """Polars, pandas, pyarrow and DuckDB read a table folder (its
  snapshot_date= partitions) and get the same rows; markers live outside
  the tables, so no folder holds anything but Parquet files."""
  import pandas  # pylint: disable=import-outside-toplevel
  import polars  # pylint: disable=import-outside-toplevel
  folder = os.path.join(sequence["out"], table_name)
  assert {os.path.splitext(name)[1] for _, _, names in os.walk(folder)
          for name in names} == {".parquet"}
  via_arrow = ds.dataset(folder, partitioning="hive").to_table()
  expected = sorted(zip(via_arrow.column("image_id").to_pylist(),
                        map(_date, via_arrow.column("snapshot_date")
                            .to_pylist())))
  assert len(expected) >= 2 and len({d for _, d in expected}) >= 2
  readers = {
      "polars folder": polars.read_parquet(folder),
      "polars glob": polars.read_parquet(
          os.path.join(folder, "**", "*.parquet"), hive_partitioning=True),
      "pandas": pandas.read_parquet(folder),
      "duckdb": duckdb.connect().execute(
          f"select * from read_parquet('{folder}/**/*.parquet', "
          f"hive_partitioning=true)").df(),
  }
  for reader, frame in readers.items():
    rows = sorted(zip(list(frame["image_id"]),
                      map(_date, list(frame["snapshot_date"]))))
    assert rows == expected, reader


def test_run_summary_file(sequence):
  out = sequence["out"]
  with open(os.path.join(out, "runs", f"{D2}.json")) as f:
    saved = json.load(f)
  report = sequence["steps"]["d2_rerun"]["report"]
  assert saved["run_id"] == report["run_id"]
  assert saved["snapshot"]["photos_passed_filters"] == 7
  assert saved["models"][EMB]["failed"] == 1
  assert saved["errors"]["by_stage"] == {"read": 1}
  assert saved["filters"]["routes"] == {FUN: [FUNGI]}


# --------------------------------------------------------------------------
# A run that dies while committing, followed by a run of a later date.


@pytest.mark.slow
def test_half_committed_partition_is_not_processed_twice(tiny_models,
                                                         tmp_path):
  world = SyntheticINat(str(tmp_path / "world"), seed=5)
  out = str(tmp_path / "out")
  world.observe(SPECIES["raven"])
  s1 = world.write_snapshot("s1")

  def argv(snapshot, date):
    return ["--snapshot_dir", snapshot, "--photo_uri_template",
            world.template, "--snapshot_date", date, "--output_dir", out,
            "--models", EMB, "--model_root", tiny_models, "--runtime", "tf",
            "--batch_size", "2", "--quality_grade", "any"]

  ingest.run(argv(s1, D1))
  second = world.observe(SPECIES["daisy"], quality_grade="casual")
  s2 = world.write_snapshot("s2")
  real_commit = commit.commit_tables

  def commit_first_then_die(tables, staging_root, files):
    # Runs in the pipeline's commit step, which then fails the job.
    del staging_root
    real_commit(list(tables)[:1], str(tmp_path / "nowhere" / "x"), files)
    raise _Killed("died after the first table")

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(commit, "commit_tables", commit_first_then_die)
    with pytest.raises(_Killed):
      ingest.run(argv(s2, D2))
  half = os.path.join(out, TABLES[EMB], f"snapshot_date={D2}")
  assert glob.glob(os.path.join(half, "*.parquet"))
  assert not os.path.exists(_marker(out, TABLES[EMB], half))

  # A later date counts the half-committed rows as done: no duplicates.
  world.observe(SPECIES["bolete"])
  s3 = world.write_snapshot("s3")
  report = ingest.run(argv(s3, D3))
  assert report["models"][EMB]["new"] == 1
  ids = placed(out, EMB)
  assert ids[str(world.photos_of(second)[0].photo_id)] == D2
  assert len(ids) == 3
  assert glob.glob(os.path.join(out, "_staging", f"ingest-{D2}-*"))

  # Readers that want committed partitions only check the markers.
  strict = duckdb.connect().execute(
      "select count(*) from read_parquet(?, hive_partitioning=true) "
      "where snapshot_date in (select cast(regexp_extract(file, "
      "'snapshot_date=([^/]+)', 1) as date) from glob(?))",
      [os.path.join(out, TABLES[EMB], "*", "*.parquet"),
       os.path.join(out, "_markers", TABLES[EMB], "*", "_SUCCESS")]
  ).fetchone()[0]
  assert strict == 2

  # The rerun of the dead date completes it and cleans its staging.
  again = ingest.run(argv(s2, D2))
  assert again["models"][EMB]["new"] == 1
  assert placed(out, EMB) == ids
  assert os.path.exists(_marker(out, TABLES[EMB], half))
  assert not os.path.exists(os.path.join(out, "_staging"))


# --------------------------------------------------------------------------
# What a template launch relies on: the pipeline commits by itself.


def test_the_pipeline_commits_without_the_launcher(tiny_models, tmp_path):
  """Builds and runs the pipeline with no launcher code after p.run()."""
  world = SyntheticINat(str(tmp_path / "world"), seed=7)
  out = str(tmp_path / "out")
  raven = world.observe(SPECIES["raven"], photos=2)
  agaric = world.observe(SPECIES["fly_agaric"])
  world.observe(SPECIES["daisy"], quality_grade="needs_id")
  gone = world.observe(SPECIES["bolete"])
  world.delete_photo_file(world.photos_of(gone)[0])
  snapshot = world.write_snapshot("s1", extra_lines={"photos": ["1\t2"]})
  # What earlier runs of the date left: a marker (replaced by this run's)
  # and the staging folder of a run that died.
  partition = f"snapshot_date={D1}"
  os.makedirs(os.path.join(out, TABLES[EMB], partition))
  with open(os.path.join(out, TABLES[EMB], partition, "_SUCCESS"), "w") as f:
    f.write("{}")
  dead = os.path.join(out, "_staging", f"ingest-{D1}-dead")
  os.makedirs(os.path.join(dead, "errors", partition))
  with open(os.path.join(dead, "errors", partition, "part-0.parquet"),
            "w") as f:
    f.write("staged by a run that died")

  argv = _argv(world, snapshot, out, [EMB, FUN], D1, tiny_models)
  # The launcher's steps (the runtime of each model decided), then the
  # graph alone.
  plan, options = launch.plan_job(ingest.JOB, argv)
  run_id = plan.layout.run_id
  p = beam.Pipeline(options=options)
  ingest.JOB.build(p, plan)
  p.run().wait_until_finish()

  raven_ids, agaric_ids = (_ids(*world.photos_of(o)) for o in (raven, agaric))
  (gone_id,) = _ids(*world.photos_of(gone))
  assert placed(out, EMB) == _expect({D1: raven_ids | agaric_ids})
  assert placed(out, FUN) == _expect({D1: agaric_ids})
  assert errors_by_date(out) == {D1: [(gone_id, None, "read")]}
  assert not os.path.exists(os.path.join(out, "_staging"))

  summary = os.path.join(out, "runs", f"{D1}.json")
  with open(summary) as f:
    report = json.load(f)
  assert report["run_id"] == run_id
  assert report["summary_path"] == summary
  snap = report["snapshot"]
  assert snap["taxa"] > 0 and snap["subtree_sizes"][str(FUNGI)] > 0
  assert snap == dict(
      snap, photos=5, observations=4, observations_passed_filters=3,
      photos_passed_filters=4, photos_filtered_out=1, duplicate_photo_rows=0,
      bad_rows={"photos": 1, "observations": 0, "taxa": 0})
  counts = ("table", "new", "done_before", "held_back", "rows", "failed",
            "route")
  assert {n: {k: m[k] for k in counts} for n, m in report["models"].items()
          } == {
      EMB: {"table": TABLES[EMB], "new": 4, "done_before": 0,
            "held_back": 0, "rows": 3, "failed": 1, "route": None},
      FUN: {"table": TABLES[FUN], "new": 2, "done_before": 0,
            "held_back": 0, "rows": 1, "failed": 1, "route": [FUNGI]}}
  # One shape for both jobs: each model as decided beside its counts.
  assert report["version"] == run_summary.SUMMARY_VERSION
  assert report["job"] == run_summary.INGEST and report["inputs"] is None
  assert report["models"][EMB]["kind"] == "embedder"
  assert report["errors"]["by_stage"] == {"read": 1}
  assert report["stale_staging_removed"] == [dead]
  assert report["elapsed_s"] > 0 and report["started_ts"] > 0
  assert "partition snapshot_date=2024-01-07 committed" in ingest._summary(
      run_summary.RunSummary.from_dict(report))  # pylint: disable=protected-access

  for table in (TABLES[EMB], TABLES[FUN], "errors"):
    folder = os.path.join(out, table, partition)
    files = glob.glob(os.path.join(folder, "*.parquet"))
    # The marker an earlier version left inside the partition is gone.
    assert sorted(os.listdir(folder)) == sorted(map(os.path.basename, files))
    with open(_marker(out, table, folder)) as f:
      marker = json.load(f)
    assert marker["run_id"] == run_id, table
    assert marker["table"] == table
    assert sorted(marker["files"]) == sorted(map(os.path.basename, files))
    assert marker["rows"] == sum(pq.ParquetFile(p).metadata.num_rows
                                 for p in files)
    # The markers come last, after the summary.
    assert (os.stat(_marker(out, table, folder)).st_mtime_ns >=
            os.stat(summary).st_mtime_ns), table


# --------------------------------------------------------------------------
# Flags that cannot work fail before the pipeline starts.


@pytest.fixture(scope="module")
def small_snapshot(tmp_path_factory):
  root = tmp_path_factory.mktemp("flags")
  world = SyntheticINat(str(root / "world"), seed=1)
  world.observe(SPECIES["raven"])
  return world, world.write_snapshot("s", taxa=False)


def _flag_argv(world, snapshot, out, tiny_models, *extra):
  return ["--snapshot_dir", snapshot, "--photo_uri_template", world.template,
          "--snapshot_date", D1, "--output_dir", out, "--models", EMB,
          "--model_root", tiny_models, "--runtime", "tf", *extra]


@pytest.mark.parametrize("extra,flag", [
    (["--snapshot_date", "2024-1-7"], "--snapshot_date"),
    (["--snapshot_date", "yesterday"], "--snapshot_date"),
    (["--route", f"{FUN}={FUNGI}"], "--route"),
    (["--route", f"{EMB}=fungi"], "--route"),
    (["--max_attempts", "0"], "--max_attempts"),
    (["--quality_grade", "excellent"], "--quality_grade"),
    (["--quality_grade", "any,research"], "--quality_grade"),
    (["--taxon_id", "47170"], "taxa"),
    (["--photo_uri_template", "/photos/all.jpg"], "--photo_uri_template"),
    (["--photo_uri_template", "/p/{photo_id:08d}.jpg"],
     "--photo_uri_template"),
    (["--photo_uri_template", "/p/{size}/{photo_id}.jpg"], "size"),
    (["--snapshot_dir", "/nonexistent/snapshot"], "photos table"),
])
def test_bad_flags_fail_before_the_pipeline(small_snapshot, tiny_models,
                                            tmp_path, extra, flag):
  world, snapshot = small_snapshot
  out = str(tmp_path / "out")
  with pytest.raises(ConfigError, match=flag):
    ingest.run(_flag_argv(world, snapshot, out, tiny_models) + extra)
  assert not os.path.exists(out)


def test_output_dir_with_unpartitioned_table_is_refused(
    small_snapshot, tiny_models, tmp_path):
  world, snapshot = small_snapshot
  table = tmp_path / "out" / "embeddings" / EMB
  table.mkdir(parents=True)
  pq.write_table(pa.table({"image_id": ["1"]}), table / "part-0.parquet")
  with pytest.raises(ConfigError, match="outside snapshot_date= partitions"):
    ingest.run(_flag_argv(world, snapshot, str(tmp_path / "out"),
                          tiny_models))
  assert sorted(os.listdir(tmp_path / "out")) == ["embeddings"]


def test_main_reports_flag_errors(small_snapshot, tiny_models, tmp_path,
                                  capsys):
  world, snapshot = small_snapshot
  code = ingest.main(_flag_argv(world, snapshot, str(tmp_path / "o"),
                                tiny_models, "--max_attempts", "-1"))
  assert code == 2
  assert "natvision-ingest: error: --max_attempts" in capsys.readouterr().err


def test_parse_args_defaults(small_snapshot, tiny_models):
  world, snapshot = small_snapshot
  argv = ["--snapshot_dir", snapshot, "--photo_uri_template", world.template,
          "--output_dir", "/tmp/x", "--model_root", tiny_models]
  config, _ = ingest.parse_args(argv)
  assert config.snapshot_date == datetime.datetime.now(
      datetime.timezone.utc).date()
  assert config.filters.quality_grades == {"research"}
  assert config.max_attempts == 3
  assert config.model_names == (EMB, FUN, IRV)
  config, _ = ingest.parse_args(argv + ["--quality_grade", "any",
                                        "--taxon_id", "3,47126"])
  assert config.filters.quality_grades is None
  assert config.filters.taxon_ids == (3, 47126)


# --license: photos under other licences are left out before any fetch.


def test_license_keeps_only_the_named_licences(tiny_models, tmp_path, capsys):
  world = SyntheticINat(str(tmp_path / "world"), seed=5)
  kept = [world.observe(SPECIES["raven"], licence="CC-BY-NC"),
          world.observe(SPECIES["daisy"], licence="CC0", photos=2)]
  left_out = [world.observe(SPECIES["bolete"], licence=""),  # all rights
              world.observe(SPECIES["raven"], licence="CC-BY-NC-SA"),
              world.observe(SPECIES["daisy"], licence="CC-BY")]
  world.observe(SPECIES["raven"], quality_grade="casual", licence="CC0")
  # Photos left out are never fetched: without their files, a fetch would
  # show as a read error.
  for obs in left_out:
    for photo in world.photos_of(obs):
      world.delete_photo_file(photo)
  snapshot = world.write_snapshot("mixed")
  out = str(tmp_path / "out")
  report = ingest.run(_flag_argv(world, snapshot, out, tiny_models,
                                 "--license", "cc0, CC-BY-NC"))
  assert set(placed(out, EMB)) == _ids(
      *(p for obs in kept for p in world.photos_of(obs)))
  assert table_rows(out, "errors") == []
  with open(os.path.join(out, "runs", f"{D1}.json")) as f:
    summary = json.load(f)
  assert summary["filtered_by_license"] == report["filtered_by_license"] == 3
  assert summary["filters"]["license"] == ["cc-by-nc", "cc0"]
  assert summary["snapshot"]["photos_passed_filters"] == 3
  assert summary["snapshot"]["photos_filtered_out"] == 1  # the casual one
  printed = capsys.readouterr().out
  assert "not fetched: 3 photo(s) left out by --license" in printed
  assert "license cc-by-nc,cc0" in printed

  # Without --license the filter keeps every photo; a name that is not a
  # licence fails before the pipeline.
  config, _ = ingest.parse_args(_flag_argv(world, snapshot, out, tiny_models))
  assert not config.filters.licenses.active
  with pytest.raises(ConfigError, match="--license: unknown licence name"):
    ingest.parse_args(_flag_argv(world, snapshot, out, tiny_models,
                                 "--license", "cc-by-4.0"))


# --------------------------------------------------------------------------
# --prior: the snapshot's latitude/longitude place the photos.


@pytest.mark.slow
def test_prior_places_photos_by_the_observations_coordinates(tiny_models,
                                                            tmp_path):
  import h3  # pylint: disable=import-outside-toplevel
  from tests import taxa_helpers  # pylint: disable=import-outside-toplevel
  from natvision.transforms import prior  # pylint: disable=import-outside-toplevel
  world = SyntheticINat(str(tmp_path / "world"), seed=9)
  observations = [world.observe(SPECIES["bolete"]) for _ in range(3)]
  snapshot = world.write_snapshot("s", taxa=False)
  taxa_path = str(tmp_path / "taxa.tsv")
  _, taxon_of = taxa_helpers.write_standin_taxa(
      os.path.join(tiny_models, FUN, "labelmap.csv"), taxa_path)
  # The first two observations' cells hold 150 and 50 observations of one
  # label's taxon: the prior applies in the first only (minimum 100).
  cells = [h3.latlng_to_cell(o.latitude, o.longitude, 4)
           for o in observations]
  taxon = taxon_of[20]
  path = str(tmp_path / "prior.parquet")
  pq.write_table(pa.Table.from_pydict(
      {"taxon_id": [taxon, taxon], "h3_cell": cells[:2], "n": [150, 50]},
      schema=prior.prior_schema({"resolution": 4})), path)
  out = str(tmp_path / "out")
  ingest.run(["--snapshot_dir", snapshot, "--photo_uri_template",
              world.template, "--snapshot_date", D1, "--output_dir", out,
              "--models", FUN, "--model_root", tiny_models, "--runtime", "tf",
              "--taxa", taxa_path, "--prior", path])
  rows = {r["observation_uuid"]: r for r in table_rows(out, TABLES[FUN])}
  assert len(rows) == 3
  want = [(True, None, 150), (False, prior.FEW_OBSERVATIONS, 50),
          (False, prior.FEW_OBSERVATIONS, 0)]
  for obs, cell, (applied, reason, n) in zip(observations, cells, want):
    row = rows[obs.observation_uuid]
    assert row["prior_h3_cell"] == cell
    assert (row["prior_applied"], row["prior_reason"],
            row["prior_cell_observations"]) == (applied, reason, n)
