"""The machine's limit, and int8 against fp32, measured in one run.

    python -m benchmarks.precision --model_root /tmp/standins_full \\
        --out benchmarks/precision.json [--models a,b] [--photos N]

For each model, in this run on this machine:

* costs (one child process, ``--costs``): decoding and preparing a photo
  as the job does (``transforms.photos.read_decode_prepare``, one thread),
  and the forward pass of the fp32 and the int8 ONNX model on prepared
  batches of 16 (ONNX Runtime, all cores), each in core-seconds per photo
  (``time.process_time``: the CPU time of every thread of the process);
  the limit is ``cores / (decode + model)`` photos per second, what the
  machine could do if it did nothing else;
* the whole job (``python -m pipelines.embed_images``, default flags) in
  fp32 and with ``--precision int8``, each at N and 3N photos in fresh
  processes, measured interleaved (fp32, int8, stock at N, then at 3N,
  ``--repeats`` times) so that all see the same load from other
  processes; the steady rate is ``2N / (t(3N) - t(N))`` from the quickest
  attempt of each; the pipeline rate is the same difference of the
  pipelines' own elapsed times (run.json: from building the graph to the
  summary, so without the launcher's start-up, whose int8 sample and check
  vary most), the best attempt kept; the in-run rate is read from the 3N
  run's progress lines (photos between the first and the last line over
  the time between them: no start-up, no second run).  The int8 files are made before (one
  unmeasured int8 run per photo set), so that the measured runs find them
  cached;
* for fungi_mobile_v1, the stock Beam job (``benchmarks.stock``) at N and
  3N, for the natvision / stock ratio.

The job's steady rate over the limit says how much of the machine the job
uses; int8 over fp32 says what quantization buys end to end.  The int8
agreement is read from the int8 run's run.json (the stand-ins' random
weights say nothing about the agreement of the real models).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import List, Optional, Sequence

from benchmarks import measure
from benchmarks import photos as photos_lib
from benchmarks import run as run_lib

REPO = run_lib.REPO
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "precision.json")
DEFAULT_PHOTOS = {"fungi_mobile_v1": 320, "inaturalist_v2": 64,
                  "inception_resnet_v2": 64}
BATCH = 16


def costs(model: str, model_root: str, folder: str, out_path: str,
          seconds: float) -> dict:
  """Core-seconds per photo of decode+prepare and of each model precision.

  Runs in its own process (``--costs``); the int8 file is the one the
  job's launcher makes for the same photo set (found in the cache).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from natvision.transforms import models as models_lib  # pylint: disable=import-outside-toplevel
  from natvision.transforms import photos  # pylint: disable=import-outside-toplevel
  from natvision.transforms.runtimes import chooser, quantize, sample  # pylint: disable=import-outside-toplevel

  (resolved,) = models_lib.resolve_models([model], model_root,
                                          requested_runtime="onnx")
  config = photos.PhotoConfig(policies=(resolved.resize,),
                              size=resolved.spec.input_size)
  refs = sample.pick(10 ** 6, patterns=[os.path.join(folder, "*.jpg")])
  min_side = photos.decode_lib.decoded_size_needed(config.policies,
                                                   config.size)
  start_cpu, start = time.process_time(), time.perf_counter()
  arrays = []
  for ref in refs[:48]:
    prepared, _ = photos.read_decode_prepare(ref, config, min_side)
    arrays.append(prepared.arrays[resolved.resize])
  decode_cpu = (time.process_time() - start_cpu) / len(arrays)
  decode_wall = (time.perf_counter() - start) / len(arrays)

  fp32 = resolved.with_decision(chooser.choose(resolved))
  quantization = quantize.QuantizationConfig(
      precision="int8", min_agreement=quantize.parse_minimums("0"))
  sample_photos = sample.prepare(
      sample.pick(quantization.sample_size,
                  patterns=[os.path.join(folder, "*.jpg")]), config)
  int8 = quantize.decide_int8(fp32, sample_photos[resolved.resize],
                              quantization)
  from natvision.transforms.runtimes import onnx_session  # pylint: disable=import-outside-toplevel
  batches = [np.stack(arrays[i:i + BATCH])
             for i in range(0, len(arrays) - BATCH + 1, BATCH)]
  record = {"model": model, "cores": measure.cores(),
            "decode_core_ms": round(1000 * decode_cpu, 2),
            "decode_wall_ms": round(1000 * decode_wall, 2),
            "int8_source": int8.onnx_source}
  for label, path in (("fp32", fp32.decision.onnx_path),
                      ("int8", int8.onnx_path)):
    session = onnx_session.OnnxSession(resolved, path)
    session.predict(batches[0])
    n, cpu0, t0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 2 * len(batches):
      session.predict(batches[n % len(batches)])
      n += 1
    images = n * BATCH
    record[f"{label}_core_ms"] = round(
        1000 * (time.process_time() - cpu0) / images, 2)
    record[f"{label}_images_per_s"] = round(
        images / (time.perf_counter() - t0), 2)
    del session
  cores = record["cores"]
  for label in ("fp32", "int8"):
    record[f"{label}_limit_images_per_s"] = round(
        1000 * cores / (record["decode_core_ms"] + record[f"{label}_core_ms"]),
        2)
  with open(out_path, "w") as f:
    json.dump(record, f, indent=2)
  return record


