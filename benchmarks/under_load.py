"""Under load: many small photos over flaky HTTP, nothing lost, memory flat.

    python -m benchmarks.under_load [--photos 20000] [--fail_share 0.05]
        [--model_root DIR] [--output benchmarks/under_load.json] [job flags]

Makes ``--photos`` small distinct photos (64x48, JPEG and PNG, from seeded
noise and shapes), serves them from the tests' loopback photo server
(tests/http_server.py) and scripts ``--fail_share`` of them to fail once
with a transient error (half a 503, half a TCP reset in the middle of the
body) before being served normally.  ``natvision-embed`` then runs on a
manifest of their URLs in a fresh process (``python -m
pipelines.embed_images``, ``--runtime tf``, tiny stand-in models unless
``--model_root`` is given), so that its memory is its own; job flags not
known here go to the job.

While the job runs, the job's resident memory (``VmRSS``, and ``VmHWM``,
its peak so far) is sampled from ``/proc`` together with the number of
distinct photos the server has been asked for, so that the peak can be read
at 25%, 50%, 75% and 100% of the photos taken in: a job whose memory grows
with the number of photos has a higher peak at 100% than at 25%.  After the
run, the tables are read back and every photo is accounted for once per
model (in that model's table or in the errors table); retries are counted
twice, by the server (requests per photo) and by the job (its log line per
retry).
"""

from __future__ import annotations

import argparse
import collections
import csv
import glob
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from benchmarks import measure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO, "benchmarks", "under_load.json")
PHOTO_SIZE = (64, 48)
QUARTERS = (0.25, 0.5, 0.75, 1.0)
DEFAULT_MODELS = ("inaturalist_v2", "fungi_mobile_v1", "inception_resnet_v2")
# The job logs one line per retry (transforms/fetch.py, with_retries).
RETRY_LOG_LINE = "transient read failure for "
# Scripted transient failures, used in turn (tests/http_server.py).
FAILURES = (("status", 503, {"Content-Type": "text/plain"}, b"busy"),
            ("reset",))


