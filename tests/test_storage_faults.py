"""Storage faults on gs://: nothing lost, nothing doubled, and errors surface.

Both jobs run against the loopback GCS server (tests/gcs_server.py) while
its proxy fails chosen storage calls (tests/fault_proxy.py).  A clean run
is recorded first: every storage call it makes under the output folder,
grouped by kind (listings, metadata reads, reads, writes, renames,
deletes).  Each case then starts from a copy of the previous run's tables,
fails one call of the new run, and checks the invariant:

  * after the run, each table holds exactly the previous run's rows or
    exactly the new run's (image_id multisets: never fewer rows, never
    duplicates), and a ``_SUCCESS`` marker, where there is one, names
    exactly the files of its partition;
  * a call failed for good (403) fails the run, with a message naming a
    path under the output folder;
  * a transient failure (429, 503, a reset, a timeout), failed once, is
    retried by the storage client and the run ends with the new tables;
  * a clean rerun converges to the new tables.

The previous and the new run read different inputs, so a table that mixes
the two, or lost some of either, is told apart from both.  The first and
the last call of each kind are failed here (for ingestion, those of its own
steps: history, markers, summary); the slow tier also fails calls between
them (``--all-storage-calls``: every call of the recorded run in turn).  The default tier keeps one case of each outcome
(a 403 on the commit's first rename, the transient faults retried) and the
reproduction; tests/test_commit.py checks the same invariant in-process for
every storage call of the commit.  The HTML run report, which logs its own failures
and never fails a run (tools/report.py), is left out of these runs.

Also here: the harness's own behaviour, and the issue's reproduction (a
403 on the commit's listing once made a run exit 0 with an empty table).
"""
# pylint: disable=redefined-outer-name

import collections
import gc
import io
import json
import os
import re
import shutil
import urllib.parse
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from natvision.pipelines import embed_images
from natvision.pipelines import ingest_observations as ingest
from tests.conftest import real_photo_paths
from tests.fault_proxy import FaultInjector
from tests.gcs_server import upload_dir
from tests.snapshot_gen import SPECIES, SyntheticINat
from natvision.tools import report as html_report
from natvision.transforms import storage
from tests.report_helpers import table_rows

EMB = "inaturalist_v2"
EMBED_TABLES = (f"embeddings/{EMB}", "errors")
INGEST_TABLES = (f"embeddings/{EMB}", "errors")
KINDS_OF_CALL = ("list", "stat", "read", "write", "rename", "delete")
D1, D2 = "2024-03-03", "2024-03-10"

# Parts of object names that change from run to run: run ids, shard names,
# Beam's temporary folders, upload ids.
_VOLATILE = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}|part-[0-9a-f]{12,}"
                       r"|beam-temp-[^/?&]+|[0-9a-f]{32}")


# --------------------------------------------------------------------------
# Recorded calls -> fault rules.


def call_kind(entry, out_key):
  """What a logged request does under ``out_key`` (a bucket-relative
  prefix such as ``faults-1a2b/ref/out/``), or None when it is elsewhere."""
  method, path = entry["method"], entry["path"]
  if "/copyTo/" in path or "/rewriteTo/" in path:
    return "rename" if f"/o/{out_key}" in path else None
  if method == "GET" and "/o?" in path and f"prefix={out_key}" in path:
    return "list"
  if path.startswith("/upload/") and f"name={out_key}" in path:
    return "write"
  if f"/o/{out_key}" not in path:
    return None
  if method == "GET":
    return "read" if path.startswith("/download/") else "stat"
  if method == "DELETE":
    return "delete"
  return None


def call_pattern(path, out_key, new_key):
  """A rule's path_regex for the call that ``path`` made under ``out_key``,
  made again under ``new_key`` by another run (volatile names generalised).
  """
  path = re.sub(r"&upload_id=[^&]*", "", path).replace(out_key, new_key)
  parts, last = ["^"], 0
  for m in _VOLATILE.finditer(path):
    parts += [re.escape(path[last:m.start()]), r"[^/?&]+"]
    last = m.end()
  parts.append(re.escape(path[last:]))
  return "".join(parts)


