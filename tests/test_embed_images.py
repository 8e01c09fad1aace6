"""The whole embed_images job on real photos and real (tiny) TF Hub models.

Values are checked against a direct ``hub.load(...)`` call on the same
prepared pixels, computed here without the pipeline.
"""

import collections
import dataclasses
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
import tensorflow_hub as hub
from apache_beam.testing.test_pipeline import TestPipeline

from natvision.pipelines import embed_images
from natvision.tools import report as html_report
from natvision.transforms import commit, decode, demo, models, preprocess, sinks
from natvision.transforms import config as config_lib
from natvision.transforms import run_summary
from tests.report_helpers import table_rows

ALL = "inaturalist_v2,fungi_mobile_v1,inception_resnet_v2"


def _read(directory):
  files = sorted(os.listdir(directory))
  assert files, f"no files in {directory}"
  tables = [pq.read_table(os.path.join(directory, f)) for f in files
            if f.endswith(".parquet")]
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  return pa.concat_tables(tables)


def _prepared(uri, policy):
  with open(uri, "rb") as f:
    image = decode.decode_image(
        f.read(), min_side=decode.decoded_size_needed([policy], 299))
  return preprocess.prepare(image, policy, 299)


def _direct(model_dir, name, batch):
  obj = hub.load(os.path.join(model_dir, name))
  x = tf.constant(batch.astype(np.float32) / 255.0)
  if name == "inception_resnet_v2":
    return obj(x, training=False).numpy()
  return obj.signatures["default"](images=x)["default"].numpy()


@pytest.fixture(scope="module")
def job(tiny_models, photo_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("out"))
  report = embed_images.run([
      "--input", str(photo_dir / "*"), "--output_dir", out,
      "--models", ALL, "--model_root", tiny_models, "--runtime", "tf",
      "--batch_size", "4", "--top_k", "3"])
  return out, report


def test_every_photo_once_per_model_or_in_errors(job, photo_dir):
  out, report = job
  inputs = {str(p) for p in photo_dir.iterdir()}
  errors = _read(os.path.join(out, "errors")).to_pylist()
  failed_all = {e["uri"] for e in errors if e["model"] is None}
  assert {e["uri"] for e in errors} == {str(photo_dir / "broken.jpg")}
  assert errors[0]["stage"] == "decode" and errors[0]["error"]
  for table in ("embeddings/inaturalist_v2", "predictions/fungi_mobile_v1",
                "embeddings/inception_resnet_v2"):
    uris = _read(os.path.join(out, table)).column("uri").to_pylist()
    assert len(uris) == len(set(uris)), table
    failed_here = {e["uri"] for e in errors if e["model"] == table.split("/")[1]}
    assert set(uris) | failed_all | failed_here == inputs, table
    assert not set(uris) & (failed_all | failed_here), table
  assert report["inputs"] == len(inputs)
  assert table_rows(report)["embeddings/inaturalist_v2"] == len(inputs) - 1
  assert report["errors"]["by_stage"] == {"decode": 1}


def test_embeddings_equal_direct_hub_call(job, tiny_models):
  out, _ = job
  for name, policy, width in (("inaturalist_v2", "center_crop", 64),
                              ("inception_resnet_v2", "squash", 1536)):
    table = _read(os.path.join(out, "embeddings", name))
    assert table.schema.field("embedding").type.list_size == width
    uris = table.column("uri").to_pylist()
    got = np.array(table.column("embedding").to_pylist(), np.float32)
    batch = np.stack([_prepared(u, policy) for u in uris])
    want = _direct(tiny_models, name, batch)
    assert got.shape == (len(uris), width)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(want).max() > 0  # a zero model would pass trivially


def test_predictions_sorted_match_direct_call_and_labelmap(job, tiny_models):
  out, _ = job
  table = _read(os.path.join(out, "predictions", "fungi_mobile_v1"))
  labels = models.read_labelmap(
      os.path.join(tiny_models, "fungi_mobile_v1", "labelmap.csv"))
  uris = table.column("uri").to_pylist()
  probs = _direct(tiny_models, "fungi_mobile_v1",
                  np.stack([_prepared(u, "squash") for u in uris]))
  for row, p in zip(table.to_pylist(), probs):
    want_ids = np.argsort(-p, kind="stable")[:3].tolist()
    assert row["top_k_label_ids"] == want_ids
    np.testing.assert_allclose(row["top_k_scores"], p[want_ids], rtol=1e-4)
    assert row["top_k_scores"] == sorted(row["top_k_scores"], reverse=True)
    assert row["top_k_labels"] == [labels[i] for i in want_ids]
    assert row["label_id"] == want_ids[0] and row["label"] == labels[want_ids[0]]
    assert row["score"] == pytest.approx(row["top_k_scores"][0])


