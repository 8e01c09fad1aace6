"""Resume after a dead run: a killed job, run again, reuses its whole shards.

The end-to-end test kills a real local run (a separate process, SIGKILL)
once about half of its photos sit in closed shards, then runs the same
command again and checks exactly-once against a clean run.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import embed_images
from transforms import commit, models, resume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = 60


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory):
  root = tmp_path_factory.mktemp("many")
  rng = np.random.default_rng(3)
  for i in range(PHOTOS):
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), np.uint8)).save(
        root / f"p{i:03d}.png")
  return root


def _args(photos, out, model_root):
  return ["--input", str(photos / "*.png"), "--output_dir", str(out),
          "--models", "inaturalist_v2,fungi_mobile_v1",
          "--model_root", model_root, "--runtime", "tf", "--batch_size", "4",
          "--shard_rows", "4", "--decode_threads", "0"]


def _rows(directory):
  files = glob.glob(os.path.join(directory, "*.parquet"))
  return pa.concat_tables([pq.read_table(f) for f in files])


def _complete_shard_rows(out):
  rows = 0
  for path in glob.glob(os.path.join(
      out, "_staging", "*", "embeddings", "inaturalist_v2", "*.parquet")):
    try:
      rows += pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - being written
      pass
  return rows


# The killed run reads photos slowly (30 ms each), so that it can be killed
# half-way; the code path is otherwise the job's own.
_SLOW_RUN = textwrap.dedent("""
    import sys, time
    from transforms import photos
    real = photos.read_decode_prepare
    def slow(*a, **k):
      time.sleep(0.03)
      return real(*a, **k)
    photos.read_decode_prepare = slow
    from pipelines import embed_images
    sys.exit(embed_images.main(sys.argv[1:]))
""")


def test_killed_run_resumes_exactly_once(tiny_models, many_photos, tmp_path):
  clean = tmp_path / "clean"
  embed_images.run(_args(many_photos, clean, tiny_models))

  out = tmp_path / "out"
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen(
      [sys.executable, "-c", _SLOW_RUN] + _args(many_photos, out, tiny_models),
      env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 240
  try:
    while _complete_shard_rows(out) < PHOTOS // 2:
      assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
      assert time.time() < deadline, "the run wrote no shards"
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  written = _complete_shard_rows(out)
  assert PHOTOS // 2 <= written < PHOTOS
  assert not os.path.exists(out / "embeddings")  # nothing committed

  report = embed_images.run(_args(many_photos, out, tiny_models))
  # Photos whose rows for *both* models were in whole shards are reused.
  assert PHOTOS // 4 <= report["reused_photos"] < PHOTOS
  assert report["inputs"] == PHOTOS
  assert not os.path.exists(out / "_staging")
  for table in ("embeddings/inaturalist_v2", "predictions/fungi_mobile_v1"):
    got = _rows(out / table).to_pylist()
    ids = [r["image_id"] for r in got]
    assert len(ids) == len(set(ids)) == PHOTOS, table  # once each
    want = {r["image_id"]: r for r in _rows(clean / table).to_pylist()}
    for row in got:
      if "embedding" in row:
        np.testing.assert_allclose(row["embedding"],
                                   want[row["image_id"]]["embedding"],
                                   atol=1e-6)
      else:
        assert row["top_k_label_ids"] == want[row["image_id"]][
            "top_k_label_ids"]
  assert _rows(out / "errors").num_rows == 0
  with open(out / "run.json") as f:
    assert json.load(f)["reused_photos"] == report["reused_photos"]


def _layout(tmp_path, run_id):
  resolved = models.resolve_models(["inaturalist_v2", "fungi_mobile_v1"],
                                   "/m", requested_runtime="tf")
  return commit.plan_layout(str(tmp_path), resolved, (), run_id), resolved


def _write(spec, name, ids, model=None):
  os.makedirs(spec.staged, exist_ok=True)
  columns = {n: [] for n in spec.schema.names}
  for i in ids:
    for n in spec.schema.names:
      field = spec.schema.field(n)
      if n == "image_id":
        value = i
      elif n == "uri":
        value = f"/p/{i}"
      elif n == "model":
        value = model
      elif pa.types.is_fixed_size_list(field.type):
        value = [0.0] * field.type.list_size
      elif pa.types.is_list(field.type):
        value = []
      elif pa.types.is_integer(field.type) or pa.types.is_floating(field.type):
        value = 0
      else:
        value = "x"
      columns[n].append(value)
  path = os.path.join(spec.staged, name)
  pq.write_table(pa.Table.from_pydict(columns, schema=spec.schema), path)
  return path


def test_plan_reuses_only_complete_photos_from_whole_shards(tmp_path):
  dead, names = _layout(tmp_path, "dead")
  emb = dead.table("embeddings/inaturalist_v2")
  pred = dead.table("predictions/fungi_mobile_v1")
  err = dead.table("errors")
  _write(emb, "part-a.parquet", ["p1", "p2", "p3"])
  _write(emb, "part-b.parquet", ["p3"])  # a retried bundle's copy
  _write(pred, "part-a.parquet", ["p1", "p3"])
  _write(err, "part-a.parquet", ["p2"], model="fungi_mobile_v1")
  _write(err, "part-b.parquet", ["p5"], model=None)  # read error
  cut = _write(pred, "part-c.parquet", ["p4"])
  _write(emb, "part-c.parquet", ["p4"])
  with open(cut, "r+b") as f:  # killed while writing: no footer
    f.truncate(os.path.getsize(cut) // 2)

  now, _ = _layout(tmp_path, "now")
  plan = resume.plan_resume(str(tmp_path), "now", now.tables,
                            [m.name for m in names])
  assert plan.complete == {"p1", "p2", "p3", "p5"}
  assert plan.dead_runs == (commit.staging_dir(str(tmp_path), "dead"),)
  keep = {(s.table, os.path.basename(s.path)): s.keep for s in plan.shards}
  assert keep[("embeddings/inaturalist_v2", "part-a.parquet")] == {
      ("p1", "inaturalist_v2"), ("p2", "inaturalist_v2"),
      ("p3", "inaturalist_v2")}
  assert ("embeddings/inaturalist_v2", "part-b.parquet") not in keep
  assert keep[("errors", "part-b.parquet")] == {("p5", None)}


def test_plan_ignores_shards_of_another_command(tmp_path):
  dead, _ = _layout(tmp_path, "dead")
  _write(dead.table("embeddings/inaturalist_v2"), "part-a.parquet", ["p1"])
  _write(dead.table("predictions/fungi_mobile_v1"), "part-a.parquet", ["p1"])
  resolved = models.resolve_models(["inaturalist_v2", "fungi_mobile_v1"],
                                   "/other", requested_runtime="tf")
  now = commit.plan_layout(str(tmp_path), resolved, (), "now")
  plan = resume.plan_resume(str(tmp_path), "now", now.tables,
                            [m.name for m in resolved])
  assert plan.complete == frozenset()
