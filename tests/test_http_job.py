"""natvision-embed on photos served over loopback HTTP, and file:// input."""

import csv
import json
import os

import pyarrow.parquet as pq
import pytest

from natvision.pipelines import embed_images
from tests.conftest import real_photo_paths
from tests.http_server import PhotoServer

EMB = "inaturalist_v2"


def _rows(out, table):
  return pq.read_table(os.path.join(out, table)).to_pylist()


def _manifest(path, uris):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["uri", "site"])
    for i, uri in enumerate(uris):
      writer.writerow([uri, f"site{i}"])
  return str(path)


def test_manifest_of_https_urls(tmp_path, tiny_models):
  photos = {f"/p/{os.path.basename(p)}": open(p, "rb").read()
            for p in real_photo_paths()[:3]}
  with PhotoServer(photos, latency=0.05) as server:
    first = next(iter(photos))
    server.plan(first, ("status", 503, {"Retry-After": "0"}, b""))
    server.plan("/p/page.jpg", ("status", 200, {"Content-Type": "text/html"},
                                b"<title>Sign in</title>"))
    uris = [server.url(p) for p in photos] + [
        server.url("/p/missing.jpg"), server.url("/p/page.jpg")]
    out = str(tmp_path / "out")
    report = embed_images.run([
        "--input", _manifest(tmp_path / "m.csv", uris), "--output_dir", out,
        "--model_root", tiny_models, "--models", EMB, "--runtime", "tf",
        "--user_agent", "mailto:test@example.org"])
  embedded = {r["uri"]: r for r in _rows(out, f"embeddings/{EMB}")}
  assert sorted(embedded) == sorted(uris[:3])
  assert all(len(r["embedding"]) == 64 for r in embedded.values())
  assert embedded[uris[1]]["site"] == "site1"
  errors = {r["uri"]: r for r in _rows(out, "errors")}
  assert errors[uris[3]]["stage"] == "read"
  assert errors[uris[3]]["error"] == f"not found (HTTP 404): {uris[3]}"
  assert "sent text/html page titled 'Sign in', not an image" in (
      errors[uris[4]]["error"])
  assert server.requests[first] == 2  # the 503 was retried
  assert server.requests["/p/missing.jpg"] == 1
  assert set(server.user_agents) == {"natvision/0.1.0 (mailto:test@example.org)"}
  assert report["inputs"] == 5 and report["errors"]["total"] == 2
  flags = json.load(open(os.path.join(out, "run.json")))["flags"]
  assert "--user_agent" in flags


def test_file_uri_glob(tmp_path, tiny_models, photo_dir):
  out = str(tmp_path / "out")
  report = embed_images.run([
      "--input", f"file://{photo_dir}/*.jpg", "--output_dir", out,
      "--model_root", tiny_models, "--models", EMB, "--runtime", "tf"])
  expected = sorted(str(p) for p in photo_dir.glob("*.jpg"))
  rows = _rows(out, f"embeddings/{EMB}") + _rows(out, "errors")
  assert sorted(r["uri"] for r in rows) == expected
  assert report["inputs"] == len(expected)


@pytest.mark.parametrize("uri,message", [
    ("ftp://host/a.jpg", "no installed filesystem reads ftp://"),
])
def test_unreadable_scheme_fails_before_launch(tmp_path, tiny_models, capsys,
                                               uri, message):
  code = embed_images.main([
      "--input", _manifest(tmp_path / "m.csv", ["/a.jpg", uri]),
      "--output_dir", str(tmp_path / "out"), "--model_root", tiny_models,
      "--models", EMB, "--runtime", "tf"])
  assert code == 2
  assert message in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out")


def test_http_glob_refused(tmp_path, tiny_models, capsys):
  code = embed_images.main([
      "--input", "https://example.org/photos/*.jpg",
      "--output_dir", str(tmp_path / "out"), "--model_root", tiny_models,
      "--models", EMB, "--runtime", "tf"])
  assert code == 2
  assert "cannot be listed like a folder" in capsys.readouterr().err


def test_labels_do_not_decide_and_a_trickling_host_cannot_stall(
    tmp_path, tiny_models):
  """Photos sent as text/plain and text/html are embedded; an HTML page sent
  as image/jpeg and a photo trickled past --photo_timeout are error rows of
  stage read; the job ends within seconds."""
  paths = real_photo_paths()[:3]
  photos = {f"/p/{i}.jpg": open(p, "rb").read() for i, p in enumerate(paths)}
  photos["/p/slow.jpg"] = photos["/p/0.jpg"]
  with PhotoServer(photos, content_type="text/plain",
                   hosts=("127.0.0.1", "127.0.0.5")) as server:
    server.plan("/p/1.jpg", ("status", 200, {"Content-Type": "text/html"},
                             photos["/p/1.jpg"]))
    server.plan("/p/page.jpg", ("status", 200, {"Content-Type": "image/jpeg"},
                                b"<html><head><title>Please log in</title>"
                                b"</head><body>...</body></html>"))
    server.plan("/p/slow.jpg", ("trickle", 16, 0.1))
    uris = [server.url(p) for p in ("/p/0.jpg", "/p/1.jpg", "/p/2.jpg",
                                    "/p/page.jpg")]
    uris.append(server.url("/p/slow.jpg", 1))
    out = str(tmp_path / "out")
    report = embed_images.run([
        "--input", _manifest(tmp_path / "m.csv", uris), "--output_dir", out,
        "--model_root", tiny_models, "--models", EMB, "--runtime", "tf",
        "--photo_timeout", "2"])
  embedded = sorted(r["uri"] for r in _rows(out, f"embeddings/{EMB}"))
  assert embedded == sorted(uris[:3])
  errors = {r["uri"]: r for r in _rows(out, "errors")}
  assert sorted(errors) == sorted(uris[3:])
  assert errors[uris[3]]["stage"] == "read"
  assert errors[uris[3]]["error"] == (
      "the server sent HTML body labelled image/jpeg page titled 'Please log "
      f"in', not an image: {uris[3]}")
  assert errors[uris[4]]["stage"] == "read"
  assert errors[uris[4]]["error"].startswith(
      f"photo_timeout: no complete response within 2 s ({uris[4]})")
  assert server.requests["/p/slow.jpg"] == 1
  assert report["inputs"] == 5 and report["errors"]["total"] == 2


@pytest.mark.parametrize("flag,value", [("--photo_timeout", "0"),
                                        ("--photo_timeout", "-5"),
                                        ("--host_failure_limit", "-1")])
def test_fetch_deadline_flags_checked_before_launch(tmp_path, tiny_models,
                                                    capsys, flag, value):
  code = embed_images.main([
      "--input", _manifest(tmp_path / "m.csv", ["https://example.org/a.jpg"]),
      "--output_dir", str(tmp_path / "out"), "--model_root", tiny_models,
      "--models", EMB, "--runtime", "tf", flag, value])
  assert code == 2
  assert f"{flag} must be" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out")