def progress_rate(log_path: str) -> Optional[float]:
  """Photos per second between the first and last progress line of a job.

  The job logs ``progress: D of T photos ...`` every 5 s; the rate between
  the first and the last line leaves out start-up and the commit, and
  needs no second run.  None with fewer than two lines.
  """
  import datetime  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel
  points = []
  with open(log_path, errors="replace") as f:
    for line in f:
      found = re.match(r"(\S+ \S+) INFO natvision.progress: progress: "
                       r"(\d+) of", line)
      if found:
        when = datetime.datetime.strptime(found.group(1),
                                          "%Y-%m-%d %H:%M:%S,%f")
        points.append((when.timestamp(), int(found.group(2))))
  if len(points) < 2 or points[-1][0] <= points[0][0]:
    return None
  return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


def _job(kind: str, model: str, model_root: str, folder: str, output: str,
         extra: Sequence[str]) -> List[str]:
  if kind == "stock":
    return [sys.executable, "-m", "benchmarks.stock", "--input",
            os.path.join(folder, "*.jpg"), "--output_dir", output, "--model",
            model, "--model_root", model_root, "--batch_size", str(BATCH)]
  return [sys.executable, "-m", "natvision.pipelines.embed_images", "--input",
          os.path.join(folder, "*.jpg"), "--output_dir", output, "--models",
          model, "--model_root", model_root] + list(extra)