def make_photo(index: int, size: Tuple[int, int] = PHOTO_SIZE
               ) -> Tuple[str, bytes]:
  """One small photo, the same bytes for the same index.

  Args:
    index: the photo's number; seeds its pixels and picks its format
      (every fourth is a PNG, the others JPEGs).
    size: (width, height).

  Returns:
    (URL path, encoded bytes).
  """
  rng = np.random.default_rng(index)
  width, height = size
  background = rng.integers(0, 256, 3)
  pixels = background + rng.normal(0, 24, (height, width, 3))
  image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  for _ in range(3):
    x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
    box = (x0, y0, x0 + int(rng.integers(6, width // 2)),
           y0 + int(rng.integers(6, height // 2)))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
  buf = io.BytesIO()
  if index % 4 == 3:
    image.save(buf, format="PNG")
    return f"/photos/{index:06d}.png", buf.getvalue()
  image.save(buf, format="JPEG", quality=85)
  return f"/photos/{index:06d}.jpg", buf.getvalue()


def make_photos(count: int) -> Dict[str, bytes]:
  """``count`` photos by URL path (see ``make_photo``)."""
  return dict(make_photo(i) for i in range(count))


def failing_paths(paths: Sequence[str], share: float, seed: int = 0
                  ) -> List[str]:
  """The ``round(share * len(paths))`` paths, chosen by ``seed``, that fail
  once before being served."""
  chosen = random.Random(seed).sample(sorted(paths),
                                      round(share * len(paths)))
  return sorted(chosen)


def write_manifest(path: str, uris: Sequence[str]) -> str:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["uri"])
    writer.writerows([u] for u in uris)
  return path


def _proc_status_kib(pid: int, key: str) -> Optional[int]:
  """A ``kB`` field (``VmRSS``, ``VmHWM``) of /proc/PID/status."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith(key + ":"):
          return int(line.split()[1])
  except (OSError, ValueError):
    return None
  return None


class MemorySampler:
  """Samples a process's memory against a progress count, on a thread.

  Args:
    pid: the process to watch.
    progress: returns how many photos have been taken in so far.
    interval_s: seconds between samples.
  """

  def __init__(self, pid: int, progress, interval_s: float = 0.25):
    self._pid = pid
    self._progress = progress
    self._interval = interval_s
    self._stop = threading.Event()
    self._start = time.perf_counter()
    self.samples: List[dict] = []
    self._thread = threading.Thread(target=self._loop, daemon=True)

  def __enter__(self) -> "MemorySampler":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()

  def _loop(self) -> None:
    while not self._stop.is_set():
      rss = _proc_status_kib(self._pid, "VmRSS")
      hwm = _proc_status_kib(self._pid, "VmHWM")
      if rss is not None and hwm is not None:
        self.samples.append({
            "t_s": round(time.perf_counter() - self._start, 2),
            "photos": self._progress(), "rss_mib": round(rss / 1024, 1),
            "peak_mib": round(hwm / 1024, 1)})
      self._stop.wait(self._interval)


def memory_by_quarter(samples: Sequence[dict], photos: int) -> dict:
  """Memory when 25%, 50%, 75% and 100% of the photos had been taken in.

  Args:
    samples: ``MemorySampler.samples``, in time order.
    photos: the number of photos in the run.

  Returns:
    ``quarters``: for each mark, the first sample at or past it (resident
    and peak-so-far MiB, seconds); ``peak_ratio_100_to_25``: the peak at
    100% over the peak at 25% (1.0: no growth after the first quarter);
    ``mib_per_1000_photos``: the slope of resident memory against photos
    between 25% and 100% (least squares, up to the first sample at 100%).
  """
  quarters = {}
  for mark in QUARTERS:
    need = mark * photos
    hit = next((s for s in samples if s["photos"] >= need), None)
    if hit is not None:
      quarters[f"{int(mark * 100)}%"] = hit
  result = {"quarters": quarters, "peak_ratio_100_to_25": None,
            "mib_per_1000_photos": None}
  if "25%" in quarters and "100%" in quarters:
    result["peak_ratio_100_to_25"] = round(
        quarters["100%"]["peak_mib"] / quarters["25%"]["peak_mib"], 3)
  # Up to the moment the last photo was asked for: what follows (the last
  # batches, the commit, the run report) is not per photo.
  end = quarters["100%"]["t_s"] if "100%" in quarters else float("inf")
  tail = [s for s in samples
          if s["photos"] >= 0.25 * photos and s["t_s"] <= end]
  xs = np.array([s["photos"] for s in tail], float)
  if len(tail) >= 2 and np.ptp(xs) > 0:
    ys = np.array([s["rss_mib"] for s in tail], float)
    result["mib_per_1000_photos"] = round(float(np.polyfit(xs, ys, 1)[0]) *
                                          1000, 3)
  return result


def thin(samples: Sequence[dict], points: int = 120) -> List[dict]:
  """At most about ``points`` samples, evenly spaced, the last one kept."""
  step = max(1, len(samples) // points)
  kept = list(samples[::step])
  if samples and kept[-1] is not samples[-1]:
    kept.append(samples[-1])
  return kept


def account(out: str, uris: Sequence[str], models: Sequence[str]) -> dict:
  """Every photo once per model, in that model's table or in errors?

  Args:
    out: the job's output folder.
    uris: every photo's URI in the manifest.
    models: the models the job ran.

  Returns:
    per model: ``in_table``, ``in_errors``, ``lost`` (photos in neither),
    ``duplicated`` (photos more than once) and ``unexpected`` (rows of
    photos not in the manifest); ``error_rows`` and ``transient_error_rows``
    (errors that mention a retry that did not succeed).
  """
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  def read(folder: str, columns: List[str]) -> List[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(out, folder, "*.parquet"))):
      rows += pq.read_table(path, columns=columns).to_pylist()
    return rows

  expected = collections.Counter(uris)
  errors = read("errors", ["uri", "model", "stage", "error"])
  per_model = {}
  for name in models:
    # The table is embeddings/<model> or predictions/<model> (docs/tables.md).
    in_table = collections.Counter(
        r["uri"] for kind in ("embeddings", "predictions")
        for r in read(os.path.join(kind, name), ["uri"]))
    in_errors = collections.Counter(
        r["uri"] for r in errors if r["model"] in (None, "", name))
    seen = in_table + in_errors
    per_model[name] = {
        "in_table": sum(in_table.values()),
        "in_errors": sum(in_errors.values()),
        "lost": sum(1 for u in expected if seen[u] == 0),
        "duplicated": sum(1 for u in expected if seen[u] > 1),
        "unexpected": sum(1 for u in seen if u not in expected),
    }
  return {"per_model": per_model, "error_rows": len(errors),
          "read_error_rows": sum(1 for r in errors if r["stage"] == "read"),
          "transient_error_rows": sum(1 for r in errors
                                      if "gave up after" in r["error"])}


def _write_standins(root: str, models: Sequence[str]) -> None:
  subprocess.run(
      [sys.executable, "-m", "natvision.tools.standins", "--output_dir", root,
       "--tiny", "--models", ",".join(models)],
      cwd=REPO, check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def run_under_load(photos: int, fail_share: float, work_dir: str,
                   model_root: Optional[str] = None,
                   models: Sequence[str] = DEFAULT_MODELS,
                   job_flags: Sequence[str] = (), seed: int = 0,
                   timeout_s: float = 3600.0) -> dict:
  """Serves the photos with transient failures, runs the job, checks it.

  Args:
    photos: number of photos.
    fail_share: share of the photos whose first request fails transiently.
    work_dir: folder for the manifest, the output and the job's log.
    model_root: stand-ins (or real models); tiny stand-ins written under
      ``work_dir`` when None.
    models: the models the job runs.
    job_flags: more flags for the job.
    seed: chooses the failing photos.
    timeout_s: the job is killed after this long.

  Returns:
    The figures (see the module docstring); ``returncode`` is the job's.
  """
  from tests.http_server import PhotoServer  # pylint: disable=import-outside-toplevel
  made = time.perf_counter()
  files = make_photos(photos)
  made = time.perf_counter() - made
  if not model_root:
    model_root = os.path.join(work_dir, "models")
    _write_standins(model_root, models)
  out = os.path.join(work_dir, "out")
  log_path = os.path.join(work_dir, "job.log")
  failing = failing_paths(list(files), fail_share, seed)
  with PhotoServer(files) as server:
    for i, path in enumerate(failing):
      server.plan(path, FAILURES[i % len(FAILURES)])
    uris = [server.url(p) for p in sorted(files)]
    manifest = write_manifest(os.path.join(work_dir, "photos.csv"), uris)
    cmd = [sys.executable, "-m", "natvision.pipelines.embed_images", "--input", manifest,
           "--output_dir", out, "--model_root", model_root,
           "--models", ",".join(models), "--runtime", "tf", *job_flags]
    start = time.perf_counter()
    cpu_before = measure.cpu_times()
    own_before = resource.getrusage(resource.RUSAGE_SELF)
    with open(log_path, "wb") as log:
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                              cwd=REPO,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
      with MemorySampler(proc.pid, lambda: len(server.requests)) as sampler:
        timed_out = False
        while True:
          pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
          if pid:
            break
          if time.perf_counter() - start > timeout_s:
            proc.kill()
            timed_out = True
            _, status, usage = os.wait4(proc.pid, 0)
            break
          time.sleep(0.1)
    wall = time.perf_counter() - start
    requests = dict(server.requests)
  cpu_after = measure.cpu_times()
  own_after = resource.getrusage(resource.RUSAGE_SELF)
  job_cpu = usage.ru_utime + usage.ru_stime
  server_cpu = (own_after.ru_utime + own_after.ru_stime
                - own_before.ru_utime - own_before.ru_stime)
  others = None
  if cpu_before and cpu_after and wall > 0:
    busy = cpu_after[0] - cpu_before[0]
    others = round(max(0.0, busy - job_cpu - server_cpu)
                   / (wall * measure.cores()) * 100, 1)
  returncode = os.waitstatus_to_exitcode(status)
  with open(log_path, encoding="utf-8", errors="replace") as f:
    log_text = f.read()
  report = {}
  run_json = os.path.join(out, "run.json")
  if os.path.exists(run_json):
    from natvision.transforms import run_summary  # pylint: disable=import-outside-toplevel
    report = run_summary.read(run_json).to_dict()
  per_path = collections.Counter(requests.values())
  failing_set = set(failing)
  result = {
      "photos": photos, "photo_size": list(PHOTO_SIZE),
      "photo_bytes_mean": round(sum(map(len, files.values())) / photos, 1),
      "making_photos_s": round(made, 2), "models": list(models),
      "fail_share": fail_share, "transient_failures_planned": len(failing),
      "failure_kinds": sorted({f[0] if f[0] != "status" else f"HTTP {f[1]}"
                               for f in FAILURES}),
      "command": cmd[1:], "returncode": returncode, "timed_out": timed_out,
      "job_wall_s": round(wall, 2),
      "run_json_photos_per_s": report.get("images_per_second"),
      "run_json_elapsed_s": report.get("elapsed_s"),
      "inputs": report.get("inputs"),
      "requests": {
          "total": sum(requests.values()),
          "photos_asked_for": len(requests),
          "photos_by_times_asked": {str(k): v
                                    for k, v in sorted(per_path.items())},
          "failing_asked_twice": sum(1 for p in failing_set
                                     if requests.get(p) == 2),
          "others_asked_once": sum(1 for p in files if p not in failing_set
                                   and requests.get(p) == 1),
      },
      "retries": {
          "by_server": sum(requests.values()) - len(requests),
          "logged_by_job": log_text.count(RETRY_LOG_LINE),
      },
      "job_cpu_s": round(job_cpu, 1),
      "server_cpu_s": round(server_cpu, 1),
      "others_cpu_pct": others,
      "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
      "memory": memory_by_quarter(sampler.samples, photos),
      "samples": len(sampler.samples),
      "series": thin(sampler.samples),
      "cpus": os.cpu_count(),
  }
  result.update(_steady_rate(sampler.samples, photos))
  at_25 = result["memory"]["quarters"].get("25%")
  result["memory"]["peak_ratio_exit_to_25"] = (
      round(result["peak_rss_mib"] / at_25["peak_mib"], 3) if at_25 else None)
  if returncode == 0 and os.path.isdir(out):
    result["accounting"] = account(out, uris, models)
  return result


def _steady_rate(samples: Sequence[dict], photos: int) -> dict:
  """Photos taken in per second between 25% and 100% (start-up and commit
  left out)."""
  marks = memory_by_quarter(samples, photos)["quarters"]
  if "25%" not in marks or "100%" not in marks:
    return {"steady_photos_per_s": None}
  first, last = marks["25%"], marks["100%"]
  seconds = last["t_s"] - first["t_s"]
  rate = (last["photos"] - first["photos"]) / seconds if seconds > 0 else None
  return {"steady_photos_per_s": round(rate, 2) if rate else None}


def nothing_lost(result: dict) -> List[str]:
  """What is wrong with a run's accounting; empty when nothing was lost."""
  problems = []
  if result["returncode"] != 0:
    problems.append(f"the job exited with {result['returncode']}")
    return problems
  accounting = result.get("accounting") or {}
  for name, counts in accounting.get("per_model", {}).items():
    for key in ("lost", "duplicated", "unexpected"):
      if counts[key]:
        problems.append(f"{name}: {counts[key]} photo(s) {key}")
  if accounting.get("read_error_rows"):
    problems.append(f"{accounting['read_error_rows']} photo(s) left as read "
                    f"errors")
  if accounting.get("transient_error_rows"):
    problems.append(f"{accounting['transient_error_rows']} transient "
                    f"failure(s) left as error rows")
  if result["retries"]["by_server"] != result["transient_failures_planned"]:
    problems.append(f"{result['retries']['by_server']} retries seen by the "
                    f"server, {result['transient_failures_planned']} planned")
  return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--photos", type=int, default=20000)
  p.add_argument("--fail_share", type=float, default=0.05)
  p.add_argument("--models", default=",".join(DEFAULT_MODELS))
  p.add_argument("--model_root")
  p.add_argument("--work_dir", help="default: a new temporary folder")
  p.add_argument("--output", default=DEFAULT_OUTPUT)
  args, job_flags = p.parse_known_args(argv)
  work_dir = args.work_dir or tempfile.mkdtemp(prefix="natvision-load-")
  os.makedirs(work_dir, exist_ok=True)
  result = run_under_load(args.photos, args.fail_share, work_dir,
                          args.model_root, args.models.split(","), job_flags)
  result["problems"] = nothing_lost(result)
  result["work_dir"] = work_dir
  with open(args.output, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
  summary = {k: v for k, v in result.items() if k != "command"}
  print(json.dumps(summary, indent=2, sort_keys=True))
  return 1 if result["problems"] else 0


if __name__ == "__main__":
  sys.exit(main())
