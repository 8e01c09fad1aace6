"""The ingest_observations job entirely on gs://, against a local twin.

Snapshot tables, the photo store (at --photo_uri_template), the models
(--model_root) and --output_dir all live in a bucket of the loopback GCS
server (tests/gcs_server.py).  The same snapshots are run a second time on
local disk; after each step the gs:// tables are read back with
FileSystems.match and pyarrow and must hold exactly the photos they should,
each once, with a ``_SUCCESS`` marker per partition (under ``_markers/``), nothing left under
``_staging`` and the same rows (embeddings compared by image_id) as the local
run.

Steps: a first snapshot (gzipped TSV); a second (Parquet) with new
observations, an upgrade from needs_id to research and a photo whose file
is missing from the store; a rerun of the second date, which also finds
objects that a dead run of that date left under ``_staging``.
"""

import io
import json
import os
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from natvision.pipelines import ingest_observations as ingest
from tests.gcs_server import upload_dir
from tests.snapshot_gen import FUNGI, SPECIES, SyntheticINat
from natvision.tools import report as html_report

# Slow tier: three ingestion runs on the loopback GCS server; ingestion
# is in the default tier locally (test_ingest_observations) and gs:// with
# test_gcs_job.
pytestmark = pytest.mark.slow

EMB = "inaturalist_v2"
FUN = "fungi_mobile_v1"
TABLES = {EMB: "embeddings/" + EMB, FUN: "predictions/" + FUN}
ALL_TABLES = tuple(TABLES.values()) + ("errors",)
D1, D2 = "2024-03-03", "2024-03-10"
# Columns that legitimately differ between the bucket and the local run.
LOCATION_COLUMNS = ("uri",)


def upload_raw(local_dir, gs_prefix):
  """Copies a folder's files to gs:// byte for byte.

  tests.gcs_server.upload_dir creates objects with Beam's AUTO compression,
  which gzips ``*.gz`` files a second time; a published ``photos.csv.gz``
  must arrive as it is.
  """
  for name in sorted(os.listdir(local_dir)):
    with open(os.path.join(local_dir, name), "rb") as src, FileSystems.create(
        f"{gs_prefix}/{name}",
        compression_type=CompressionTypes.UNCOMPRESSED) as out:
      out.write(src.read())


def _match(pattern):
  try:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
  except Exception:  # noqa: BLE001 - nothing there (local folder missing)
    return []


def _read_parquet(path):
  with FileSystems.open(path) as f:
    return pq.read_table(io.BytesIO(f.read()))


def read_table(out, table):
  """{partition date: [rows]} of a partitioned table, via FileSystems."""
  found = {}
  for path in _match(f"{out}/{table}/snapshot_date=*/*.parquet"):
    folder = path.rsplit("/", 2)[-2]
    assert folder.startswith("snapshot_date="), path
    date = folder.split("=", 1)[1]
    found.setdefault(date, []).extend(_read_parquet(path).to_pylist())
  return found


def placed(rows_by_date):
  """{image_id: date}; fails when a photo is in the table twice."""
  ids = {}
  for date, rows in rows_by_date.items():
    for row in rows:
      assert row["image_id"] not in ids, (row["image_id"], date)
      ids[row["image_id"]] = date
  return ids


def snapshot_state(out):
  """Everything a step left under ``out`` (local or gs://), read back."""
  tables = {t: read_table(out, t) for t in ALL_TABLES}
  markers = {}
  for table in ALL_TABLES:
    for path in _match(f"{out}/_markers/{table}/snapshot_date=*/_SUCCESS"):
      with FileSystems.open(path) as f:
        markers[(table, path.rsplit("/", 2)[-2])] = json.loads(f.read())
  partitions = {}
  for table in ALL_TABLES:
    for path in _match(f"{out}/{table}/snapshot_date=*/*.parquet"):
      folder = path.rsplit("/", 2)[-2]
      partitions.setdefault((table, folder), []).append(
          path.rsplit("/", 1)[-1])
  runs = {}
  for path in _match(f"{out}/runs/*.json"):
    with FileSystems.open(path) as f:
      runs[path.rsplit("/", 1)[-1]] = json.loads(f.read())["run_id"]
  return {"tables": tables, "markers": markers, "partitions": partitions,
          "runs": runs,
          "staging": _match(f"{out}/_staging/**"),
          "everything": _match(f"{out}/**")}


def _ids(*photos):
  return {str(p.photo_id) for p in photos}


def _expect(ids_by_date):
  return {i: d for d, ids in ids_by_date.items() for i in ids}


def _argv(snapshot, template, out, models, date):
  return ["--snapshot_dir", snapshot, "--photo_uri_template", template,
          "--snapshot_date", date, "--output_dir", out, "--models",
          ",".join([EMB, FUN]), "--model_root", models, "--route",
          f"{FUN}={FUNGI}", "--runtime", "tf", "--batch_size", "2",
          "--top_k", "2", "--decode_threads", "1"]