def choose_call(log, out_key, kind, which):
  """One recorded call of a kind: ``first``, ``last`` or an index.

  Returns:
    (the log entry, k): the call is the k-th request of the run that its
    generalised pattern matches.
  """
  calls = [e for e in log if call_kind(e, out_key) == kind]
  assert calls, f"the clean run made no {kind} call under {out_key}"
  entry = {"first": calls[0], "last": calls[-1]}.get(which)
  if entry is None:
    entry = calls[which]
  pattern = call_pattern(entry["path"], out_key, out_key)
  k = sum(1 for e in log[:log.index(entry) + 1]
          if e["method"] == entry["method"] and re.search(pattern, e["path"]))
  return entry, k


def _key(url):
  """gs://bucket/a/b -> "a/b/" (object names under the folder)."""
  return url.split("://", 1)[1].split("/", 1)[1].rstrip("/") + "/"


# --------------------------------------------------------------------------
# Reading what readers see.


def _read_ids(path):
  with FileSystems.open(path,
                        compression_type=CompressionTypes.UNCOMPRESSED) as f:
    table = pq.read_table(io.BytesIO(f.read()), columns=["image_id"])
  return table.column("image_id").to_pylist()


def table_ids(out, table):
  """{partition: Counter(image_id)} of a table ("" when unpartitioned)."""
  found = {}
  for path in storage.match(f"{out}/{table}/**"):
    rel = path[len(f"{out}/{table}/"):]
    if not rel.endswith(".parquet"):
      continue
    partition = rel.rsplit("/", 1)[0] if "/" in rel else ""
    found.setdefault(partition, collections.Counter()).update(_read_ids(path))
  return {p: ids for p, ids in found.items() if ids}


def marker_problems(out, table):
  """Partitions whose ``_SUCCESS`` does not name exactly their files."""
  bad = []
  for marker in storage.match(f"{out}/_markers/{table}/*/_SUCCESS"):
    partition = marker.rsplit("/", 2)[-2]
    folder = f"{out}/{table}/{partition}"
    files = sorted(p.rsplit("/", 1)[1]
                   for p in storage.match(f"{folder}/*.parquet"))
    named = sorted(json.loads(storage.read_bytes(marker))["files"])
    if named != files:
      bad.append((folder, named, files))
  return bad


def clone(src, dst):
  """Copies every object under ``src`` to ``dst`` (a run's starting point)."""
  paths = storage.match(src + "/**")
  FileSystems.copy(paths, [dst + p[len(src):] for p in paths])


# --------------------------------------------------------------------------
# The two jobs, each with a previous and a new run.


