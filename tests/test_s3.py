"""s3:// photos, globs, manifests, models and snapshot tables, read from a
loopback S3 API server (moto) with no AWS credentials anywhere: unsigned,
as from a public bucket such as inaturalist-open-data."""
# pylint: disable=redefined-outer-name

import csv
import io
import os
import shutil

import pyarrow.parquet as pq
import pytest

from natvision.pipelines import embed_images
from natvision.pipelines import ingest_observations as ingest
from tests.conftest import real_photo_paths
from tests.s3_server import anonymous_aws, s3_server  # noqa: F401 (fixtures)
from tests.snapshot_gen import SPECIES, SyntheticINat
from natvision.transforms import fetch

EMB = "inaturalist_v2"


def _rows(out, table):
  return pq.read_table(os.path.join(out, table)).to_pylist()


def test_public_read_unsigned_and_private_needs_credentials(
    anonymous_aws, monkeypatch):
  public = anonymous_aws.bucket("open-photos")
  private = anonymous_aws.bucket("closed-photos", public=False)
  anonymous_aws.put(f"{public}/a.jpg", b"public bytes")
  anonymous_aws.put(f"{private}/b.jpg", b"private bytes")
  assert fetch.fetch_bytes(f"{public}/a.jpg", 100) == b"public bytes"
  with pytest.raises(fetch.FetchError, match="403") as info:
    fetch.fetch_bytes(f"{private}/b.jpg", 100)
  assert not info.value.not_found and not info.value.transient
  with pytest.raises(fetch.FetchError, match="file not found") as info:
    fetch.fetch_bytes(f"{public}/nope.jpg", 100)
  assert info.value.not_found
  # Credentials in the environment are used: the private object reads.
  monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake-for-moto")
  monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-for-moto")
  monkeypatch.setattr(fetch.s3, "_S3_CLIENTS", {})
  assert fetch.fetch_bytes(f"{private}/b.jpg", 100) == b"private bytes"


def test_embed_glob_manifest_and_models_on_s3(anonymous_aws, tiny_models,
                                              tmp_path, monkeypatch):
  monkeypatch.setenv("NATVISION_MODEL_CACHE", str(tmp_path / "cache"))
  bucket = anonymous_aws.bucket("field-photos")
  anonymous_aws.put_dir(os.path.join(tiny_models, EMB), f"{bucket}/models/{EMB}")
  uris = []
  for path in real_photo_paths()[:3]:
    uri = f"{bucket}/p/{os.path.basename(path)}"
    with open(path, "rb") as f:
      anonymous_aws.put(uri, f.read())
    uris.append(uri)
  jpgs = sorted(u for u in uris if u.endswith(".jpg"))
  out = str(tmp_path / "glob_out")
  report = embed_images.run([
      "--input", f"{bucket}/p/*.jpg", "--output_dir", out,
      "--model_root", f"{bucket}/models", "--models", EMB, "--runtime", "tf"])
  assert sorted(r["uri"] for r in _rows(out, f"embeddings/{EMB}")) == jpgs
  assert report["inputs"] == len(jpgs)

  text = io.StringIO()
  writer = csv.writer(text)
  writer.writerow(["uri", "plot"])
  for i, uri in enumerate(uris + [f"{bucket}/p/deleted.jpg"]):
    writer.writerow([uri, f"plot-{i}"])
  anonymous_aws.put(f"{bucket}/manifest.csv", text.getvalue().encode())
  out = str(tmp_path / "manifest_out")
  embed_images.run([
      "--input", f"{bucket}/manifest.csv", "--output_dir", out,
      "--model_root", tiny_models, "--models", EMB, "--runtime", "tf"])
  rows = _rows(out, f"embeddings/{EMB}")
  assert sorted(r["uri"] for r in rows) == sorted(uris)
  assert {r["uri"]: r["plot"] for r in rows}[uris[2]] == "plot-2"
  errors = _rows(out, "errors")
  assert [(e["uri"], e["stage"], e["error"]) for e in errors] == [
      (f"{bucket}/p/deleted.jpg", "read",
       f"file not found: {bucket}/p/deleted.jpg")]


@pytest.mark.slow
def test_ingest_straight_from_an_open_data_bucket(anonymous_aws, tiny_models,
                                                  tmp_path):
  """The bucket's layout: tables at the root, photos/<id>/<size>.<ext>."""
  world = SyntheticINat(str(tmp_path / "world"), seed=5)
  raven = world.observe(SPECIES["raven"], photos=2)
  agaric = world.observe(SPECIES["fly_agaric"], extension="png")
  world.observe(SPECIES["daisy"], quality_grade="needs_id")
  local = world.write_snapshot("2024-05-27", fmt="csv.gz")
  bucket = anonymous_aws.bucket("inaturalist-open-data")
  anonymous_aws.put_dir(local, bucket)
  for photo in world.photos:
    with open(world.photo_path(photo), "rb") as f:
      anonymous_aws.put(f"{bucket}/photos/{photo.photo_id}/medium."
                        f"{photo.extension}", f.read())
    anonymous_aws.put(f"{bucket}/photos/{photo.photo_id}/original."
                      f"{photo.extension}", b"not this size")
  expected = sorted(str(p.photo_id) for p in world.photos_of(raven)
                    + world.photos_of(agaric))
  templates = {
      "s3": f"{bucket}/photos/{{photo_id}}/medium.{{extension}}",
      # What https://inaturalist-open-data.s3.amazonaws.com/... is here.
      "https": (f"{anonymous_aws.endpoint}/inaturalist-open-data/photos/"
                f"{{photo_id}}/medium.{{extension}}"),
  }
  for name, template in templates.items():
    out = str(tmp_path / f"out_{name}")
    report = ingest.run([
        "--snapshot_dir", f"{bucket}/", "--photo_uri_template", template,
        "--snapshot_date", "2024-05-27", "--output_dir", out,
        "--models", EMB, "--model_root", tiny_models, "--runtime", "tf"])
    table = os.path.join(out, "embeddings", EMB, "snapshot_date=2024-05-27")
    rows = pq.read_table(table).to_pylist()
    assert sorted(r["image_id"] for r in rows) == expected, name
    assert all(r["uri"].startswith(template.split("{")[0]) for r in rows)
    assert report["models"][EMB]["failed"] == 0, name


def test_embed_writes_its_tables_and_run_json_to_s3(anonymous_aws, tiny_models,
                                                     tmp_path, monkeypatch):
  """--output_dir s3://: the job commits its shards and run.json there,
  with no staging left behind, one row per photo."""
  monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake-for-moto")
  monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-for-moto")
  monkeypatch.setattr(fetch.s3, "_S3_CLIENTS", {})
  photos = [p for p in real_photo_paths() if p.endswith(".jpg")][:2]
  local = tmp_path / "p"
  local.mkdir()
  for path in photos:
    shutil.copy(path, local)
  bucket = anonymous_aws.bucket("my-results", public=False)
  argv = ["--input", str(local / "*.jpg"),
          "--output_dir", f"{bucket}/run1", "--model_root", tiny_models,
          "--models", EMB, "--runtime", "tf"]
  report = embed_images.run(argv)
  keys = anonymous_aws.keys("my-results", "run1/")
  shards = [k for k in keys if k.startswith(f"run1/embeddings/{EMB}/")
            and k.endswith(".parquet")]
  assert shards and "run1/run.json" in keys
  assert not [k for k in keys if "_staging/" in k], keys
  rows = sum(pq.read_table(io.BytesIO(fetch.fetch_bytes(
      f"{bucket}/{k}", 10**8))).num_rows for k in shards)
  assert rows == report["inputs"] == len(photos)