@pytest.fixture(scope="module")
def sequence(gcs_server, tiny_models, tmp_path_factory):
  """Runs each step on gs:// and locally; records both states after each."""
  tmp = tmp_path_factory.mktemp("ingest_gcs")
  root = f"{gcs_server.bucket_url}/ingest-{uuid.uuid4().hex[:8]}"
  world = SyntheticINat(str(tmp / "world"), seed=11)
  gs_models = root + "/models"
  upload_dir(tiny_models, gs_models)
  gs_store = root + "/photo_store"
  gs_template = gs_store + "/{photo_id}/medium.{extension}"
  gs_out, local_out = root + "/out", str(tmp / "local_out")
  steps = {}

  def publish(date, fmt):
    """Writes the snapshot locally; mirrors it and the store to gs://."""
    local = world.write_snapshot(date, fmt=fmt)
    remote = f"{root}/snapshots/{date}"
    upload_raw(local, remote)
    upload_dir(world.store, gs_store)
    return local, remote

  def run(name, snapshots, date, local_twin=None):
    """One gs:// run, and the same run locally (or an earlier step's)."""
    local, remote = snapshots
    gs_report = ingest.run(_argv(remote, gs_template, gs_out, gs_models, date),
                           report_writer=html_report.write_after_run)
    steps[name] = {"gs": gs_report, "gs_state": snapshot_state(gs_out)}
    if local_twin:
      # The local job's own reruns are covered by test_ingest_observations.
      steps[name].update(local=steps[local_twin]["local"],
                         local_state=steps[local_twin]["local_state"])
    else:
      steps[name].update(
          local=ingest.run(_argv(local, world.template, local_out,
                                 tiny_models, date)),
          local_state=snapshot_state(local_out))

  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("NATVISION_MODEL_CACHE", str(tmp / "model_cache"))
    # Snapshot 1: research raven (two photos) and fly agaric; a daisy still
    # needs_id; a casual bolete.
    raven = world.observe(SPECIES["raven"], photos=2)
    agaric = world.observe(SPECIES["fly_agaric"], extension="png")
    daisy = world.observe(SPECIES["daisy"], quality_grade="needs_id")
    casual = world.observe(SPECIES["bolete"], quality_grade="casual")
    run("d1", publish(D1, "csv.gz"), D1)

    # Snapshot 2: the daisy upgraded, a new bolete, a new raven whose photo
    # file is gone from the store (deleted before the store was mirrored).
    world.regrade(daisy, "research")
    bolete = world.observe(SPECIES["bolete"])
    gone = world.observe(SPECIES["raven"])
    world.delete_photo_file(world.photos_of(gone)[0])
    s2 = publish(D2, "parquet")
    run("d2", s2, D2)
    # A run of D2 that died after staging: its objects must go with the rerun.
    dead = f"{gs_out}/_staging/ingest-{D2}-20000101T000000Z-deadbeef"
    with FileSystems.create(f"{dead}/{TABLES[EMB]}/snapshot_date={D2}/"
                            "part-00000-of-00001.parquet") as f:
      f.write(b"staged by a run that died")
    run("d2_rerun", s2, D2, local_twin="d2")

  photos = {name: world.photos_of(obs) for name, obs in (
      ("raven", raven), ("agaric", agaric), ("daisy", daisy),
      ("casual", casual), ("bolete", bolete), ("gone", gone))}
  return {"steps": steps, "photos": photos, "gs_out": gs_out, "dead": dead,
          "gs_store": gs_store}


def _placed_state(state):
  return {m: placed(state["tables"][t]) for m, t in TABLES.items()}


def _errors(state):
  return {d: sorted((r["image_id"], r["model"], r["stage"]) for r in rows)
          for d, rows in state["tables"]["errors"].items() if rows}


def expected_after(step, p):
  d1 = {EMB: _expect({D1: _ids(*p["raven"], *p["agaric"])}),
        FUN: _expect({D1: _ids(*p["agaric"])})}
  if step == "d1":
    return d1, {}
  gone = str(p["gone"][0].photo_id)
  return ({EMB: dict(d1[EMB], **_expect({D2: _ids(*p["daisy"],
                                                     *p["bolete"])})),
           FUN: dict(d1[FUN], **_expect({D2: _ids(*p["bolete"])}))},
          {D2: [(gone, None, "read")]})


@pytest.mark.parametrize("step", ["d1", "d2", "d2_rerun"])
def test_gs_tables_hold_exactly_the_expected_photos(sequence, step):
  state = sequence["steps"][step]["gs_state"]
  tables, errors = expected_after(step, sequence["photos"])
  assert _placed_state(state) == tables
  assert _errors(state) == errors
  # Rows point into the bucket's photo store.
  store = sequence["gs_store"] + "/"
  for table in TABLES.values():
    for rows in state["tables"][table].values():
      assert all(r["uri"].startswith(store) for r in rows)