class Job:
  """A small run of one job, from a previous state to a new one.

  Subclasses set ``tables`` and implement ``run(which, out)`` for
  ``which`` in ("previous", "new").
  """

  tables = ()

  def __init__(self, root, models, faults):
    self.root = root
    self.models = models
    self.faults = faults
    self.states = {}
    self.log = []
    self.ref_key = None
    self._cases = 0

  def state(self, out):
    return {t: table_ids(out, t) for t in self.tables}

  def prepare(self):
    """Runs previous, then new over it while recording its calls."""
    base = f"{self.root}/base/out"
    self.run("previous", base)
    self.states["previous"] = self.state(base)
    ref = f"{self.root}/ref/out"
    clone(base, ref)
    self.faults.clear()
    self.run("new", ref)
    self.log = self.faults.log()
    self.faults.clear()
    self.states["new"] = self.state(ref)
    self.ref_key = _key(ref)
    for table in self.tables:
      assert (self.states["previous"][table] != self.states["new"][table]
              or table == "errors"), table

  def fresh_output(self):
    """A copy of the previous run's output, for one case."""
    self._cases += 1
    out = f"{self.root}/case{self._cases}/out"
    clone(f"{self.root}/base/out", out)
    return out

  def check_faults(self, *faults):
    """Fails recorded calls in a new run over the previous tables.

    Args:
      *faults: (kind, kind of call, "first" | "last" | index), each failed
        once.  With a 403 among them the run must fail; otherwise the
        storage client's retries must hide every fault.

    Returns:
      The exception the faulty run raised, or None.
    """
    out = self.fresh_output()
    self.faults.clear()
    what = []
    for kind, call, which in faults:
      entry, k = choose_call(self.log, self.ref_key, call, which)
      self.faults.add(entry["method"],
                      call_pattern(entry["path"], self.ref_key, _key(out)),
                      kind=kind, from_match=k, times=1, batch=entry["batch"])
      what.append(f"{kind} on {entry['method']} {entry['path']} (match {k})")
    what = "; ".join(what)
    before = storage.match(out + "/**")
    error = None
    try:
      self.run("new", out)
    except Exception as e:  # noqa: BLE001 - whatever the job raises
      error = e
    fired = [r["fired"] for r in self.faults.rules()]
    self.faults.clear()
    assert fired == [1] * len(faults), f"calls never made: {fired}: {what}"
    after = self.state(out)
    for table in self.tables:
      assert after[table] in (self.states["previous"][table],
                              self.states["new"][table]), (
                                  what, table, after[table])
      assert marker_problems(out, table) == [], what
    if any(kind == "403" for kind, _, _ in faults):
      assert error is not None, f"the run ended as if nothing failed: {what}"
      message = urllib.parse.unquote(str(error))
      assert _key(out).rstrip("/") in message, (what, message[-2000:])
    else:
      assert error is None, f"not retried: {what}: {error}"
      assert after == self.states["new"], what
    # A run that failed before writing anything lasting left the previous
    # output as it was: rerunning it is the recorded run again.
    if error is not None and storage.match(out + "/**") != before:
      self.run("new", out)
      assert self.state(out) == self.states["new"], f"no convergence: {what}"
      assert storage.match(f"{out}/_staging/**") == [], what
    return error


class EmbedJob(Job):
  """natvision-embed, one tiny model; the new run's photos differ."""

  tables = EMBED_TABLES

  def __init__(self, root, models, faults, photos):
    super().__init__(root, models, faults)
    self.photos = photos  # which -> gs:// folder

  def argv(self, photos, out):
    return ["--input", photos + "/*", "--output_dir", out, "--models", EMB,
            "--model_root", self.models, "--runtime", "tf",
            "--batch_size", "4", "--decode_threads", "1"]

  def run(self, which, out):
    return embed_images.run(self.argv(self.photos[which], out))


class IngestJob(Job):
  """natvision-ingest: D1 committed, then D2 run over D1 and an earlier D2.

  The previous state holds partition D1 and a D2 from an earlier snapshot;
  the new run reruns D2 on a snapshot with one more observation, so it
  reads D1's history, replaces D2's files and its markers.
  """

  tables = INGEST_TABLES

  def __init__(self, root, models, faults, snapshots, template):
    super().__init__(root, models, faults)
    self.snapshots = snapshots  # name -> gs:// folder
    self.template = template

  def argv(self, snapshot, date, out):
    return ["--snapshot_dir", snapshot, "--photo_uri_template",
            self.template, "--snapshot_date", date, "--output_dir", out,
            "--models", EMB, "--model_root", self.models, "--batch_size",
            "2", "--decode_threads", "1", "--runtime", "tf"]

  def run(self, which, out):
    if which == "previous":
      ingest.run(self.argv(self.snapshots["d1"], D1, out))
      return ingest.run(self.argv(self.snapshots["d2_early"], D2, out))
    return ingest.run(self.argv(self.snapshots["d2"], D2, out))


# --------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def faults(gcs_server):
  injector = FaultInjector(gcs_server.url)
  injector.clear()
  yield injector
  injector.clear()


