"""The benchmark harness's pieces work; no timing is asserted, ever.

Performance is measured by ``python -m benchmarks.run``, not by tests.  These
tests check what the figures rest on: photos are generated deterministically,
peak memory is read from the child process, steady-state rates and ratios
are computed as documented, the stock baseline writes one row per photo, and
the report regenerates its block without touching the text around it, and
the under-load run loses nothing on a small scale.
"""

import glob
import io
import os
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from benchmarks import (measure, photos, profile, report, run, stock,
                        under_load)

SMALL = (96, 72)


def test_photos_are_deterministic_and_distinct(tmp_path):
  first = photos.write_photo(5, SMALL, work_dir=str(tmp_path / "a"))
  again = photos.write_photo(5, SMALL, work_dir=str(tmp_path / "b"))
  other = photos.write_photo(6, SMALL, work_dir=str(tmp_path / "a"))
  with open(first, "rb") as f1, open(again, "rb") as f2, open(other, "rb") as f3:
    a, b, c = f1.read(), f2.read(), f3.read()
  assert a == b
  assert a != c
  with Image.open(first) as img:
    assert img.format == "JPEG"
    assert img.size == SMALL
    assert img.mode == "RGB"


def test_photo_set_links_the_first_n(tmp_path):
  folder = photos.photo_set(3, SMALL, work_dir=str(tmp_path))
  names = sorted(os.listdir(folder))
  assert names == ["photo_00000.jpg", "photo_00001.jpg", "photo_00002.jpg"]
  assert all(os.path.islink(os.path.join(folder, n)) for n in names)
  assert os.path.samefile(os.path.join(folder, names[2]),
                          photos.photo_path(2, SMALL, work_dir=str(tmp_path)))
  stats = photos.set_stats(glob.glob(os.path.join(folder, "*.jpg")))
  assert stats["count"] == 3 and stats["mean_bytes"] > 0


def test_parse_size():
  assert photos.parse_size("2048x1536") == (2048, 1536)
  with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
    photos.parse_size("2048")


def test_measured_child_reports_its_own_peak_memory(tmp_path):
  m = measure.run_measured(
      [sys.executable, "-c",
       "b = bytearray(150 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])"],
      str(tmp_path / "log.txt"))
  assert m.returncode == 0
  assert m.peak_rss_mb >= 150
  assert m.wall_s > 0 and not m.timed_out


def _run(photos_count, wall, rss=1000.0):
  return {"photos": photos_count,
          "measured": {"wall_s": wall, "peak_rss_mb": rss,
                       "others_cpu_pct": 0.0}}


def test_steady_state_is_the_slope_and_startup_the_intercept():
  entry = run.steady_state("natvision", ["m"], "2048x1536",
                           _run(10, 15.0), _run(30, 25.0))
  assert entry["images_per_s"] == pytest.approx(2.0)
  assert entry["startup_s"] == pytest.approx(10.0)


def _results():
  settings = {"size": "2048x1536", "big_size": "4032x3024",
              "models": ["a", "b"], "batch_size": 16}
  ceilings = [
      {"model": "a", "runtime": "tf", "images_per_s": 10.0},
      {"model": "a", "runtime": "onnx", "images_per_s": 20.0},
      {"model": "b", "runtime": "tf", "images_per_s": 5.0},
  ]

  def steady(kind, models, rate, size="2048x1536"):
    return {"kind": kind, "models": models, "size": size,
            "images_per_s": rate, "startup_s": 5.0, "photos": [16, 48],
            "wall_s": [1.0, 2.0], "peak_rss_mb": [1.0, 1.0],
            "others_cpu_pct": [0.0, 0.0], "runtimes": None}

  return {
      "settings": settings, "ceilings": ceilings,
      "steady": [steady("natvision", ["a"], 16.0),
                 steady("natvision", ["b"], 4.0),
                 steady("natvision", ["a", "b"], 3.0),
                 steady("stock", ["a"], 4.0),
                 steady("stock", ["b"], 2.0)],
  }


def test_ratios():
  r = run.ratios(_results())
  a = r["per_model"]["a"]
  assert a["best_runtime"] == "onnx"
  assert a["natvision_over_tf_ceiling"] == pytest.approx(1.6)
  assert a["natvision_over_best_ceiling"] == pytest.approx(0.8)
  assert a["natvision_over_stock"] == pytest.approx(4.0)
  together = r["all_in_one"]
  # best ceilings: 1/20 + 1/5 = 0.25 s per photo; one pass 1/3 s per photo.
  assert together["sum_seconds_per_image"]["best_ceilings"] == pytest.approx(
      0.25)
  assert together["best_ceilings_over_natvision"] == pytest.approx(0.75)


def test_report_keeps_the_text_around_its_block(tmp_path):
  results = _results()
  results.update(
      command="python -m benchmarks.run", started="now", duration_s=1.0,
      machine={"cpu": "cpu", "cores": 2}, versions={"tensorflow": "2"},
      photos={}, onnx={}, ratios=run.ratios(results), memory=None, notes=[])
  path = str(tmp_path / "RESULTS.md")
  with open(path, "w") as f:
    f.write("# Results\n\nwritten by hand\n")
  report.write(results, path)
  report.write(results, path)
  with open(path) as f:
    text = f.read()
  assert text.startswith("# Results\n\nwritten by hand\n")
  assert text.count(report.START) == 1
  assert "| a | 10.00 | 20.00 (onnx) | 16.00 | 4.00 |" in text