@pytest.mark.parametrize("step", ["d1", "d2", "d2_rerun"])
def test_gs_partitions_are_marked_and_staging_is_gone(sequence, step):
  state = sequence["steps"][step]["gs_state"]
  dates = [D1] if step == "d1" else [D1, D2]
  want = {(t, f"snapshot_date={d}") for t in ALL_TABLES for d in dates}
  # Every table has a committed partition per date (an empty file with the
  # schema where no row landed), each with its _SUCCESS manifest.
  assert set(state["partitions"]) == want
  assert set(state["markers"]) == want
  for (table, folder), marker in state["markers"].items():
    assert marker["table"] == table
    assert marker["snapshot_date"] == folder.split("=", 1)[1]
    assert sorted(marker["files"]) == sorted(state["partitions"][(table,
                                                                  folder)])
    date = folder.split("=", 1)[1]
    assert marker["rows"] == len(state["tables"][table].get(date, []))
  assert state["staging"] == []
  # Nothing else at all: no staged leftovers, no folder placeholders.
  out = sequence["gs_out"]
  assert state["everything"] == sorted(
      [f"{out}/{t}/{p}/{name}" for (t, p), files in state["partitions"].items()
       for name in files] +
      [f"{out}/_markers/{t}/{p}/_SUCCESS" for t, p in state["partitions"]] +
      [f"{out}/runs/{d}.{ext}" for d in dates for ext in ("html", "json")])
  report = sequence["steps"][step]["gs"]
  summary = f"{sequence['gs_out']}/runs/{dates[-1]}.json"
  assert report["summary_path"] == summary
  assert state["runs"][f"{dates[-1]}.json"] == report["run_id"]
  assert set(state["runs"]) == {f"{d}.json" for d in dates}
  for (table, folder), marker in state["markers"].items():
    if folder == f"snapshot_date={dates[-1]}":
      assert marker["run_id"] == report["run_id"], table


def test_rerun_replaces_the_partition_without_duplicates(sequence):
  steps = sequence["steps"]
  first, again = steps["d2"]["gs_state"], steps["d2_rerun"]["gs_state"]
  assert _placed_state(again) == _placed_state(first)
  assert _errors(again) == _errors(first)
  # The earlier partition was left alone (the same files); the rerun's
  # files replaced every file of the first run of its date.
  d1 = f"snapshot_date={D1}"
  for key, files in first["partitions"].items():
    if key[1] == d1:
      assert again["partitions"][key] == files, key
    else:
      assert not set(again["partitions"][key]) & set(files), key
  for table in ALL_TABLES:
    assert again["markers"][(table, d1)] == first["markers"][(table, d1)]
  report = steps["d2_rerun"]["gs"]
  assert report["earlier_partitions"] == [D1]
  assert report["stale_staging_removed"] == [sequence["dead"]]
  assert steps["d2"]["gs"]["stale_staging_removed"] == []
  assert report["models"] == steps["d2"]["gs"]["models"]
  assert report["models"][EMB]["done_before"] == 3  # raven x2, agaric
  assert report["models"][EMB]["new"] == 3  # daisy, bolete, the gone photo
  assert report["models"][FUN]["done_before"] == 1


@pytest.mark.parametrize("step", ["d1", "d2", "d2_rerun"])
def test_gs_run_equals_local_run(sequence, step):
  s = sequence["steps"][step]
  gs, local = s["gs_state"], s["local_state"]
  assert _placed_state(gs) == _placed_state(local)
  assert _errors(gs) == _errors(local)
  assert set(gs["partitions"]) == set(local["partitions"])
  assert set(gs["markers"]) == set(local["markers"])
  for key in ("earlier_partitions", "filters"):
    assert s["gs"][key] == s["local"][key], key
  # The models' counts and decisions; their files lie in each run's own
  # model root (gs:// or local), so the paths differ.
  where = ("path", "labelmap")
  assert ({n: {k: v for k, v in m.items() if k not in where}
           for n, m in s["gs"]["models"].items()}
          == {n: {k: v for k, v in m.items() if k not in where}
              for n, m in s["local"]["models"].items()})
  assert s["gs"]["snapshot"] == s["local"]["snapshot"]
  assert (s["gs"]["errors"]["by_stage"], s["gs"]["errors"]["total"]) == (
      s["local"]["errors"]["by_stage"], s["local"]["errors"]["total"])
  for table in TABLES.values():
    local_rows = {r["image_id"]: r for rows in local["tables"][table].values()
                  for r in rows}
    for date, rows in gs["tables"][table].items():
      for row in rows:
        want = local_rows[row["image_id"]]
        for column, value in row.items():
          if column in LOCATION_COLUMNS:
            continue
          if column in ("embedding", "score", "top_k_scores"):
            np.testing.assert_allclose(value, want[column], rtol=1e-5,
                                       atol=1e-6, err_msg=column)
          else:
            assert value == want[column], (table, date, column)
        # Same photo file, one in the bucket, one on disk.
        assert row["uri"].rsplit("/", 2)[-2:] == want["uri"].rsplit(
            os.sep, 2)[-2:]
