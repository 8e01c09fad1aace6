"""The job-wide per-host cap: keying by host and slot, the keyed fetch, and
a multi-process run whose servers never see more than the cap in flight."""

import csv
import os
import subprocess
import sys

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to

from natvision.pipelines import embed_images
from tests.conftest import real_photo_paths
from tests.http_server import PhotoServer
from natvision.transforms import fetch
from natvision.transforms import hosts
from natvision.transforms import photos
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


@pytest.mark.parametrize("decode_threads", [0, 2])
def test_keyed_fetch_keeps_every_photo_within_the_cap(tmp_path,
                                                      decode_threads):
  """In-process: web and local photos each come out once (a missing one as
  an error row of stage read), and each host sees at most its cap."""
  data = _photo_bytes()
  local = tmp_path / "local.jpg"
  local.write_bytes(data)
  files = {f"/p/{i}.jpg": data for i in range(8)}
  with PhotoServer(files, latency=0.05,
                   hosts=("127.0.0.2", "127.0.0.3", "127.0.0.4")) as server:
    refs = [ImageRef(f"h{h}-{i}", server.url(f"/p/{i}.jpg", h))
            for h in range(3) for i in range(8)]
    refs += [ImageRef("local", str(local)),
             ImageRef("missing", server.url("/p/none.jpg", 1))]
    config = photos.PhotoConfig(
        policies=("squash",), size=32, decode_threads=decode_threads,
        fetch=fetch.FetchConfig(per_host_concurrency=2))
    with beam.Pipeline() as p:
      out = p | beam.Create(refs) | photos.ReadAndPrepare(config)
      assert_that(out.prepared | beam.Map(lambda x: x.ref.image_id),
                  equal_to([r.image_id for r in refs[:-1]]), label="prepared")
      assert_that(out.errors | beam.Map(lambda e: (e.ref.image_id, e.stage)),
                  equal_to([("missing", "read")]), label="errors")
  assert sorted(server.peak.values()) == [2, 2, 2], dict(server.peak)


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
