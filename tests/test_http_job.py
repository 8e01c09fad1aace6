"""natvision-embed on photos served over loopback HTTP, and file:// input."""

import csv
import json
import os

import pyarrow.parquet as pq
import pytest

from pipelines import embed_images
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
