"""The job-wide per-host cap: keying by host and slot, and multi-process
runs whose servers never see more than the cap in flight (the keyed DoFn
in-process is tests/test_photos_keyed.py's)."""

import csv
import os
import subprocess
import sys
import time

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to

from natvision.pipelines import embed_images
from tests.conftest import real_photo_paths
from tests.http_server import PhotoServer
from tests.slow_servers import SlowHeaders
from natvision.transforms import hosts
from natvision.transforms.records import ImageRef

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMB = "inaturalist_v2"


def test_a_host_has_at_most_cap_keys_and_every_slot_is_used():
  refs = [ImageRef(f"id-{i}", f"https://Photos.Example.org/{i}.jpg")
          for i in range(200)]
  keys = {hosts.host_key(r, 3) for r in refs}
  assert keys == {"photos.example.org#0", "photos.example.org#1",
                  "photos.example.org#2"}
  other_port = ImageRef("id-0", "http://photos.example.org:8080/0.jpg")
  assert hosts.host_key(other_port, 3).startswith("photos.example.org:8080#")


def test_slots_are_stable_across_processes():
  """The same slot in another process with another hash seed (a slot from
  Python's salted ``hash`` would differ)."""
  ids = [f"photo-{i}" for i in range(50)]
  here = [hosts.slot_of(i, 8) for i in ids]
  code = ("import sys; from transforms import hosts; "
          "print([hosts.slot_of(f'photo-{i}', 8) for i in range(50)])")
  for seed in ("1", "2"):
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True,
        text=True, cwd=REPO,
        env=dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=REPO))
    assert out.stdout.strip() == str(here)
  assert len(set(here)) == 8
  assert hosts.slot_of("photo-0", 8) == here[0]


def test_only_web_photos_are_keyed():
  refs = [ImageRef("web", "https://a.example.org/x.jpg"),
          ImageRef("plain", "http://127.0.0.2:81/y.jpg"),
          ImageRef("local", "/data/z.jpg"),
          ImageRef("file", "file:///data/z.jpg"),
          ImageRef("gcs", "gs://bucket/z.jpg"),
          ImageRef("s3", "s3://bucket/z.jpg")]
  with beam.Pipeline() as p:
    keyed, unkeyed = hosts.key_by_host(p | beam.Create(refs), 4)
    assert_that(keyed | beam.MapTuple(lambda key, ref: (
        key.split("#")[0], ref.image_id)),
                equal_to([("a.example.org", "web"),
                          ("127.0.0.2:81", "plain")]), label="keyed")
    assert_that(unkeyed | beam.Map(lambda r: r.image_id),
                equal_to(["local", "file", "gcs", "s3"]), label="unkeyed")
  assert keyed.element_type.tuple_types[0] is str  # a deterministic key coder


def _photo_bytes():
  return open(real_photo_paths()[0], "rb").read()


def _manifest(path, uris):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["uri"])
    writer.writerows([u] for u in uris)
  return str(path)


