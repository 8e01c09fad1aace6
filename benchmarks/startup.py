"""Start-up: one photo through the job, each run in a fresh process.

    python -m benchmarks.startup --model_root /tmp/standins_full \\
        --runs 3 --out benchmarks/startup.json [--cold] [-- JOB FLAGS]

Start-up (imports, model loads, conversions and checks, pipeline set-up,
commit) is what a small or scheduled run pays, once per process.  With one
photo, the job's wall time is almost all start-up.  Each run is
``python -m pipelines.embed_images`` on one 2048x1536 benchmark photo with
all three full-size stand-ins (``--models`` to change), in a fresh process
started by this module's ``--child`` mode, which records after the job:

* the job process's own peak RSS (``getrusage(RUSAGE_SELF)``) and the
  largest of its child processes (``RUSAGE_CHILDREN``: a conversion or a
  quantization run in a child shows there, not in the job's own memory);
* whether ``tensorflow`` was imported into the job process;
* the seconds spent in ``pipelines.launch.check_models`` (the launcher's
  model checks) and in the pipeline after it.

``--cold`` first runs once with an empty ONNX cache (``$NATVISION_ONNX_CACHE``
pointed at a fresh folder): the first conversion.  The ``--runs`` runs that
follow reuse that cache, as every later run on a machine does.  Flags after
``--`` go to the job (e.g. ``--precision int8``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from typing import List, Optional, Sequence

from benchmarks import measure
from benchmarks import photos as photos_lib
from benchmarks import run as run_lib

REPO = run_lib.REPO
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "startup.json")


def _child(out_path: str, job_argv: List[str]) -> int:
  """Runs the job in this process and writes what it cost to ``out_path``."""
  started = time.perf_counter()
  import importlib  # pylint: disable=import-outside-toplevel
  from natvision.pipelines import embed_images  # pylint: disable=import-outside-toplevel
  imported = time.perf_counter()
  spans = {}
  launcher = importlib.import_module("natvision.pipelines.launch")
  check = launcher.check_models

  def timed_check(*args, **kwargs):
    start = time.perf_counter()
    try:
      return check(*args, **kwargs)
    finally:
      spans["check_models_s"] = time.perf_counter() - start
      spans["check_models_end"] = time.perf_counter()

  launcher.check_models = timed_check
  status = embed_images.main(job_argv)
  ended = time.perf_counter()
  own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
  record = {
      "status": status,
      "imports_s": round(imported - started, 2),
      "check_models_s": round(spans.get("check_models_s", 0.0), 2),
      "after_check_s": round(ended - spans.get("check_models_end", ended), 2),
      "in_process_s": round(ended - started, 2),
      "own_peak_rss_mb": round(own, 1),
      "children_peak_rss_mb": round(children, 1),
      "tensorflow_imported": "tensorflow" in sys.modules,
  }
  with open(out_path, "w") as f:
    json.dump(record, f, indent=2)
  return status


def _one(label: str, photo_dir: str, models: str, model_root: str,
         cache: str, work: str, extra: Sequence[str]) -> dict:
  out_dir = os.path.join(work, "out", label)
  shutil.rmtree(out_dir, ignore_errors=True)
  record_path = os.path.join(work, f"{label}.json")
  job = ["--input", os.path.join(photo_dir, "*.jpg"), "--output_dir", out_dir,
         "--models", models, "--model_root", model_root] + list(extra)
  cmd = [sys.executable, "-m", "benchmarks.startup", "--child", record_path,
         "--"] + job
  m = measure.run_measured(cmd, os.path.join(work, f"{label}.log"), cwd=REPO,
                           env={"NATVISION_ONNX_CACHE": cache})
  if m.returncode != 0:
    raise RuntimeError(f"{label} failed (exit {m.returncode}):\n"
                       f"{measure.tail(os.path.join(work, label + '.log'))}")
  with open(record_path) as f:
    record = json.load(f)
  shutil.rmtree(out_dir, ignore_errors=True)
  record.update(label=label, wall_s=round(m.wall_s, 2),
                cpu_s=round(m.cpu_s, 2),
                peak_rss_mb_with_children=round(m.peak_rss_mb, 1),
                others_cpu_pct=(None if m.others_cpu_pct is None
                                else round(m.others_cpu_pct, 1)))
  print(f"  {label}: {record['wall_s']:.1f} s wall (check_models "
        f"{record['check_models_s']:.1f} s), own peak "
        f"{record['own_peak_rss_mb']:.0f} MiB, children's peak "
        f"{record['children_peak_rss_mb']:.0f} MiB, tensorflow imported: "
        f"{record['tensorflow_imported']}, others' CPU "
        f"{record['others_cpu_pct']}%", flush=True)
  return record


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra: List[str] = []
  if "--" in argv:
    cut = argv.index("--")
    argv, extra = argv[:cut], argv[cut + 1:]
  p = argparse.ArgumentParser(prog="python -m benchmarks.startup",
                              description=__doc__.split("\n")[0])
  p.add_argument("--child", metavar="RECORD_JSON",
                 help=argparse.SUPPRESS)
  p.add_argument("--model_root", default=run_lib.DEFAULT_MODEL_ROOT)
  p.add_argument("--models", default=",".join(run_lib.ALL_MODELS))
  p.add_argument("--size", default="2048x1536")
  p.add_argument("--runs", type=int, default=3,
                 help="measured runs with the cache filled")
  p.add_argument("--cold", action="store_true",
                 help="first one run with an empty ONNX cache")
  p.add_argument("--cache", help="ONNX cache folder (default: under "
                 "benchmarks/work/startup)")
  p.add_argument("--label", default="startup", help="name of this series")
  p.add_argument("--out", default=DEFAULT_OUT,
                 help="JSON file; the series is added under --label")
  args = p.parse_args(argv)
  if args.child:
    return _child(args.child, extra)
  work = os.path.join(photos_lib.WORK_DIR, "startup", args.label)
  os.makedirs(work, exist_ok=True)
  cache = args.cache or os.path.join(work, "onnx-cache")
  folder = photos_lib.photo_set(1, photos_lib.parse_size(args.size))
  series = {"command": " ".join(["python -m benchmarks.startup"] + argv +
                                (["--"] + extra if extra else [])),
            "started": run_lib._now(),  # pylint: disable=protected-access
            "machine": run_lib.machine_info(), "models": args.models,
            "job_flags": extra, "cold": None, "cached": []}
  if args.cold:
    shutil.rmtree(cache, ignore_errors=True)
    series["cold"] = _one(f"{args.label}-cold", folder, args.models,
                          args.model_root, cache, work, extra)
  for i in range(args.runs):
    series["cached"].append(_one(f"{args.label}-cached{i}", folder,
                                 args.models, args.model_root, cache, work,
                                 extra))
  walls = [r["wall_s"] for r in series["cached"]]
  if walls:
    series["cached_wall_s_median"] = statistics.median(walls)
    series["cached_wall_s_min"] = min(walls)
    print(f"{args.label}: cached runs {walls} s wall, median "
          f"{series['cached_wall_s_median']:.1f} s", flush=True)
  everything = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      everything = json.load(f)
  everything[args.label] = series
  with open(args.out, "w") as f:
    json.dump(everything, f, indent=2, sort_keys=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
