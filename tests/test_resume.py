"""Resume after a dead run: a killed job, run again, reuses its whole shards.

The end-to-end test kills a real local run (a separate process, SIGKILL)
once about half of its photos sit in closed shards, then runs the same
command again and checks exactly-once against a clean run.
"""

import dataclasses
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from natvision import transforms
from natvision.pipelines import embed_images
from natvision.transforms import commit, models, resume, runtimes, sinks, taxonomy
from natvision.transforms import spec as spec_lib
from natvision.transforms.records import ImageRef

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
    from natvision.transforms import photos
    real = photos.read_decode_prepare
    def slow(*a, **k):
      time.sleep(0.03)
      return real(*a, **k)
    photos.read_decode_prepare = slow
    from natvision.pipelines import embed_images
    sys.exit(embed_images.main(sys.argv[1:]))
""")


# Slow tier: a real run killed mid-way in a child process; the default tier
# resumes from shards a test writes (below).
@pytest.mark.slow
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


NAMES = ["inaturalist_v2", "fungi_mobile_v1"]
INT8_FILE = "/cache/inaturalist_v2-0123456789abcdef.int8.onnx"


def _decided(location="/m", runtime="tf", precision="fp32", resize=None):
  """The two models as a launcher would have decided them (no model files
  are read: the decisions are made here)."""
  decided = []
  for model in models.resolve_models(NAMES, location, resize=resize,
                                     requested_runtime=runtime):
    int8 = precision == "int8"
    decided.append(model.with_decision(runtimes.RuntimeDecision(
        runtime, note="made by the test", precision=precision,
        onnx_path=INT8_FILE if int8 else None)))
  return decided


def _run_spec(decided, fingerprint="a" * 32, top_k=5, color_profile="ignore",
              max_pixels=50_000_000, taxa=None, rollup_threshold=0.8):
  if taxa is not None:  # --taxa: the classifier's labels as taxa
    taxa_table = taxonomy.Taxa(kind=taxonomy.INATURALIST,
                               rank={1: "genus", 2: "genus"},
                               name={1: "Amanita", 2: taxa},
                               ancestry={1: (), 2: ()})
    decided = [dataclasses.replace(m, label_taxa=taxonomy.match_labels(
        ["Amanita", taxa], taxa_table, rollup_threshold))
               if m.spec.kind == models.CLASSIFIER else m for m in decided]
  return spec_lib.RunSpec(
      models=tuple(spec_lib.decided_model(m, top_k, fingerprint)
                   for m in decided),
      color_profile=color_profile, max_file_bytes=100_000_000,
      max_pixels=max_pixels, version=transforms.__version__)


def _layout(tmp_path, run_id, **changes):
  """A run's layout and spec; ``changes`` go to ``_decided`` (location,
  runtime, precision, resize) or to ``_run_spec`` (the rest)."""
  decided_args = {k: changes.pop(k) for k in list(changes)
                  if k in ("location", "runtime", "precision", "resize")}
  decided = _decided(**decided_args)
  run = _run_spec(decided, **changes)
  return commit.plan_layout(str(tmp_path), decided, (), run_id, run=run), run


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
  dead, dead_run = _layout(tmp_path, "dead")
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

  now, run = _layout(tmp_path, "now")
  assert run == dead_run  # the same command: the same spec
  plan = resume.plan_resume(str(tmp_path), "now", now.tables, run)
  # The launcher lists whole shards, footers only; no photo ids.
  assert {(s.table, os.path.basename(s.path)) for s in plan.shards} == {
      ("embeddings/inaturalist_v2", "part-a.parquet"),
      ("embeddings/inaturalist_v2", "part-b.parquet"),
      ("embeddings/inaturalist_v2", "part-c.parquet"),
      ("predictions/fungi_mobile_v1", "part-a.parquet"),
      ("errors", "part-a.parquet"), ("errors", "part-b.parquet")}
  assert plan.dead_runs == (commit.staging_dir(str(tmp_path), "dead"),)
  assert plan.models == tuple(NAMES)

  # The graph joins them with the input: p6 is new, p4 has one model's
  # row only (the other shard was cut short), p7 is no longer an input.
  _write(emb, "part-d.parquet", ["p7"])
  _write(pred, "part-d.parquet", ["p7"])
  plan = resume.plan_resume(str(tmp_path), "now", now.tables, run)
  refs = [ImageRef(image_id=f"p{i}", uri=f"/p/p{i}") for i in range(1, 7)]
  with TestPipeline() as p:
    out = (p | beam.Create(refs)
           | resume.LeaveOutReused(plan, now.tables))
    assert_that(out[resume.TODO] | "Ids" >> beam.Map(lambda r: r.image_id),
                equal_to(["p4", "p6"]), label="todo")
    assert_that(out[resume.TALLIES], equal_to(
        [(resume.REUSED_PHOTOS, 1)] * 4), label="tallies")
    assert_that(out[resume.ERROR_ROWS] | beam.FlatMap(
        lambda t: zip(t.column("image_id").to_pylist(),
                      t.column("model").to_pylist())),
                equal_to([("p2", "fungi_mobile_v1"), ("p5", None)]),
                label="error_rows")
  copied = {}
  for table in now.tables:
    for path in glob.glob(os.path.join(table.staged, "*.parquet")):
      got = pq.read_table(path)
      assert got.schema == table.schema
      copied.setdefault(table.name, []).append(
          sorted(got.column("image_id").to_pylist()))
  # p3's second copy (part-b) is not taken; p4 and p7 are not copied.
  assert {name: sorted(ids) for name, ids in copied.items()} == {
      "embeddings/inaturalist_v2": [["p1", "p2", "p3"]],
      "predictions/fungi_mobile_v1": [["p1", "p3"]],
      "errors": [["p2"], ["p5"]]}


def test_reused_rows_of_one_photo():
  models = frozenset(NAMES)
  emb = resume.DeadRow("embeddings/inaturalist_v2", "/d/emb-b", None)
  emb = emb._replace(model="inaturalist_v2")
  emb_first = emb._replace(path="/d/emb-a")
  pred = resume.DeadRow("predictions/fungi_mobile_v1", "/d/pred",
                        "fungi_mobile_v1")
  err = resume.DeadRow("errors", "/d/err", "fungi_mobile_v1")
  photo_err = resume.DeadRow("errors", "/d/err", None)
  assert resume.reused_rows([emb], models) == []  # one model missing
  assert resume.reused_rows([emb, emb_first, pred], models) == [
      ("/d/emb-a", "inaturalist_v2"), ("/d/pred", "fungi_mobile_v1")]
  assert resume.reused_rows([emb, err], models) == [
      ("/d/emb-b", "inaturalist_v2"), ("/d/err", "fungi_mobile_v1")]
  # A photo-level error row wins over the photo's other rows.
  assert resume.reused_rows([emb, photo_err], models) == [("/d/err", None)]


# Every field of the spec that changes rows: (the flags of one run, those
# of another that differs from it in that field alone), as changes to
# _layout's defaults (fp32 on tf, ignore, the registry's preparation,
# top-k 5, fingerprint aaa..., location /m).
OTHER_RUNS = {
    "precision": (dict(runtime="onnx"), dict(runtime="onnx",
                                              precision="int8")),
    "color_profile": ({}, dict(color_profile="srgb")),
    "resize": ({}, dict(resize="center_crop")),  # fungi's default: squash
    "fingerprint": ({}, dict(fingerprint="b" * 32)),
    "runtime": ({}, dict(runtime="onnx")),
    "top_k": ({}, dict(top_k=3)),
    "location": ({}, dict(location="/other")),
    "max_pixels": ({}, dict(max_pixels=1_000_000)),
    # --taxa: another taxonomy, or none, or another roll-up threshold.
    "taxa_fingerprint": (dict(taxa="Boletus"), dict(taxa="Suillus")),
    "rollup_threshold": (dict(taxa="Boletus"),
                         dict(taxa="Boletus", rollup_threshold=0.9)),
}


@pytest.mark.parametrize("field", sorted(OTHER_RUNS))
def test_a_dead_attempt_made_another_way_is_not_reused(tmp_path, field,
                                                       caplog):
  """Both ways round: a run never takes over rows made another way."""
  one, other = OTHER_RUNS[field]
  for dead_changes, now_changes in ((one, other), (other, one)):
    out = tmp_path / ("a" if dead_changes is one else "b")
    dead, dead_run = _layout(out, "dead", **dict(dead_changes))
    for table in dead.tables:
      model = "fungi_mobile_v1" if table.name == "errors" else None
      _write(table, "part-a.parquet", ["p1", "p2"], model=model)
    now, run = _layout(out, "now", **dict(now_changes))
    assert dead_run != run
    caplog.clear()
    with caplog.at_level(logging.INFO):
      plan = resume.plan_resume(str(out), "now", now.tables, run)
    assert plan.shards == ()
    # The log line names what differs.
    lines = [r.getMessage() for r in caplog.records
             if "not reusing 3 shard(s)" in r.getMessage()]
    assert len(lines) == 1 and "made another way" in lines[0], lines
    assert f"{field}: " in lines[0], lines[0]
    # The same dead shards are reused by a run made their way (the test
    # can tell reuse from refusal).
    again = resume.plan_resume(str(out), "now", _layout(
        out, "now", **dict(dead_changes))[0].tables, dead_run)
    assert len(again.shards) == 3  # one per table


def test_a_shard_without_a_recorded_spec_is_not_reused(tmp_path, caplog):
  old, run = _layout(tmp_path, "dead")
  for table in old.tables:
    # As an older natvision wrote it: the same columns, no spec.
    meta = json.loads(table.schema.metadata[sinks.METADATA_KEY])
    del meta["spec"]
    schema = table.schema.with_metadata(
        {sinks.METADATA_KEY: json.dumps(meta).encode()})
    model = "fungi_mobile_v1" if table.name == "errors" else None
    _write(dataclasses.replace(table, schema=schema), "part-a.parquet",
           ["p1"], model=model)
  now, _ = _layout(tmp_path, "now")
  with caplog.at_level(logging.INFO):
    plan = resume.plan_resume(str(tmp_path), "now", now.tables, run)
  assert plan.shards == ()
  assert any("records no run spec" in r.getMessage() for r in caplog.records)


def test_the_spec_round_trips_through_json_and_table_metadata(tmp_path):
  layout, run = _layout(tmp_path, "r", runtime="onnx", precision="int8",
                        color_profile="srgb", top_k=3)
  assert spec_lib.RunSpec.from_json(run.to_json()) == run
  assert run.to_json() == spec_lib.RunSpec.from_json(run.to_json()).to_json()
  assert run.model("inaturalist_v2").int8_file == INT8_FILE
  assert run.model("inaturalist_v2").top_k is None  # embedders keep none
  assert run.model("fungi_mobile_v1").top_k == 3
  for table in layout.tables:
    path = _write(table, "part-a.parquet", ["p1"])
    assert sinks.recorded_spec(pq.read_schema(path)) == run
  with pytest.raises(spec_lib.SpecError, match="not a run spec"):
    spec_lib.RunSpec.from_json('{"models": []}')


def _plain_args(photos, out, model_root, *more):
  return ["--input", str(photos / "*.png"), "--output_dir", str(out),
          "--models", "inaturalist_v2", "--model_root", model_root,
          "--runtime", "tf", "--batch_size", "4", "--decode_threads", "0",
          *more]


def test_a_plain_rerun_does_not_take_over_a_dead_srgb_attempt(tiny_models,
                                                               tmp_path):
  """A dead --color_profile srgb attempt, then the plain command again."""
  from tests import corpus  # pylint: disable=import-outside-toplevel
  photos = tmp_path / "photos"
  photos.mkdir()
  rng = np.random.default_rng(11)
  for i in range(6):  # saturated colours: Adobe RGB -> sRGB moves them
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), np.uint8)).save(
        photos / f"a{i}.png", icc_profile=corpus.icc_matrix_profile("Adobe"))
  # The dead attempt's closed shards, as a killed srgb run leaves them in
  # its staging folder (here: the shards of a finished srgb run, moved
  # there, which are the same closed files).
  srgb = tmp_path / "srgb"
  embed_images.run(_plain_args(photos, srgb, tiny_models,
                               "--color_profile", "srgb"))
  out = tmp_path / "out"
  for table in ("embeddings/inaturalist_v2", "errors"):
    shutil.copytree(srgb / table, out / "_staging" / "dead-srgb" / table)
  report = embed_images.run(_plain_args(photos, out, tiny_models))
  assert report["reused_photos"] == 0
  assert report["spec"]["color_profile"] == "ignore"
  assert not os.path.exists(out / "_staging")
  got = {r["image_id"]: r["embedding"]
         for r in _rows(out / "embeddings/inaturalist_v2").to_pylist()}
  dead = {r["image_id"]: r["embedding"]
          for r in _rows(srgb / "embeddings/inaturalist_v2").to_pylist()}
  assert set(got) == set(dead) and len(got) == 6
  # Made again, without the profile: every row differs from the srgb one by
  # far more than one runtime's recomputation of a row may (its tolerance).
  tolerance = runtimes.TOLERANCES[models.EMBEDDER]
  for image_id, row in got.items():
    diff = runtimes.output_difference(np.array([row]),
                                      np.array([dead[image_id]]))
    assert diff > 10 * tolerance, image_id
  meta = json.loads(pq.read_schema(glob.glob(str(
      out / "embeddings/inaturalist_v2/*.parquet"))[0]).metadata[
          sinks.METADATA_KEY])
  assert spec_lib.RunSpec.from_dict(meta["spec"]).color_profile == "ignore"