@pytest.mark.slow
def test_cap_holds_for_the_job_with_two_worker_processes(tmp_path,
                                                         tiny_models,
                                                         monkeypatch):
  """22 loopback hosts, 10 photos each, --per_host_concurrency 2, two worker
  processes: no server ever has more than 2 requests in flight.  Each
  process may have every photo in flight (--fetch_concurrency 64, --prefetch
  256), so with a cap per process both would fetch a host at once: 4."""
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [REPO] + ([os.environ["PYTHONPATH"]] if "PYTHONPATH" in os.environ
                else [])))
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  data = _photo_bytes()
  files = {f"/p/{i}.jpg": data for i in range(10)}
  addresses = [f"127.0.0.{i}" for i in range(2, 24)]
  with PhotoServer(files, latency=0.2, hosts=addresses) as server:
    uris = [server.url(f"/p/{i}.jpg", h)
            for h in range(len(addresses)) for i in range(10)]
    out = str(tmp_path / "out")
    report = embed_images.run([
        "--input", _manifest(tmp_path / "m.csv", uris), "--output_dir", out,
        "--model_root", tiny_models, "--models", EMB, "--runtime", "tf",
        "--per_host_concurrency", "2", "--fetch_concurrency", "64",
        "--prefetch", "256",
        "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
  assert len(server.peak) == len(addresses)
  assert max(server.peak.values()) == 2, dict(server.peak)
  assert sum(server.requests.values()) == len(uris)
  rows = pq.read_table(os.path.join(out, "embeddings", EMB)).to_pylist()
  assert sorted(r["uri"] for r in rows) == sorted(uris)
  assert report["inputs"] == len(uris) and report["errors"]["total"] == 0


@pytest.mark.slow
def test_breaker_and_pause_hold_for_the_job_with_two_worker_processes(
    tmp_path, tiny_models, monkeypatch):
  """Two worker processes, 23 loopback hosts of 6 photos, 2 slots a host,
  --host_failure_limit 3, --photo_timeout 4: 20 good hosts; a dead one
  (503 to everything) that sees at most 2 x 3 requests in the whole job;
  one that answers 429 Retry-After: 2 for its first 2 s, to which no slot
  sends again before its Retry-After is over and which gets at most one
  request per slot in that window; and one that sends its headers a byte
  every 0.2 s, whose connections are all cut by the photo's deadline.
  The default tier has the same state logic in-process (the two
  ``..._next_worker`` tests of tests/test_photos_keyed.py, and
  tests/test_fetch_client.py)."""
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [REPO] + ([os.environ["PYTHONPATH"]] if "PYTHONPATH" in os.environ
                else [])))
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  data = _photo_bytes()
  files = {f"/p/{i}.jpg": data for i in range(6)}
  good = [f"127.0.0.{i}" for i in range(50, 70)]
  window = {"start": None}
  log = []  # (path, time, status) of the 429 host

  def polite(path):
    now = time.time()
    if window["start"] is None:
      window["start"] = now
    limited = now < window["start"] + 2.0
    log.append((path, now, 429 if limited else 200))
    return ("status", 429, {"Retry-After": "2"}, b"") if limited else None

  with PhotoServer(files, latency=0.05, hosts=good) as ok_server, \
      PhotoServer(files, hosts=("127.0.0.70",),
                  always=("status", 503, {}, b"down")) as dead, \
      PhotoServer(files, hosts=("127.0.0.71",)) as limited, \
      SlowHeaders("127.0.0.72", "trickle", pause=0.2) as slow:
    real_next = limited._next  # pylint: disable=protected-access
    limited._next = lambda path: (real_next(path), polite(path))[1] or (  # pylint: disable=protected-access
        None)
    rows = [(f"ok-{h}-{i}", ok_server.url(f"/p/{i}.jpg", h))
            for h in range(len(good)) for i in range(6)]
    rows += [(f"dead-{i}", dead.url(f"/p/{i}.jpg")) for i in range(6)]
    rows += [(f"polite-{i}", limited.url(f"/p/{i}.jpg")) for i in range(6)]
    rows += [(f"slow-{i}", f"{slow.base}/p/{i}.jpg") for i in range(6)]
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["image_id", "uri"])
      writer.writerows(rows)
    out = str(tmp_path / "out")
    start = time.monotonic()
    report = embed_images.run([
        "--input", str(manifest), "--output_dir", out,
        "--model_root", tiny_models, "--models", EMB, "--runtime", "tf",
        "--per_host_concurrency", "2", "--fetch_concurrency", "16",
        "--host_failure_limit", "3", "--photo_timeout", "4",
        "--read_attempts", "4",
        "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    elapsed = time.monotonic() - start
    time.sleep(0.5)
    held = list(slow.held_s)
  assert sum(dead.requests.values()) <= 2 * 3, dict(dead.requests)
  errors = pq.read_table(os.path.join(out, "errors")).to_pylist()
  by_id = {e["image_id"]: e["error"] for e in errors}
  assert sorted(i for i in by_id if i.startswith("dead")) == [
      f"dead-{i}" for i in range(6)]
  assert any(by_id[f"dead-{i}"].startswith("host unavailable after 3 "
                                           "consecutive failures")
             for i in range(6)), by_id
  # The 429 host: after a 429 to a slot, that slot waits out the 2 s.
  slot_of = {f"/p/{i}.jpg": hosts.slot_of(f"polite-{i}", 2) for i in range(6)}
  for n, (path, when, status) in enumerate(log):
    if status != 429:
      continue
    later = [t for p, t, _ in log[n + 1:] if slot_of[p] == slot_of[path]]
    assert not later or later[0] >= when + 2.0 - 0.1, log
  in_window = [t for _, t, _ in log if t < log[0][1] + 2.0]
  assert len(in_window) <= 2, log
  assert not any(i.startswith("polite") for i in by_id), by_id
  # The slow host: every connection cut by the 4 s deadline (1 s slack).
  assert held and max(held) < 5.0, held
  assert all(by_id[f"slow-{i}"].startswith(("photo_timeout", "host "
                                            "unavailable")) for i in range(6))
  assert report["inputs"] == len(rows)
  assert report["errors"]["total"] == 12, report["errors"]
  assert elapsed < 120, elapsed