@pytest.fixture(scope="module")
def fault_root(gcs_server, tiny_models, tmp_path_factory):
  """A bucket folder with the tiny models, and a local model cache."""
  root = f"{gcs_server.bucket_url}/faults-{uuid.uuid4().hex[:8]}"
  upload_dir(os.path.join(tiny_models, EMB), f"{root}/models/{EMB}")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("NATVISION_MODEL_CACHE",
              str(tmp_path_factory.mktemp("fault_model_cache")))
    # The HTML run report logs its own failures and never fails a run
    # (tools/report.py); it reads every table again, so it is left out.
    mp.setattr(html_report, "write_report", lambda *args, **kwargs: None)
    yield root


def _photo_folder(tmp, name, files):
  folder = tmp / name
  folder.mkdir()
  by_name = {os.path.basename(p): p for p in real_photo_paths()}
  for file in files:
    if file == "broken.jpg":
      (folder / file).write_bytes(b"<html>not a photo</html>")
    elif file == "noise.bmp":
      rng = np.random.default_rng(7)
      Image.fromarray(rng.integers(0, 256, (50, 80, 3), np.uint8)).save(
          folder / file)
    else:
      shutil.copy(by_name[file], folder / file)
  return str(folder)


@pytest.fixture(scope="module")
def embed_job(fault_root, faults, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("fault_photos")
  root = f"{fault_root}/embed"
  photos = {}
  for which, files in (
      ("previous", ["flower.jpg", "chelsea.png", "broken.jpg"]),
      ("new", ["flower.jpg", "coffee.png", "rocket.jpg"]),
      ("seven", ["flower.jpg", "china.jpg", "chelsea.png", "coffee.png",
                 "rocket.jpg", "grass.png", "noise.bmp"])):
    photos[which] = f"{root}/photos_{which}"
    upload_dir(_photo_folder(tmp, which, files), photos[which])
  job = EmbedJob(root, f"{fault_root}/models", faults, photos)
  job.prepare()
  return job


def _upload_raw(local_dir, gs_prefix):
  """A snapshot folder byte for byte (a .gz must stay as published)."""
  for name in sorted(os.listdir(local_dir)):
    with open(os.path.join(local_dir, name), "rb") as src, FileSystems.create(
        f"{gs_prefix}/{name}",
        compression_type=CompressionTypes.UNCOMPRESSED) as out:
      out.write(src.read())


@pytest.fixture(scope="module")
def ingest_job(fault_root, faults, tmp_path_factory):
  world = SyntheticINat(str(tmp_path_factory.mktemp("fault_world")), seed=5)
  root = f"{fault_root}/ingest"
  world.observe(SPECIES["raven"])
  world.observe(SPECIES["fly_agaric"])
  snapshots = {"d1": world.write_snapshot("d1")}
  world.observe(SPECIES["daisy"])
  snapshots["d2_early"] = world.write_snapshot("d2_early")
  world.observe(SPECIES["bolete"])
  snapshots["d2"] = world.write_snapshot("d2")
  upload_dir(world.store, f"{root}/photo_store")
  remote = {}
  for name, local in snapshots.items():
    remote[name] = f"{root}/snapshots/{name}"
    _upload_raw(local, remote[name])
  job = IngestJob(root, f"{fault_root}/models", faults, remote,
                  f"{root}/photo_store/{{photo_id}}/medium.{{extension}}")
  job.prepare()
  return job


# --------------------------------------------------------------------------
# The harness itself.


def test_rules_choose_requests_from_the_kth_match(gcs_server, faults):
  folder = f"{gcs_server.bucket_url}/faults-harness-{uuid.uuid4().hex[:8]}"
  storage.write_bytes(folder + "/a.txt", b"a")
  faults.clear()
  rule = faults.add("GET", rf"/o\?.*prefix={re.escape(_key(folder))}",
                    kind="403", from_match=2, times=2)
  outcomes = []
  for _ in range(4):
    try:
      outcomes.append(storage.match(folder + "/*"))
    except storage.StorageError as e:
      assert folder + "/*" in str(e) and "403" in str(e)
      outcomes.append("403")
  assert outcomes == [[folder + "/a.txt"], "403", "403", [folder + "/a.txt"]]
  [state] = faults.rules()
  assert (state["id"], state["matched"], state["fired"]) == (rule["id"], 4, 2)
  listings = [e for e in faults.log() if "prefix=" in e["path"]]
  assert [(e["status"], e["fault"]) for e in listings] == [
      (200, None), (403, "403"), (403, "403"), (200, None)]
  with pytest.raises(ValueError, match="kind must be one of"):
    faults.add("GET", "x", kind="500")
  faults.clear()
  assert faults.rules() == [] and faults.log() == []


def test_batch_parts_fail_alone_and_transient_faults_are_retried(
    gcs_server, faults):
  folder = f"{gcs_server.bucket_url}/faults-harness-{uuid.uuid4().hex[:8]}"
  key = re.escape(_key(folder))
  storage.write_bytes(folder + "/a.txt", b"a")
  faults.clear()
  faults.add("POST", f"/o/{key}a.txt/copyTo/", kind="403", times="always",
             batch=True)
  for _ in range(2):
    with pytest.raises(Exception, match="403"):
      FileSystems.rename([folder + "/a.txt"], [folder + "/b.txt"])
  assert storage.match(folder + "/*") == [folder + "/a.txt"]
  faults.clear()
  # Each once, on every other copy: the storage client's retry succeeds.
  for i, kind in enumerate(("503", "429", "reset", "timeout")):
    faults.add("*", f"/o/{key}a.txt/copyTo/", kind=kind, from_match=2 * i + 1,
               hold_s=0.2)
  for _ in range(4):
    FileSystems.rename([folder + "/a.txt"], [folder + "/b.txt"])
    FileSystems.rename([folder + "/b.txt"], [folder + "/a.txt"])
  assert [r["fired"] for r in faults.rules()] == [1, 1, 1, 1]
  copies = [e for e in faults.log() if "a.txt/copyTo/" in e["path"]]
  assert [(e["fault"], e["status"]) for e in copies] == [
      ("503", 503), (None, 200), ("429", 429), (None, 200),
      ("reset", None), (None, 200), ("timeout", None), (None, 200)]
  assert storage.read_bytes(folder + "/a.txt") == b"a"
  faults.clear()


def test_a_failed_write_names_its_path_and_stays_failed(gcs_server, faults):
  """A 403 on a small file's upload raises naming it; collecting the
  writer afterwards does not upload the file after all."""
  path = (f"{gcs_server.bucket_url}/faults-harness-{uuid.uuid4().hex[:8]}"
          "/_SUCCESS")
  faults.clear()
  faults.add("*", rf"name={re.escape(_key(path).rstrip('/'))}", kind="403")
  with pytest.raises(storage.StorageError, match=re.escape(path)):
    storage.write_bytes(path, b"{}")
  gc.collect()
  uploads = [e for e in faults.log() if "/upload/" in e["path"]]
  faults.clear()
  assert [e["status"] for e in uploads] == [403]
  assert not storage.exists(path)


# --------------------------------------------------------------------------
# The reproduction from the issue.


# Slow tier: the reproduction; the default tier keeps one 403
# that must fail the run and the transient faults that must be retried.
@pytest.mark.slow
def test_failed_commit_listing_fails_the_run_and_keeps_the_rows(embed_job,
                                                                 faults):
  """7 photos, 7 rows; a 403 on the commit's listing of the table's files
  once: the run fails naming the folder, the 7 rows stay, a rerun has 7."""
  out = f"{embed_job.root}/repro/out"
  report = embed_images.run(embed_job.argv(embed_job.photos["seven"], out))
  assert table_rows(report) == {f"embeddings/{EMB}": 7}
  before = table_ids(out, f"embeddings/{EMB}")
  assert sum(before[""].values()) == 7 and len(before[""]) == 7
  key = re.escape(_key(out))
  # The commit lists the table's staged files (or, when the pipeline hands
  # it their names, the committed folder): the first listing of either.
  faults.add("GET", rf"/o\?.*prefix={key}(_staging/[^/&]+/)?embeddings/{EMB}/&",
             kind="403", times=1)
  with pytest.raises(Exception) as failure:
    embed_images.run(embed_job.argv(embed_job.photos["seven"], out))
  fired = faults.rules()[0]["fired"]
  faults.clear()
  assert fired == 1
  assert f"{_key(out)}" in str(failure.value)
  assert "403" in str(failure.value) or "Forbidden" in str(failure.value)
  assert table_ids(out, f"embeddings/{EMB}") == before
  report = embed_images.run(embed_job.argv(embed_job.photos["seven"], out))
  assert table_rows(report) == {f"embeddings/{EMB}": 7}
  assert table_ids(out, f"embeddings/{EMB}") == before


# --------------------------------------------------------------------------
# Each kind of call failed in turn.

# The default tier fails the commit's first rename (tables half moved);
# the slow tier fails the first and the last call of every kind.
PERMANENT = [(call, which) if (call, which) == ("rename", "first")
             else pytest.param(call, which, marks=pytest.mark.slow)
             for call in KINDS_OF_CALL for which in ("first", "last")]
TRANSIENT = [("503", "rename", "first"), ("429", "list", "last"),
             ("reset", "write", "first"), ("timeout", "read", "last"),
             ("503", "delete", "last")]


@pytest.mark.parametrize("call,which", PERMANENT)
def test_embed_403(embed_job, call, which):
  embed_job.check_faults(("403", call, which))


def test_embed_transient_faults_are_retried(embed_job):
  embed_job.check_faults(*TRANSIENT)


# Ingestion commits with the same code as embedding (transforms/sinks.py):
# its own calls are the history, the markers and the summary.
INGEST_PERMANENT = [("list", "first"), ("list", "last"), ("stat", "first"),
                    ("read", "first"), ("read", "last"), ("write", "first"),
                    ("write", "last"), ("rename", "first"),
                    ("delete", "first")]


@pytest.mark.slow
@pytest.mark.parametrize("call,which", INGEST_PERMANENT)
def test_ingest_403(ingest_job, call, which):
  ingest_job.check_faults(("403", call, which))


@pytest.mark.slow
def test_ingest_transient_faults_are_retried(ingest_job):
  ingest_job.check_faults(*TRANSIENT)


# --------------------------------------------------------------------------
# Calls between the first and the last, one at a time.
#
# Every call of a whole job on the GCS server takes a job run each (about 20
# minutes for both jobs), so the slow tier fails INTERIOR_CALLS calls of each
# kind, evenly spaced between the first and the last (which the matrix above
# fails); ``--all-storage-calls`` fails every one.  The commit's own calls
# are all failed in turn in-process by tests/test_commit.py.

INTERIOR_CALLS = 2


def _interior(count, every):
  inside = list(range(1, count - 1))
  if every or len(inside) <= INTERIOR_CALLS:
    return inside
  step = len(inside) / (INTERIOR_CALLS + 1)
  return sorted({inside[int(step * (i + 1))] for i in range(INTERIOR_CALLS)})


def _calls_in_turn(job, every):
  failures = []
  for kind in KINDS_OF_CALL:
    count = sum(1 for e in job.log if call_kind(e, job.ref_key) == kind)
    for index in _interior(count, every):
      try:
        job.check_faults(("403", kind, index))
      except AssertionError as e:
        failures.append(str(e)[:500])
  assert failures == []


def test_interior_calls_are_spread_between_first_and_last():
  assert _interior(2, every=False) == []
  assert _interior(4, every=False) == [1, 2]
  assert _interior(11, every=False) == [4, 7]
  assert _interior(11, every=True) == list(range(1, 10))


@pytest.mark.slow
def test_embed_calls_in_turn_403(embed_job, request):
  _calls_in_turn(embed_job, request.config.getoption("--all-storage-calls"))


@pytest.mark.slow
def test_ingest_calls_in_turn_403(ingest_job, request):
  _calls_in_turn(ingest_job, request.config.getoption("--all-storage-calls"))
