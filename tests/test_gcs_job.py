"""The whole job on gs://: photos, models and tables in a bucket.

Runs against a real GCS API server on loopback (tests/gcs_server.py); the
models are copied once per worker process to a local cache before loading.
"""

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from natvision.pipelines import embed_images
from tests.gcs_server import upload_dir
from tests.report_helpers import table_rows


def _read_gs_table(prefix):
  paths = sorted(m.path for m in FileSystems.match(
      [prefix.rstrip("/") + "/*.parquet"])[0].metadata_list)
  assert paths, prefix
  rows = []
  for path in paths:
    with FileSystems.open(path) as f:
      rows += pq.read_table(io.BytesIO(f.read())).to_pylist()
  return rows


def test_job_reads_and_writes_gs(gcs_server, tiny_models, photo_dir, tmp_path,
                                 monkeypatch):
  monkeypatch.setenv("NATVISION_MODEL_CACHE", str(tmp_path / "cache"))
  root = gcs_server.bucket_url + "/job"
  upload_dir(str(photo_dir), root + "/photos")
  upload_dir(tiny_models, root + "/models")
  local_out = str(tmp_path / "local")
  common = ["--models", "inaturalist_v2,fungi_mobile_v1", "--runtime", "tf",
            "--batch_size", "3"]
  report = embed_images.run(common + [
      "--input", root + "/photos/*", "--output_dir", root + "/out",
      "--model_root", root + "/models"])
  local = embed_images.run(common + [
      "--input", str(photo_dir / "*"), "--output_dir", local_out,
      "--model_root", tiny_models])

  n = len(os.listdir(photo_dir))
  assert report["inputs"] == n
  assert report["model_loads"] == {"inaturalist_v2": 1, "fungi_mobile_v1": 1}
  emb = _read_gs_table(root + "/out/embeddings/inaturalist_v2")
  errors = _read_gs_table(root + "/out/errors")
  assert len(emb) + len(errors) == n
  assert [e["uri"] for e in errors] == [root + "/photos/broken.jpg"]
  # Same pixels and models as the local run give the same embeddings.
  local_rows = {os.path.basename(r["uri"]): r["embedding"] for r in
                pq.read_table(os.path.join(
                    local_out, "embeddings", "inaturalist_v2")).to_pylist()}
  for row in emb:
    np.testing.assert_allclose(row["embedding"],
                               local_rows[os.path.basename(row["uri"])],
                               rtol=1e-5, atol=1e-6)
  preds = _read_gs_table(root + "/out/predictions/fungi_mobile_v1")
  assert len(preds) == n - 1
  with FileSystems.open(root + "/out/run.json") as f:
    assert table_rows(json.load(f)) == table_rows(report) == table_rows(local)
  assert not FileSystems.match([root + "/out/_staging/**"])[0].metadata_list
  # Models were copied once into the local cache (next to the ONNX cache).
  copies = [d for d in os.listdir(tmp_path / "cache") if d != "onnx"]
  assert len(copies) == 2