def _run(label: str, cmd: List[str], work: str, env: dict) -> dict:
  log = os.path.join(work, f"{label}.log")
  m = measure.run_measured(cmd, log, cwd=REPO, env=env)
  if m.returncode != 0:
    raise RuntimeError(f"{label} failed (exit {m.returncode}):\n"
                       f"{measure.tail(log)}")
  print(f"  {label}: {m.wall_s:.1f} s, peak {m.peak_rss_mb:.0f} MiB, "
        f"others' CPU {m.others_cpu_pct:.0f}%", flush=True)
  return m.as_dict()


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.precision",
                              description=__doc__.split("\n")[0])
  p.add_argument("--costs", nargs=4, metavar=("MODEL", "ROOT", "FOLDER",
                                              "OUT"), help=argparse.SUPPRESS)
  p.add_argument("--model_root", default=run_lib.DEFAULT_MODEL_ROOT)
  p.add_argument("--models", default="fungi_mobile_v1,inaturalist_v2,"
                 "inception_resnet_v2")
  p.add_argument("--photos", type=int,
                 help="N for every model (default: 320 for fungi, 64 for "
                 "the Inceptions)")
  p.add_argument("--size", default="2048x1536")
  p.add_argument("--cost_seconds", type=float, default=15.0,
                 help="seconds of forward passes per precision")
  p.add_argument("--no_stock", action="store_true")
  p.add_argument("--repeats", type=int, default=2,
                 help="attempts of each run; the quickest is kept")
  p.add_argument("--out", default=DEFAULT_OUT)
  args = p.parse_args(argv)
  work = os.path.join(photos_lib.WORK_DIR, "precision")
  os.makedirs(work, exist_ok=True)
  env = {"NATVISION_ONNX_CACHE": os.path.join(work, "onnx-cache")}
  if args.costs:
    model, root, folder, out = args.costs
    costs(model, root, folder, out, args.cost_seconds)
    return 0
  size = photos_lib.parse_size(args.size)
  results = {"command": " ".join(["python -m benchmarks.precision"]
                                 + list(argv or sys.argv[1:])),
             "started": run_lib._now(),  # pylint: disable=protected-access
             "machine": run_lib.machine_info(),
             "versions": run_lib.versions(), "models": {}}
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  for model in models:
    n = args.photos or DEFAULT_PHOTOS.get(model, 32)
    sets = {k: photos_lib.photo_set(k, size) for k in (n, 3 * n)}
    print(f"{model}: N = {n}", flush=True)
    entry = {"photos": [n, 3 * n], "runs": {}}

    def job(kind, count, tag, extra=(), record=True):
      label = f"{model}-{tag}-n{count}"
      output = os.path.join(work, "out", label)
      shutil.rmtree(output, ignore_errors=True)
      m = _run(label, _job(kind, model, args.model_root, sets[count],
                           output, extra), work, env)
      if record:
        entry["runs"][label] = m
      report = os.path.join(output, "run.json")
      info = None
      if os.path.exists(report):
        from natvision.transforms import run_summary  # pylint: disable=import-outside-toplevel
        summary = run_summary.read(report)
        info = summary.to_dict()["models"][model]
        m["pipeline_s"] = summary.elapsed_s
      shutil.rmtree(output, ignore_errors=True)
      return m, info

    int8_flags = ["--precision", "int8", "--min_agreement", "0"]
    job("natvision", n, "warm-fp32", record=False)
    for count in (n, 3 * n):  # quantize once per photo set, unmeasured
      job("natvision", count, "warm-int8", int8_flags, record=False)
    kinds = [("fp32", "natvision", ()), ("int8", "natvision", int8_flags)]
    if model == "fungi_mobile_v1" and not args.no_stock:
      kinds.append(("stock", "stock", ()))
    walls, inside, pipeline = {}, {}, {}
    for attempt in range(args.repeats):
      for count in (n, 3 * n):
        for tag, kind, extra in kinds:
          m, info = job(kind, count, f"{tag}-try{attempt}", extra)
          walls.setdefault((tag, count), []).append(m["wall_s"])
          if "pipeline_s" in m:
            pipeline.setdefault(tag, {})[(attempt, count)] = m["pipeline_s"]
          if count == 3 * n and kind == "natvision":
            rate = progress_rate(os.path.join(
                work, f"{model}-{tag}-try{attempt}-n{count}.log"))
            if rate:
              inside.setdefault(tag, []).append(rate)
          if info is not None:
            entry[f"{tag}_model"] = info
    for tag, _, _ in kinds:
      # The quickest attempt of each count: other processes only slow a run.
      small, large = min(walls[(tag, n)]), min(walls[(tag, 3 * n)])
      rate = 2 * n / (large - small) if large > small else None
      entry[f"{tag}_steady_images_per_s"] = rate and round(rate, 2)
      entry[f"{tag}_startup_s"] = rate and round(small - n / rate, 1)
      if tag in inside:
        entry[f"{tag}_in_run_images_per_s"] = round(max(inside[tag]), 2)
      if tag in pipeline:
        # From the pipeline's own elapsed time (run.json: from the launch
        # of the graph to the summary), per attempt: no launcher start-up.
        rates = [2 * n / (pipeline[tag][(a, 3 * n)] - pipeline[tag][(a, n)])
                 for a in range(args.repeats)
                 if pipeline[tag][(a, 3 * n)] > pipeline[tag][(a, n)]]
        entry[f"{tag}_pipeline_rates"] = [round(r, 2) for r in rates]
        if rates:
          entry[f"{tag}_pipeline_images_per_s"] = round(max(rates), 2)
    cost_out = os.path.join(work, f"{model}-costs.json")
    m = measure.run_measured(
        [sys.executable, "-m", "benchmarks.precision", "--costs", model,
         args.model_root, sets[3 * n], cost_out, "--cost_seconds",
         str(args.cost_seconds)],
        os.path.join(work, f"{model}-costs.log"), cwd=REPO, env=env)
    if m.returncode != 0:
      raise RuntimeError(measure.tail(os.path.join(work,
                                                   f"{model}-costs.log")))
    with open(cost_out) as f:
      entry["costs"] = json.load(f)
    entry["costs"]["others_cpu_pct"] = round(m.others_cpu_pct or 0, 1)
    c = entry["costs"]
    for tag in ("fp32", "int8"):
      for how in ("steady", "in_run", "pipeline"):
        rate = entry.get(f"{tag}_{how}_images_per_s")
        if rate:
          entry[f"{tag}_{how}_over_limit"] = round(
              rate / c[f"{tag}_limit_images_per_s"], 3)
    for how in ("steady", "in_run", "pipeline"):
      fp32 = entry.get(f"fp32_{how}_images_per_s")
      int8 = entry.get(f"int8_{how}_images_per_s")
      if fp32 and int8:
        entry[f"int8_over_fp32_{how}"] = round(int8 / fp32, 3)
    stock = entry.get("stock_steady_images_per_s")
    if stock and entry.get("fp32_steady_images_per_s"):
      entry["fp32_over_stock"] = round(
          entry["fp32_steady_images_per_s"] / stock, 3)
    shown = {k: v for k, v in entry.items()
             if k not in ("runs", "fp32_model", "int8_model")}
    print(f"{model}: {json.dumps(shown)}", flush=True)
    results["models"][model] = entry
    results["ended"] = run_lib._now()  # pylint: disable=protected-access
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