def test_models_load_once_and_run_json(job):
  out, report = job
  assert report["model_loads"] == {"inaturalist_v2": 1, "fungi_mobile_v1": 1,
                                   "inception_resnet_v2": 1}
  with open(os.path.join(out, "run.json")) as f:
    saved = json.load(f)
  assert saved["models"] == report["models"]
  assert list(saved["models"]) == ALL.split(",")
  assert list(saved["models"].values())[2]["output_width"] == 1536
  assert saved["images_per_second"] > 0
  assert not os.path.exists(os.path.join(out, "_staging"))


def test_parquet_metadata_names_the_model(job, tiny_models):
  out, _ = job
  schema = pq.read_schema(next(
      os.path.join(out, "embeddings", "inception_resnet_v2", f)
      for f in os.listdir(os.path.join(out, "embeddings", "inception_resnet_v2"))))
  meta = json.loads(schema.metadata[sinks.METADATA_KEY])
  assert meta["model"]["name"] == "inception_resnet_v2"
  assert meta["model"]["path"] == os.path.join(tiny_models,
                                               "inception_resnet_v2")
  assert meta["model"]["output_width"] == 1536
  assert meta["model"]["resize"] == "squash"
  assert meta["runtime"] == meta["model"]["runtime"] == "tf"
  assert meta["model"]["runtime_note"] == "TensorFlow, as --runtime tf asked"
  assert meta["version"]


