"""The job's graph as Beam's DirectRunner (the FnApiRunner) runs it.

The FnApiRunner runs a job stage after stage, and what passes from one stage
to the next is held in memory whole: a Flatten whose inputs come from two
stages, and every GroupByKey, is a buffer of all its elements
(``translations.sink_flattens``, ``expand_gbk``).  A prepared photo is
~270 KB, so a job whose prepared photos leave their stage holds every photo
of the run (1.3 MiB per photo was measured, benchmarks/RESULTS.md).  These
tests ask the runner's own planner how it fuses the job, without running
it: each photo's read, model and write must be one stage, and for one glob
pattern the listing too (no GroupByKey of the refs before the first photo).
"""

import csv
import os

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import fn_runner
import pyarrow.parquet as pq

from natvision.pipelines import embed_images
from natvision.pipelines import launch
from natvision.transforms import sources
from tests.conftest import real_photo_paths
from tests.http_server import PhotoServer

EMB = "inaturalist_v2"
CLS = "fungi_mobile_v1"
FILES = "ReadAndPrepare/ReadDecodePrepare/ParDo(ReadDecodePrepareFn)"
WEB = ("ReadAndPrepare/ReadDecodePrepareByHost/"
       "ParDo(HostKeyedReadDecodePrepareFn)")


def _stages(argv):
  """The FnApiRunner's fused stages of the job, as lists of transform names."""
  plan, options = launch.plan_job(embed_images.JOB, argv)
  p = beam.Pipeline(options=options)
  embed_images.JOB.build(p, plan)
  _, stages = fn_runner.FnApiRunner().create_stages(p.to_runner_api())
  return [[t.unique_name for t in s.transforms] for s in stages]


def _stage_of(stages, name):
  found = [s for s in stages if any(n.endswith(name) for n in s)]
  assert len(found) == 1, (name, found)
  return found[0]


def _has(stage, part):
  return any(part in name for name in stage)


def test_a_glob_is_one_stage_from_listing_to_the_tables(tiny_models,
                                                        photo_dir, tmp_path):
  stages = _stages(["--input", str(photo_dir / "*.jpg"),
                    "--output_dir", str(tmp_path / "out"),
                    "--models", f"{EMB},{CLS}", "--model_root", tiny_models,
                    "--runtime", "onnx"])
  read = _stage_of(stages, FILES)
  assert _has(read, "ReadInput/MatchFiles")  # no shuffle of the refs
  for model in (EMB, CLS):
    assert _has(read, f"RunModel[{model}]/Infer")
    assert _has(read, f"Write[{model}]/WriteShards")
  # Nothing per photo leaves the stage: the input count is summed in it.
  assert _has(read, "SumInputs/Precombine")
  # A glob lists no web server: no keyed branch, no grouping by id.
  names = [n for s in stages for n in s]
  assert not [n for n in names if "ByHost" in n or "GroupById" in n]


def test_a_manifest_runs_the_models_on_each_branch(tiny_models, tmp_path):
  manifest = tmp_path / "m.csv"
  manifest.write_text("uri\n/a.jpg\nhttp://127.0.0.1:9/b.jpg\n")
  stages = _stages(["--input", str(manifest),
                    "--output_dir", str(tmp_path / "out"),
                    "--models", EMB, "--model_root", tiny_models,
                    "--runtime", "onnx"])
  files = _stage_of(stages, FILES)
  assert _has(files, f"RunModel[{EMB}]/Infer")
  web = _stage_of(stages, WEB)
  assert _has(web, f"RunModelByHost[{EMB}]/Infer")
  assert _has(web, f"WriteByHost[{EMB}]/WriteShards")
  # The prepared photos are never flattened (a buffer of all of them).
  assert not [n for s in stages for n in s if "Prepared/" in n]


def test_the_refs_are_spread_where_more_than_one_worker_reads():
  def spreads(*flags):
    return sources.spreads_work(PipelineOptions(list(flags)))
  assert not spreads()
  assert not spreads("--runner", "DirectRunner", "--direct_num_workers", "1")
  assert spreads("--runner", "DirectRunner", "--direct_num_workers", "2",
                 "--direct_running_mode", "multi_processing")
  assert spreads("--runner", "DataflowRunner")
  assert spreads("--runner", "PortableRunner")


def test_a_glob_on_several_workers_is_shuffled_once(tiny_models, photo_dir,
                                                   tmp_path):
  stages = _stages(["--input", str(photo_dir / "*.jpg"),
                    "--output_dir", str(tmp_path / "out"),
                    "--models", EMB, "--model_root", tiny_models,
                    "--runtime", "onnx", "--direct_num_workers", "2",
                    "--direct_running_mode", "multi_threading"])
  read = _stage_of(stages, FILES)
  assert not _has(read, "ReadInput/MatchFiles")
  assert _has(read, f"RunModel[{EMB}]/Infer")
  assert [n for s in stages for n in s if "ReadInput/Spread" in n]


def test_local_and_web_photos_of_one_manifest_load_a_model_once(tiny_models,
                                                                tmp_path):
  paths = real_photo_paths()[:2]
  served = {"/p/web.jpg": open(paths[1], "rb").read()}
  out = str(tmp_path / "out")
  with PhotoServer(served) as server:
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerows([["uri"], [paths[0]], [server.url("/p/web.jpg")]])
    report = embed_images.run([
        "--input", str(manifest), "--output_dir", out, "--models", EMB,
        "--model_root", tiny_models, "--runtime", "onnx"])
  rows = pq.read_table(os.path.join(out, "embeddings", EMB)).to_pylist()
  assert sorted(r["uri"] for r in rows) == sorted(
      [paths[0], server.url("/p/web.jpg")])
  assert report["model_loads"] == {EMB: 1}