def test_profile_stages_by_thread(tmp_path):
  raw = tmp_path / "raw.txt"
  raw.write_text(
      "thread (1): MainThread;run (pipelines/embed_images.py:1);"
      "Pipeline.run (apache_beam/pipeline.py:2);"
      "RunModelFn.process (transforms/inference.py:3);"
      "LoadedModel.predict (transforms/runtimes/tf.py:4) 7\n"
      "thread (2): natvision-decode_0;_worker (concurrent/futures/thread.py:5);"
      "read_decode_prepare (transforms/photos.py:6);"
      "decode_image (transforms/decode.py:7) 3\n"
      "thread (1): MainThread;<module> (x.py:1) 2\n")
  groups = profile.split_py_spy(str(raw))
  assert groups[profile.MAIN] == {"inference": 7, profile.OUTSIDE: 2}
  assert groups[profile.POOL] == {"decode": 3}


def test_stock_pipeline_writes_one_row_per_photo(tiny_models, tmp_path):
  folder = photos.photo_set(3, (320, 240), work_dir=str(tmp_path / "work"))
  out = str(tmp_path / "out")
  result = stock.run(["--input", os.path.join(folder, "*.jpg"),
                      "--output_dir", out, "--model", "fungi_mobile_v1",
                      "--model_root", tiny_models, "--batch_size", "2"])
  assert result["rows"] == {"fungi_mobile_v1": 3}
  table = pq.read_table(glob.glob(os.path.join(out, "fungi_mobile_v1",
                                               "*.parquet")))
  assert sorted(os.path.basename(u) for u in table.column("uri").to_pylist()) \
      == ["photo_00000.jpg", "photo_00001.jpg", "photo_00002.jpg"]
  scores = np.array(table.column("scores").to_pylist())
  assert scores.shape == (3, stock.TOP_K)
  assert (np.diff(scores, axis=1) <= 0).all()


def test_under_load_photos_and_failures_are_deterministic():
  name, data = under_load.make_photo(3)
  assert name == "/photos/000003.png" and data == under_load.make_photo(3)[1]
  assert under_load.make_photo(4)[0].endswith(".jpg")
  with Image.open(io.BytesIO(data)) as img:
    assert img.size == under_load.PHOTO_SIZE
  paths = [f"/p/{i}" for i in range(200)]
  failing = under_load.failing_paths(paths, 0.05, seed=1)
  assert len(failing) == 10 and failing == under_load.failing_paths(
      list(reversed(paths)), 0.05, seed=1)


def test_under_load_memory_by_quarter():
  samples = [{"t_s": t, "photos": n, "rss_mib": 100.0 + n / 100,
              "peak_mib": 100.0 + n / 100}
             for t, n in enumerate([0, 10, 25, 40, 50, 75, 90, 100])]
  # After the last photo (commit, report): not part of the per-photo slope.
  samples.append({"t_s": 9, "photos": 100, "rss_mib": 900.0,
                  "peak_mib": 900.0})
  memory = under_load.memory_by_quarter(samples, 100)
  assert [memory["quarters"][q]["photos"] for q in
          ("25%", "50%", "75%", "100%")] == [25, 50, 75, 100]
  assert memory["peak_ratio_100_to_25"] == pytest.approx(101.0 / 100.25,
                                                         abs=1e-3)
  assert memory["mib_per_1000_photos"] == pytest.approx(10.0)


@pytest.mark.slow
def test_under_load_small_run_loses_nothing(tiny_models, tmp_path):
  """The benchmark's code path on 300 photos, 15 of which fail once."""
  result = under_load.run_under_load(300, 0.05, str(tmp_path),
                                     model_root=tiny_models, timeout_s=600)
  assert under_load.nothing_lost(result) == [], result
  assert result["transient_failures_planned"] == 15
  assert result["retries"] == {"by_server": 15, "logged_by_job": 15}
  assert result["requests"]["failing_asked_twice"] == 15
  assert result["requests"]["others_asked_once"] == 285
  per_model = result["accounting"]["per_model"]
  assert sorted(per_model) == sorted(under_load.DEFAULT_MODELS)
  for counts in per_model.values():
    assert counts == {"in_table": 300, "in_errors": 0, "lost": 0,
                      "duplicated": 0, "unexpected": 0}
  assert result["accounting"]["error_rows"] == 0
  assert set(result["memory"]["quarters"]) == {"25%", "50%", "75%", "100%"}
  assert result["peak_rss_mib"] > 0


@pytest.mark.slow
def test_label_benchmark_runs_every_variant_on_a_small_reference(tmp_path):
  """benchmarks/label.py end to end at 3,000 rows: every variant labels
  every query, the mapped and in-memory indexes find the same neighbours,
  and under the data limit the flat variant fails and the mapped one runs."""
  import json  # pylint: disable=import-outside-toplevel
  from benchmarks import label  # pylint: disable=import-outside-toplevel
  out = tmp_path / "label.json"
  assert label.main(["--rows", "3000", "--queries", "50", "--workdir",
                     str(tmp_path / "work"), "--out", str(out),
                     "--data_limit_mb", "0"]) == 0
  results = {(r["variant"], "data_limit_mb" in r): r
             for r in json.loads(out.read_text())["results"]}
  for variant in label.VARIANTS:
    assert results[(variant, False)]["photos"] == 50
  assert results[("flat_heap", False)]["recall_at_10_vs_exact"] == 1.0
  assert (results[("ivf_mmap", False)]["recall_at_10_vs_exact"]
          == results[("ivf_heap", False)]["recall_at_10_vs_exact"])
  assert results[("ivf_mmap", True)]["photos"] == 50