def test_onnx_job_matches_tensorflow_and_records_the_decision(
    tiny_models, photo_dir, tmp_path, monkeypatch):
  """The one whole job on ONNX Runtime: launcher decision, worker check
  (on the session's converted files; converting is test_runtimes')."""
  out = str(tmp_path / "out")
  report = embed_images.run([
      "--input", str(photo_dir / "*"), "--output_dir", out,
      "--models", "inaturalist_v2,fungi_mobile_v1", "--model_root",
      tiny_models, "--runtime", "onnx", "--batch_size", "4", "--top_k", "3"])
  assert [(n, m["runtime"]) for n, m in report["models"].items()] == [
      ("inaturalist_v2", "onnx"), ("fungi_mobile_v1", "onnx")]
  assert report["model_loads"] == {"inaturalist_v2": 1, "fungi_mobile_v1": 1}
  table = _read(os.path.join(out, "embeddings", "inaturalist_v2"))
  uris = table.column("uri").to_pylist()
  got = np.array(table.column("embedding").to_pylist(), np.float32)
  want = _direct(tiny_models, "inaturalist_v2",
                 np.stack([_prepared(u, "center_crop") for u in uris]))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert np.abs(want).max() > 0
  predictions = _read(os.path.join(out, "predictions", "fungi_mobile_v1"))
  probs = _direct(tiny_models, "fungi_mobile_v1", np.stack(
      [_prepared(u, "squash") for u in predictions.column("uri").to_pylist()]))
  for row, p in zip(predictions.to_pylist(), probs):
    # Scores of the labels kept are TF's, and they are TF's three largest
    # (ids may swap between runtimes only where scores tie).
    np.testing.assert_allclose(row["top_k_scores"], p[row["top_k_label_ids"]],
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(row["top_k_scores"], np.sort(p)[::-1][:3],
                               rtol=1e-4, atol=1e-7)
  for table_dir in ("embeddings/inaturalist_v2", "predictions/fungi_mobile_v1"):
    schema = pq.read_schema(next(
        os.path.join(out, table_dir, f)
        for f in os.listdir(os.path.join(out, table_dir))))
    meta = json.loads(schema.metadata[sinks.METADATA_KEY])
    assert meta["runtime"] == meta["model"]["runtime"] == "onnx", table_dir
    assert meta["model"]["runtime_note"].startswith(
        "ONNX Runtime; max difference from TensorFlow on the probe batch")


def test_manifest_columns_carried_and_rerun_replaces(tiny_models, photo_dir,
                                                     tmp_path):
  manifest = tmp_path / "photos.csv"
  manifest.write_text(
      "uri,image_id,site\n"
      f"{photo_dir / 'flower.jpg'},f1,meadow\n"
      f"{photo_dir / 'china.jpg'},c1,city\n"
      f"{photo_dir / 'china.jpg'},c1,city\n"
      f"{tmp_path / 'missing.jpg'},m1,nowhere\n")
  out = str(tmp_path / "out")
  argv = ["--input", str(manifest), "--output_dir", out,
          "--models", "fungi_mobile_v1", "--model_root", tiny_models,
          "--runtime", "tf", "--resize", "center_crop"]
  for _ in range(2):
    embed_images.run(argv, test_pipeline=TestPipeline())
  rows = _read(os.path.join(out, "predictions", "fungi_mobile_v1")).to_pylist()
  assert sorted((r["image_id"], r["site"]) for r in rows) == [
      ("c1", "city"), ("f1", "meadow")]
  errors = _read(os.path.join(out, "errors")).to_pylist()
  assert [(e["image_id"], e["stage"], e["site"]) for e in errors] == [
      ("m1", "read", "nowhere")]
  assert "not found" in errors[0]["error"]


def test_bad_model_fails_before_pipeline(tiny_models, photo_dir, tmp_path):
  argv = ["--input", str(photo_dir / "*.jpg"), "--output_dir",
          str(tmp_path / "o"), "--models", "inception_resnet_v2",
          "--runtime", "tf", "--model_handle",
          f"inception_resnet_v2={os.path.join(tiny_models, 'inaturalist_v2')}"]
  with pytest.raises(config_lib.ConfigError, match="inception_resnet_v2"):
    embed_images.run(argv)
  assert not os.path.exists(tmp_path / "o")


def test_demo_command_as_readme_gives_it(demo_standins, tmp_path, capsys,
                                        monkeypatch):
  # README's quickstart: a relative --output_dir in the current folder,
  # through natvision-embed's entry point (setup.py).
  monkeypatch.chdir(tmp_path)
  assert html_report.embed_main(["--demo", "--output_dir", "natvision_demo",
                                 "--runtime", "tf"]) == 0
  printed = capsys.readouterr().out
  assert "stand-in models were used" in printed
  out = str(tmp_path / "natvision_demo")
  errors = _read(os.path.join(out, "errors")).to_pylist()
  assert [os.path.basename(e["uri"]) for e in errors] == ["not_a_photo.jpg"]
  rows = _read(os.path.join(out, "embeddings", "inaturalist_v2"))
  assert sorted(os.path.basename(u) for u in rows.column("uri").to_pylist()) == [
      "chelsea_cat.jpg", "coffee.webp", "flower.jpg", "grass_grayscale.png"]
  # The ids README quotes: the same wherever the package is installed.
  ids = dict(zip((os.path.basename(u) for u in rows.column("uri").to_pylist()),
                 rows.column("image_id").to_pylist()))
  assert ids["flower.jpg"] == "af8807e112ab223c98ad"
  assert ids["coffee.webp"] == "62c823cb047535bee020"
  assert ids["chelsea_cat.jpg"] == "738628193f234897307d"
  with open(os.path.join(out, "run.json")) as f:
    report = json.load(f)
  assert report["error_rate"] == pytest.approx(0.2)
  with open(os.path.join(out, "report.html"), encoding="utf-8") as f:
    assert f.read().startswith("<!DOCTYPE html>")
  # The machine's stand-ins (transforms/demo.py), recorded where they are.
  models_dir = os.path.realpath(demo.standins_root())
  assert [m["path"] for m in report["models"].values()] == [
      os.path.join(models_dir, name) for name in ALL.split(",")]
  meta = json.loads(pq.read_schema(next(
      os.path.join(out, "embeddings", "inaturalist_v2", f)
      for f in os.listdir(os.path.join(out, "embeddings", "inaturalist_v2"))
      if f.endswith(".parquet"))).metadata[sinks.METADATA_KEY])
  assert meta["model"]["path"] == os.path.join(models_dir, "inaturalist_v2")


@pytest.mark.slow  # two demos, the first one writing the stand-ins
def test_a_second_demo_elsewhere_writes_converts_and_loads_nothing(
    demo_standins, tmp_path, capsys, monkeypatch):
  # pylint: disable=import-outside-toplevel
  from natvision.transforms.runtimes import onnx_convert
  from natvision.transforms.runtimes import tf as tf_runtime
  assert html_report.embed_main(["--demo", "--output_dir",
                                 str(tmp_path / "first")]) == 0
  capsys.readouterr()
  done = []
  for module, name in ((demo, "write_in_child"),
                       (onnx_convert, "convert_to_onnx"),
                       (onnx_convert, "convert_in_child"),
                       (onnx_convert, "convert_many"),
                       (tf_runtime, "load_model")):
    real = getattr(module, name)
    monkeypatch.setattr(module, name,
                        lambda *a, _n=name, _f=real, **k: (done.append(_n),
                                                           _f(*a, **k))[1])
  assert html_report.embed_main(["--demo", "--output_dir",
                                 str(tmp_path / "second")]) == 0
  assert done == []  # no stand-in written, no conversion, no TF load
  printed = capsys.readouterr()
  assert "stand-in models were used" in printed.out
  assert len(os.listdir(tmp_path / "second" / "embeddings")) == 2


def test_exit_status_follows_max_error_rate():
  # One photo in five failed: a 10% limit is exceeded, a 30% one is not.
  def summary(**fields):
    return run_summary.RunSummary(job=run_summary.EMBED, **fields)

  assert embed_images.exit_status(summary(error_rate=0.2,
                                          max_error_rate=0.1)) == 3
  assert embed_images.exit_status(summary(error_rate=0.2,
                                          max_error_rate=0.3)) == 0
  assert embed_images.exit_status(summary(error_rate=0.2,
                                          max_error_rate=None)) == 0
  assert embed_images.exit_status(summary(max_error_rate=0.1)) == 0  # not ended


def test_the_pipeline_commits_without_the_launcher(tiny_models, photo_dir,
                                                   tmp_path):
  """What a template launch relies on: no launcher code after p.run()."""
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from natvision.pipelines import launch  # pylint: disable=import-outside-toplevel
  out = str(tmp_path / "out")
  argv = ["--input", str(photo_dir / "*.jpg"), "--output_dir", out,
          "--models", "inaturalist_v2", "--model_root", tiny_models,
          "--runtime", "tf"]
  # The runtime is decided before the graph is built; a model without a
  # decision is refused.
  config, _ = embed_images.parse_args(argv)
  with pytest.raises(ValueError, match="no runtime decision"):
    config.embed.inference_config(config.models[0])
  plan, options = launch.plan_job(embed_images.JOB, argv)
  p = beam.Pipeline(options=options)
  embed_images.JOB.build(p, plan)
  p.run().wait_until_finish()
  n = len(list(photo_dir.glob("*.jpg")))
  rows = _read(os.path.join(out, "embeddings", "inaturalist_v2"))
  errors = _read(os.path.join(out, "errors"))
  assert rows.num_rows + errors.num_rows == n
  with open(os.path.join(out, "run.json")) as f:
    report = json.load(f)
  assert report["run_id"] == plan.layout.run_id and report["inputs"] == n
  assert report["model_loads"] == {"inaturalist_v2": 1}  # counted in-graph
  assert table_rows(report) == {"embeddings/inaturalist_v2": rows.num_rows}
  assert not os.path.exists(os.path.join(out, "_staging"))


def test_sizes_colour_profile_and_raws_in_the_tables(tiny_models, tmp_path):
  """Source and decoded sizes reach both kinds of table; srgb is recorded;
  a DNG is an error row (stage decode), not an embedding of its preview."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from tests import corpus  # pylint: disable=import-outside-toplevel
  photos = tmp_path / "photos"
  photos.mkdir()
  exif = Image.Exif()
  exif[0x0112] = 6  # stored 1536x2048, upright 2048x1536
  corpus.quadrant_card((2048, 1536)).transpose(
      Image.Transpose.ROTATE_90).save(photos / "turned.jpg", quality=85,
                                      exif=exif.tobytes())
  Image.new("RGB", (320, 240), (100, 200, 100)).save(
      photos / "adobe.png", icc_profile=corpus.icc_matrix_profile("Adobe"))
  (photos / "raw.dng").write_bytes(corpus.camera_raw_tiff(dng=True))
  out = str(tmp_path / "out")
  embed_images.run([
      "--input", str(photos / "*"), "--output_dir", out,
      "--models", "inaturalist_v2,fungi_mobile_v1", "--model_root",
      tiny_models, "--runtime", "tf", "--color_profile", "srgb",
      "--batch_size", "2"])
  # center_crop needs a short side of 342: the JPEG, decoded once for both
  # models, is drafted to 1/4 scale; sizes are upright.
  want = {"turned.jpg": (2048, 1536, 512, 384),
          "adobe.png": (320, 240, 320, 240)}
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  for table in ("embeddings/inaturalist_v2", "predictions/fungi_mobile_v1"):
    got = _read(os.path.join(out, table))
    sizes = {os.path.basename(r["uri"]): tuple(r[c] for c in sinks.SIZE_COLUMNS)
             for r in got.to_pylist()}
    assert sizes == want, table
    for name in sinks.SIZE_COLUMNS:
      assert got.schema.field(name).type == pa.int32()
    meta = json.loads(got.schema.metadata[sinks.METADATA_KEY])
    assert meta["color_profile"] == "srgb", table
  errors = _read(os.path.join(out, "errors"))
  assert [(os.path.basename(e["uri"]), e["stage"])
          for e in errors.to_pylist()] == [("raw.dng", "decode")]
  assert "camera raw (DNG)" in errors.column("error")[0].as_py()
  meta = json.loads(errors.schema.metadata[sinks.METADATA_KEY])
  assert meta["color_profile"] == "srgb"


def _column(field, ids):
  """A column of len(ids) values for a shard: the ids for strings, else
  zeros, empty lists or nulls."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  n = len(ids)
  if pa.types.is_string(field.type):
    return ids
  if pa.types.is_fixed_size_list(field.type):
    value = [0.0] * field.type.list_size
  elif pa.types.is_list(field.type):
    value = []
  elif pa.types.is_integer(field.type) or pa.types.is_floating(field.type):
    value = 0
  else:
    return pa.nulls(n, field.type)
  return pa.repeat(pa.scalar(value, field.type), n)


def _launch_peak(tmp_path, n):
  """The launcher's steps before the graph (parse, check the input, plan the
  tables and resume) on a glob of ``n`` empty files and a dead attempt
  whose shards hold ``n`` photos; returns their peak Python allocation."""
  import tracemalloc  # pylint: disable=import-outside-toplevel
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  from natvision.transforms import runtimes  # pylint: disable=import-outside-toplevel
  from natvision.transforms import spec as spec_lib  # pylint: disable=import-outside-toplevel
  photos = tmp_path / f"photos{n}"
  photos.mkdir()
  for i in range(n):
    (photos / f"p{i:06d}.jpg").touch()
  out = str(tmp_path / f"out{n}")
  config, _ = embed_images.parse_args([
      "--input", str(photos / "*.jpg"), "--output_dir", out,
      "--models", "inaturalist_v2", "--model_root", str(tmp_path / "m"),
      "--runtime", "tf"])
  decided = [m.with_decision(runtimes.RuntimeDecision("tf", note="test"))
             for m in config.models]
  config = dataclasses.replace(config, embed=config.embed.with_models(decided))
  run = spec_lib.for_run(config.embed)
  dead = commit.plan_layout(out, decided, (), "dead", run=run)
  ids = pa.array([f"p{i:06d}" for i in range(n)])
  for table in dead.tables:  # one shard of n rows a table
    os.makedirs(table.staged, exist_ok=True)
    columns = [_column(f, ids) for f in table.schema]
    pq.write_table(pa.Table.from_arrays(columns, schema=table.schema),
                   os.path.join(table.staged, "part-0.parquet"))
  del ids, columns
  tracemalloc.start()
  try:
    checked = embed_images.check_input(config)
    plan = embed_images.JOB.plan(
        config, checked, run_summary.RunSummary(job=run_summary.EMBED), run)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert checked.expected_total == n
  assert {os.path.basename(s.path) for s in plan.resume.shards} == {
      "part-0.parquet"}
  assert len(plan.resume.shards) == len(dead.tables)
  return peak


def test_the_launcher_holds_nothing_per_photo(tmp_path):
  """Issue 16 part 5: the launch steps' peak allocation does not grow with
  the number of photos (on main the glob count kept every path in a set
  and resume every reused id)."""
  _launch_peak(tmp_path, 200)  # imports and caches filled once
  small = _launch_peak(tmp_path, 2_000)
  large = _launch_peak(tmp_path, 20_000)
  assert large < 5_000_000, (small, large)
  assert large / small < 1.1, (small, large)


def _manifest_launch(tmp_path, n):
  """check_input on a CSV manifest of ``n`` rows: (peak Python allocation,
  best CPU seconds of three)."""
  import time  # pylint: disable=import-outside-toplevel
  import tracemalloc  # pylint: disable=import-outside-toplevel
  path = tmp_path / f"m{n}.csv"
  with open(path, "w") as f:  # written in blocks: quick at a million rows
    f.write("uri,site\n")
    for start in range(0, n, 100_000):
      f.write("".join(f"http://127.0.0.1:1/p{i:08d}.jpg,s{i % 7}\n"
                      for i in range(start, min(n, start + 100_000))))
  config, _ = embed_images.parse_args([
      "--input", str(path), "--output_dir", str(tmp_path / "out"),
      "--models", "inaturalist_v2", "--model_root", str(tmp_path / "m")])
  seconds = []
  for _ in range(3):
    began = time.process_time()
    checked = embed_images.check_input(config)
    seconds.append(time.process_time() - began)
  tracemalloc.start()
  try:
    embed_images.check_input(config)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  return checked, peak, min(seconds)


def _check_manifest_launch_is_flat(tmp_path, small_n, large_n):
  _manifest_launch(tmp_path, 100)  # imports and caches filled once
  small, small_peak, small_s = _manifest_launch(tmp_path, small_n)
  large, large_peak, large_s = _manifest_launch(tmp_path, large_n)
  assert small.expected_total == small_n  # counted whole: at the bound
  assert large.expected_total is None  # past it: no total, an estimate
  assert large.manifest.estimated_rows == pytest.approx(large_n, rel=0.05)
  assert large_peak / small_peak < 1.1, (small_peak, large_peak)
  # CPU time, best of three, so that other processes matter less; 20 ms
  # of slack for the clock's granularity.
  assert large_s < 1.1 * small_s + 0.02, (small_s, large_s)


def test_the_launcher_reads_a_bounded_part_of_a_manifest(tmp_path):
  """Issue 16: the launch check of a manifest costs the same at 10,000 and
  100,000 rows (on main it read every row, 10x the time)."""
  _check_manifest_launch_is_flat(tmp_path, 10_000, 100_000)


@pytest.mark.slow
def test_the_launcher_reads_a_bounded_part_of_a_million_row_manifest(
    tmp_path):
  """Issue 16: the same at 10,000 and 1,000,000 rows."""
  _check_manifest_launch_is_flat(tmp_path, 10_000, 1_000_000)


# --------------------------------------------------------------------------
# --taxa: taxon and roll-up columns (transforms/taxonomy.py).


def test_too_many_unmatched_labels_exit_2_before_the_pipeline(
    tiny_models, photo_dir, tmp_path, capsys):
  from tests import taxa_helpers  # pylint: disable=import-outside-toplevel
  taxa = str(tmp_path / "taxa.tsv")
  taxa_helpers.write_standin_taxa(
      os.path.join(tiny_models, "fungi_mobile_v1", "labelmap.csv"), taxa,
      unmatched=100)
  out = tmp_path / "out"
  status = embed_images.main([
      "--input", str(photo_dir / "*.png"), "--output_dir", str(out),
      "--models", "fungi_mobile_v1", "--model_root", tiny_models,
      "--taxa", taxa, "--max_unmatched_labels", "0.01"])
  assert status == 2
  err = capsys.readouterr().err
  assert "--max_unmatched_labels 0.01" in err and "100 of the 4128" in err
  assert not out.exists() or not any(out.iterdir())


def _assert_image_only_columns_equal(plain, rows, added):
  """``rows`` (a run with ``added`` columns) holds ``plain``'s columns, in
  order, with equal values (scores within 1e-6: the same model, another
  run)."""
  assert [n for n in rows.column_names if n not in added] == plain.column_names
  for name in plain.column_names:
    if name == "top_k_scores":
      np.testing.assert_allclose(
          np.array(rows.column(name).to_pylist()),
          np.array(plain.column(name).to_pylist()), rtol=0, atol=1e-6)
    else:
      assert rows.column(name).to_pylist() == plain.column(name).to_pylist()


@pytest.mark.slow
def test_taxa_columns_and_rollup_end_to_end(tiny_models, photo_dir,
                                            tmp_path):
  """Two runs, with and without --taxa, keeping every label (--top_k 4128)
  so that the roll-up can be recomputed from the table itself."""
  from tests import taxa_helpers  # pylint: disable=import-outside-toplevel
  from natvision.transforms import taxonomy  # pylint: disable=import-outside-toplevel
  taxa_path = str(tmp_path / "taxa.tsv")
  labels, taxon_of = taxa_helpers.write_standin_taxa(
      os.path.join(tiny_models, "fungi_mobile_v1", "labelmap.csv"),
      taxa_path)
  common = ["--input", str(photo_dir / "*"), "--models", "fungi_mobile_v1",
            "--model_root", tiny_models, "--runtime", "tf", "--top_k",
            "4128", "--batch_size", "4"]
  plain_out, taxa_out = str(tmp_path / "plain"), str(tmp_path / "taxa")
  embed_images.run(common + ["--output_dir", plain_out])
  threshold = 0.05  # the stand-in's softmax is flat: genera can reach it
  report = embed_images.run(common + [
      "--output_dir", taxa_out, "--taxa", taxa_path,
      "--rollup_threshold", str(threshold)])
  table = "predictions/fungi_mobile_v1"
  plain = _read(os.path.join(plain_out, table)).sort_by("image_id")
  rows = _read(os.path.join(taxa_out, table)).sort_by("image_id")
  # The image-only columns are the same with and without --taxa.
  _assert_image_only_columns_equal(plain, rows, sinks.TAXON_COLUMNS)
  # run.json names the unmatched labels.
  entry = report["taxonomy"]["fungi_mobile_v1"]
  assert entry["unmatched"] == labels[:10] and entry["labels"] == 4128
  assert report["spec"]["models"][0]["rollup_threshold"] == threshold
  # Taxa of the labels, and the roll-up recomputed from the full vector.
  taxa = taxonomy.read_taxa(taxa_path)
  data = rows.to_pylist()
  answered = [r for r in data if r["rollup_taxon_id"] is not None]
  assert answered, "no photo rolled up: the check below would be vacuous"
  for row in data:
    ids = row["top_k_label_ids"]
    assert row["label_taxon_id"] == taxon_of.get(ids[0])
    assert row["top_k_taxon_ids"] == [taxon_of.get(i) for i in ids]
    p = np.zeros(len(labels))
    p[ids] = row["top_k_scores"]
    sums = {}
    for i, taxon in taxon_of.items():
      for node in taxa.ancestors(taxon) + (taxon,):
        sums[node] = sums.get(node, 0.0) + p[i]
    reach = [n for n, s in sums.items() if s >= threshold]
    if not reach:
      assert row["rollup_taxon_id"] is None
      continue
    depth = max(len(taxa.ancestors(n)) for n in reach)
    best = max((n for n in reach if len(taxa.ancestors(n)) == depth),
               key=lambda n: (sums[n], -n))
    assert row["rollup_taxon_id"] == best
    assert row["rollup_rank"] == taxa.rank[best]
    assert row["rollup_name"] == taxa.name[best]
    assert row["rollup_score"] == pytest.approx(sums[best], abs=1e-5)


# --------------------------------------------------------------------------
# --prior: prior-adjusted columns (transforms/prior.py).


def test_prior_without_taxa_exits_2_before_the_pipeline(
    tiny_models, photo_dir, tmp_path, capsys):
  out = tmp_path / "out"
  status = embed_images.main([
      "--input", str(photo_dir / "*.png"), "--output_dir", str(out),
      "--models", "fungi_mobile_v1", "--model_root", tiny_models,
      "--prior", str(tmp_path / "prior.parquet")])
  assert status == 2
  assert "--prior needs --taxa" in capsys.readouterr().err
  assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_prior_columns_end_to_end(tiny_models, photo_dir, tmp_path):
  """A manifest with Darwin Core coordinates, a prior built by
  natvision-prior from a snapshot's observations, and two runs with and
  without --prior keeping every label (--top_k 4128), so that the formula
  can be recomputed from the table itself."""
  import h3  # pylint: disable=import-outside-toplevel
  from tests import taxa_helpers  # pylint: disable=import-outside-toplevel
  from natvision.pipelines import build_prior  # pylint: disable=import-outside-toplevel
  from natvision.transforms import prior  # pylint: disable=import-outside-toplevel
  taxa_path = str(tmp_path / "taxa.tsv")
  labels, taxon_of = taxa_helpers.write_standin_taxa(
      os.path.join(tiny_models, "fungi_mobile_v1", "labelmap.csv"),
      taxa_path)
  # Observations: 300 research-grade ones in Copenhagen's cell, of 40
  # labels' taxa, and one elsewhere.
  rng = np.random.default_rng(5)
  observed = sorted(rng.choice(sorted(taxon_of.values()), 40, replace=False))
  lines = ["observation_uuid\tlatitude\tlongitude\ttaxon_id\tquality_grade"
           "\tobserved_on"]
  counts = collections.Counter()
  for i in range(300):
    taxon = int(observed[i % 40 if i < 200 else i % 7])
    counts[taxon] += 1
    lines.append(f"u{i}\t55.68\t12.57\t{taxon}\tresearch\t2024-05-01")
  lines.append(f"x\t-33.9\t151.2\t{int(observed[0])}\tresearch\t2024-05-01")
  snapshot = tmp_path / "snapshot"
  snapshot.mkdir()
  (snapshot / "observations.csv").write_text("\n".join(lines) + "\n")
  prior_path = str(tmp_path / "prior.parquet")
  build_prior.run(["--observations", str(snapshot), "--output", prior_path])
  # The manifest: Copenhagen, an unobserved place, no coordinates.
  photos = sorted(p for p in os.listdir(photo_dir)
                  if p.endswith((".jpg", ".png")))
  places = [("55.68", "12.57"), ("0.0", "0.0"), ("", "")]
  manifest = tmp_path / "manifest.csv"
  with open(manifest, "w", encoding="utf-8") as f:
    f.write("uri,decimalLatitude,decimalLongitude\n")
    for i, name in enumerate(photos):
      lat, lon = places[i % 3]
      f.write(f"{photo_dir / name},{lat},{lon}\n")
  common = ["--input", str(manifest), "--models", "fungi_mobile_v1",
            "--model_root", tiny_models, "--runtime", "tf", "--top_k",
            "4128", "--batch_size", "4", "--taxa", taxa_path]
  plain_out, prior_out = str(tmp_path / "plain"), str(tmp_path / "prior")
  embed_images.run(common + ["--output_dir", plain_out])
  alpha = 0.5
  report = embed_images.run(common + [
      "--output_dir", prior_out, "--prior", prior_path,
      "--prior_smoothing", str(alpha), "--prior_min_observations", "10"])
  table = "predictions/fungi_mobile_v1"
  plain = _read(os.path.join(plain_out, table)).sort_by("image_id")
  rows = _read(os.path.join(prior_out, table)).sort_by("image_id")
  _assert_image_only_columns_equal(plain, rows, sinks.PRIOR_COLUMNS)
  entry = report["prior"]["fungi_mobile_v1"]
  assert entry["resolution"] == prior.DEFAULT_RESOLUTION
  spec = report["spec"]["models"][0]
  assert spec["prior_fingerprint"] == entry["fingerprint"]
  assert (spec["prior_smoothing"], spec["prior_min_observations"]) == (
      alpha, 10)
  # The formula, recomputed from the observations and the full vector.
  width = len(labels)
  in_cell = np.array([counts.get(taxon_of.get(l), 0) for l in range(width)],
                     float)
  overall = in_cell + np.array([taxon_of.get(l) == int(observed[0])
                                for l in range(width)], float)
  cph = h3.latlng_to_cell(55.68, 12.57, prior.DEFAULT_RESOLUTION)
  kinds = collections.Counter()
  for row in rows.to_pylist():
    place = places[photos.index(os.path.basename(row["uri"])) % 3]
    p = np.zeros(width)
    p[row["top_k_label_ids"]] = row["top_k_scores"]
    if place[0] == "55.68":
      kinds["applied"] += 1
      assert row["prior_applied"] and row["prior_reason"] is None
      assert row["prior_h3_cell"] == cph
      assert row["prior_cell_observations"] == 300
      q = (p * (in_cell + alpha) / (300 + alpha * width)
           / ((overall + alpha) / (301 + alpha * width)))
      q /= q.sum()
      np.testing.assert_allclose(
          row["prior_top_k_scores"], q[row["prior_top_k_label_ids"]],
          rtol=0, atol=1e-5)
      assert np.all(np.diff(row["prior_top_k_scores"]) <= 1e-7)
      assert row["prior_top_k_scores"][0] == pytest.approx(q.max(), abs=1e-5)
      top1 = taxon_of.get(row["top_k_label_ids"][0])
      assert row["expected_nearby"] == (
          None if top1 is None else top1 in counts)
    else:
      kinds["not"] += 1
      assert not row["prior_applied"]
      assert row["prior_reason"] == (prior.FEW_OBSERVATIONS if place[0]
                                     else prior.NO_COORDINATES)
      assert row["prior_top_k_label_ids"] == row["top_k_label_ids"]
      np.testing.assert_allclose(row["prior_top_k_scores"],
                                 row["top_k_scores"], rtol=0, atol=1e-7)
    assert row["prior_top_k_taxon_ids"] == [
        taxon_of.get(l) for l in row["prior_top_k_label_ids"]]
  assert kinds["applied"] and kinds["not"], kinds
