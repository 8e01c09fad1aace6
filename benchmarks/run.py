"""natvision's benchmark: throughput and peak memory, as ratios, in one run.

    python -m benchmarks.run                       # the full benchmark
    python -m benchmarks.run --quick --out /tmp/quick.json   # a smoke run

What it measures, each configuration in a fresh process (peak memory is per
configuration), all on this machine in this run:

* ceilings: the bare forward pass of each model on prepared uint8 batches
  (``benchmarks.ceiling``), with TensorFlow and with every other runtime the
  project offers (ONNX Runtime, through ``transforms.runtimes``);
* natvision: the whole job, JPEG files to Parquet tables, on the
  DirectRunner with the job's default flags (``python -m
  pipelines.embed_images``), for each model alone and for all of them in one
  pass;
* stock: the same with Beam's own pieces and no natvision
  (``benchmarks.stock``: full PIL decode and resize, ``RunInference`` with a
  minimal TF Hub ``ModelHandler``, ``WriteToParquet``);
* at 4032x3024 (12 megapixels), natvision and stock for the first model;
* memory: peak RSS of the natvision job for the first model at 500 and at
  5000 photos (1024x768, so that 5000 photos are quick to make), which must
  be flat (within 10%).

End-to-end figures are steady-state rates: each configuration runs at N and
3N photos, the rate is ``2N / (t(3N) - t(N))`` and the start-up cost (process
start, imports, model loading, pipeline set-up) is the intercept
``t(N) - N / rate``.  Then the ratios: natvision over the TF ceiling, over
the best ceiling, over stock; for all models in one pass, time per photo
against the sum of the best ceilings' times per photo.

Results go to a JSON file (``--out``, default ``benchmarks/results.json``);
``python -m benchmarks.report`` makes the tables of ``benchmarks/RESULTS.md``
from it.  The machine is shared: the CPU share used by other processes is
recorded for each measurement, and a measurement taken while others used
more than ``--max_others_pct`` of the CPU is run again (``--retries``), the
quietest attempt kept.  Before each measurement the run waits (up to a
minute each, ``--quiet_budget_s`` in all) for the machine to be that quiet.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

from benchmarks import ceiling as ceiling_lib
from benchmarks import measure
from benchmarks import photos as photos_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results.json")
DEFAULT_MODEL_ROOT = "/tmp/standins_full"
ALL_MODELS = ("inaturalist_v2", "fungi_mobile_v1", "inception_resnet_v2")
NATVISION = "natvision"
STOCK = "stock"
MEMORY_LIMIT = 1.10


@dataclasses.dataclass
class Settings:
  """What to measure; ``--quick`` shrinks every count."""

  photos: int = 48
  auto_photos: bool = True
  target_seconds: float = 20.0
  max_photos: int = 320
  size: str = "2048x1536"
  models: Sequence[str] = ALL_MODELS
  stock_models: Sequence[str] = ALL_MODELS
  big_size: str = "4032x3024"
  big_photos: int = 96
  big_model: str = "fungi_mobile_v1"
  memory_model: str = "fungi_mobile_v1"
  memory_photos: Sequence[int] = (500, 5000)
  memory_size: str = "1024x768"
  batch_size: int = 16
  ceiling_seconds: float = 20.0
  ceiling_batches: int = 8
  all_in_one: bool = True
  max_others_pct: float = 25.0
  retries: int = 1
  quiet_wait_s: float = 60.0
  quiet_budget_s: float = 600.0
  model_root: str = DEFAULT_MODEL_ROOT
  work_dir: str = photos_lib.WORK_DIR
  timeout_s: float = 3600.0

  @classmethod
  def quick(cls) -> "Settings":
    return cls(photos=16, auto_photos=False, models=("fungi_mobile_v1",),
               stock_models=("fungi_mobile_v1",), big_photos=0,
               memory_photos=(), ceiling_seconds=3.0, ceiling_batches=2,
               all_in_one=False, retries=0, quiet_wait_s=10.0,
               quiet_budget_s=30.0)


class Bench:
  """Runs the configurations and collects the results into one dict."""

  def __init__(self, settings: Settings, out_path: str, command: str,
               previous: Optional[dict] = None):
    self.s = settings
    self.previous_results = previous or {}
    self.previous = {}
    for record in self.previous_results.get("ceilings", []):
      self.previous[record.get("id") or
                    f"ceiling-{record['model']}-{record['runtime']}"] = record
    for record in self.previous_results.get("runs", []):
      self.previous[record["id"]] = record
    self.out_path = out_path
    self.logs = os.path.join(settings.work_dir, "logs")
    self.outputs = os.path.join(settings.work_dir, "out")
    self.results: dict = {
        "command": command,
        "started": _now(),
        "machine": machine_info(),
        "versions": versions(),
        "settings": dataclasses.asdict(settings),
        "photos": {},
        "onnx": {},
        "ceilings": [],
        "runs": [],
        "steady": [],
        "memory": None,
        "ratios": {},
        "notes": [],
    }
    self._t0 = time.perf_counter()

  # -- bookkeeping ---------------------------------------------------------

  def note(self, text: str) -> None:
    print(f"note: {text}", flush=True)
    self.results["notes"].append(text)

  def save(self) -> None:
    self.results["ended"] = _now()
    self.results["duration_s"] = round(time.perf_counter() - self._t0, 1)
    self.results["machine"]["loadavg_end"] = [round(v, 2)
                                              for v in os.getloadavg()]
    os.makedirs(os.path.dirname(os.path.abspath(self.out_path)), exist_ok=True)
    tmp = self.out_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.results, f, indent=2, sort_keys=True)
    os.replace(tmp, self.out_path)

  def _measure(self, label: str, make_cmd: Callable[[int], List[str]],
               collect: Callable[[int], dict],
               retries: Optional[int] = None,
               reuse_noisy: bool = False) -> dict:
    """Runs a configuration, retrying noisy attempts; keeps the quietest.

    A quiet enough record of the same label from ``--reuse`` is returned as
    it is (a noisy one too with ``reuse_noisy``, for figures that noise does
    not change, such as peak memory); a noisy one competes with the new
    attempts.

    Args:
      make_cmd: the command of attempt ``k`` (each attempt writes its own
        files, so that what is kept matches the attempt kept).
      collect: reads what attempt ``k`` wrote, right after it ran.

    Returns:
      ``collect``'s dict plus ``measured``, ``attempt`` and ``log``.
    """
    limit = self.s.max_others_pct
    previous = self.previous.get(label)
    if previous is not None and (reuse_noisy or _others(previous) <= limit):
      print(f"  {label}: reusing the earlier measurement (others' CPU "
            f"{_others(previous):.0f}%)", flush=True)
      return dict(previous, reused=True)
    retries = self.s.retries if retries is None else retries
    best = previous
    for attempt in range(1 + retries):
      self._wait_for_quiet()
      log = os.path.join(self.logs, f"{label}.try{attempt}.log")
      m = measure.run_measured(make_cmd(attempt), log, cwd=REPO,
                               timeout_s=self.s.timeout_s)
      others = m.others_cpu_pct
      print(f"  {label} try {attempt}: rc {m.returncode}, {m.wall_s:.1f} s, "
            f"peak {m.peak_rss_mb:.0f} MiB, others' CPU "
            f"{'?' if others is None else f'{others:.0f}%'}, load "
            f"{m.loadavg_after[0]}", flush=True)
      if m.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {m.returncode}); log "
                           f"{log}:\n{measure.tail(log)}")
      record = dict(collect(attempt), id=label, measured=m.as_dict(),
                    attempt=attempt, log=os.path.relpath(log, REPO))
      if best is None or _others(record) < _others(best):
        best = record
      if others is None or others <= limit:
        break
    if _others(best) > limit:
      self.note(f"{label}: other processes used {_others(best):.0f}% of the "
                f"CPU during the quietest attempt; treat it as noisy")
    return best

  def _wait_for_quiet(self) -> None:
    """Waits (within a per-run budget) for other processes to calm down."""
    budget = self.s.quiet_budget_s - self.results.setdefault("quiet_wait_s", 0)
    limit = min(self.s.quiet_wait_s, budget)
    if limit <= 0:
      return
    waited = measure.wait_for_quiet(self.s.max_others_pct / 100, limit)
    self.results["quiet_wait_s"] = round(
        self.results["quiet_wait_s"] + waited, 1)
    if waited > 3:
      print(f"  waited {waited:.0f} s for a quieter machine", flush=True)

  # -- photos --------------------------------------------------------------

  def photo_set(self, count: int, size_text: str) -> str:
    size = photos_lib.parse_size(size_text)
    start = time.perf_counter()
    folder = photos_lib.photo_set(count, size, work_dir=self.s.work_dir)
    took = time.perf_counter() - start
    paths = photos_lib.ensure_photos(count, size, work_dir=self.s.work_dir)
    entry = self.results["photos"].setdefault(size_text, {"count": 0})
    if count > entry["count"]:
      entry.update(photos_lib.set_stats(paths))
    if took > 1:
      entry["generated_s"] = round(entry.get("generated_s", 0) + took, 1)
    return folder

  # -- ceilings ------------------------------------------------------------

  def ceilings(self, photo_folder: str) -> None:
    reason = ceiling_lib.onnx_unavailable_reason()
    runtimes = ceiling_lib.available_runtimes()
    self.results["onnx"] = {"available": reason is None, "reason": reason,
                            "prepare": {}}
    if reason:
      self.note(f"no ONNX ceiling: {reason}")
    for model in self.s.models:
      for runtime in runtimes:
        extra = []
        if runtime == ceiling_lib.RUNTIME_ONNX:
          prep = self._prepare_onnx(model)
          if prep is None:
            continue
          extra = ["--onnx_path", prep["onnx_path"]]
        label = f"ceiling-{model}-{runtime}"

        def out(attempt, label=label):
          return os.path.join(self.logs, f"{label}.try{attempt}.json")

        def make_cmd(attempt, model=model, runtime=runtime, out=out,
                     extra=extra):
          return [sys.executable, "-m", "benchmarks.ceiling", "--model",
                  model, "--model_root", self.s.model_root, "--runtime",
                  runtime, "--photos", photo_folder, "--batch_size",
                  str(self.s.batch_size), "--min_seconds",
                  str(self.s.ceiling_seconds), "--min_batches",
                  str(self.s.ceiling_batches), "--out", out(attempt)] + extra

        def collect(attempt, out=out):
          with open(out(attempt)) as f:
            return json.load(f)

        result = self._measure(label, make_cmd, collect)
        self.results["ceilings"].append(result)
        print(f"ceiling {model} {runtime}: {result['images_per_s']:.2f} "
              f"images/s", flush=True)
        self.save()

  def _prepare_onnx(self, model: str) -> Optional[dict]:
    """Converts (or finds cached) and checks the ONNX file of ``model``."""
    earlier = (self.previous_results.get("onnx") or {}).get("prepare", {})
    prep = earlier.get(model)
    if prep and prep.get("onnx_path") and os.path.exists(prep["onnx_path"]):
      self.results["onnx"]["prepare"][model] = prep
      return prep
    label = f"onnx-prepare-{model}"
    out = os.path.join(self.logs, f"{label}.json")
    cmd = [sys.executable, "-m", "benchmarks.ceiling", "--model", model,
           "--model_root", self.s.model_root, "--runtime", "onnx",
           "--prepare_only", "--out", out]
    log = os.path.join(self.logs, f"{label}.log")
    m = measure.run_measured(cmd, log, cwd=REPO, timeout_s=self.s.timeout_s)
    if m.returncode != 0:
      self.note(f"no ONNX ceiling for {model}: conversion or check failed "
                f"({measure.tail(log, 3)})")
      return None
    with open(out) as f:
      prep = json.load(f)
    prep["wall_s"] = round(m.wall_s, 1)
    self.results["onnx"]["prepare"][model] = prep
    return prep

  # -- end to end ----------------------------------------------------------

  def _output(self, label: str) -> str:
    return os.path.join(self.outputs, label)

  def natvision_cmd(self, folder: str, models: Sequence[str],
                    output: str) -> List[str]:
    return [sys.executable, "-m", "natvision.pipelines.embed_images",
            "--input", os.path.join(folder, "*.jpg"), "--output_dir", output,
            "--models", ",".join(models), "--model_root", self.s.model_root]

  def stock_cmd(self, folder: str, models: Sequence[str],
                output: str) -> List[str]:
    return [sys.executable, "-m", "benchmarks.stock",
            "--input", os.path.join(folder, "*.jpg"), "--output_dir", output,
            "--model", ",".join(models), "--model_root", self.s.model_root,
            "--batch_size", str(self.s.batch_size)]

  def end_to_end(self, kind: str, models: Sequence[str], size: str,
                 count: int, retries: Optional[int] = None,
                 reuse_noisy: bool = False) -> dict:
    """One run of a whole job on ``count`` photos; checks its row counts."""
    folder = self.photo_set(count, size)
    label = f"{kind}-{'+'.join(models)}-{size}-n{count}"
    make = self.natvision_cmd if kind == NATVISION else self.stock_cmd

    def output(attempt):
      return self._output(f"{label}.try{attempt}")

    def make_cmd(attempt):
      shutil.rmtree(output(attempt), ignore_errors=True)
      return make(folder, models, output(attempt))

    def collect(attempt):
      info = self._job_report(kind, models, output(attempt), count)
      shutil.rmtree(output(attempt), ignore_errors=True)
      return info

    run = self._measure(label, make_cmd, collect, retries, reuse_noisy)
    run.update(kind=kind, models=list(models), size=size, photos=count,
               command=" ".join(make(folder, models, "OUT")[1:]))
    self.results["runs"].append(run)
    self.save()
    return run

  def _job_report(self, kind: str, models: Sequence[str], output: str,
                  count: int) -> dict:
    """Rows written per model (and the job's own report, for natvision)."""
    info: dict = {}
    if kind == NATVISION:
      from natvision.transforms import run_summary  # pylint: disable=import-outside-toplevel
      report = run_summary.read(os.path.join(output, "run.json"))
      info["job"] = {
          "elapsed_s": report.elapsed_s,
          "images_per_second": report.images_per_second,
          "inputs": report.inputs,
          "rows": {m.table: m.rows for m in report.models},
          "model_loads": report.model_loads,
          "errors": report.errors.total if report.errors else None,
          "runtimes": {m.name: m.runtime for m in report.models}}
      rows = [m.rows for m in report.models]
    else:
      from benchmarks import stock  # pylint: disable=import-outside-toplevel
      rows = [stock.count_rows(output, m) for m in models]
    info["rows_ok"] = len(rows) == len(models) and all(r == count
                                                       for r in rows)
    if not info["rows_ok"]:
      self.note(f"{kind} {'+'.join(models)} on {count} photos wrote rows "
                f"{rows}, expected {count} per model")
    return info

  def steady(self, kind: str, models: Sequence[str], size: str,
             n: int) -> dict:
    """Runs at n and 3n photos; the steady-state rate and start-up cost."""
    small = self.end_to_end(kind, models, size, n)
    large = self.end_to_end(kind, models, size, 3 * n)
    entry = steady_state(kind, models, size, small, large)
    self.results["steady"].append(entry)
    rate = entry["images_per_s"]
    print(f"{kind} {'+'.join(models)} {size}: "
          f"{'?' if rate is None else f'{rate:.2f}'} images/s steady, "
          f"start-up {entry['startup_s']} s", flush=True)
    self.save()
    return entry

  def memory(self) -> None:
    runs = [self.end_to_end(NATVISION, [self.s.memory_model],
                            self.s.memory_size, n, retries=0,
                            reuse_noisy=True)
            for n in self.s.memory_photos]
    peaks = [r["measured"]["peak_rss_mb"] for r in runs]
    ratio = peaks[-1] / peaks[0]
    self.results["memory"] = {
        "model": self.s.memory_model, "size": self.s.memory_size,
        "photos": list(self.s.memory_photos), "peak_rss_mb": peaks,
        "ratio": round(ratio, 3), "limit": MEMORY_LIMIT,
        "flat": ratio <= MEMORY_LIMIT,
        "images_per_s": [round(r["photos"] / r["measured"]["wall_s"], 3)
                         for r in runs]}
    if len(runs) >= 2:
      entry = steady_state(NATVISION, [self.s.memory_model],
                           self.s.memory_size, runs[0], runs[-1])
      self.results["memory"]["steady_images_per_s"] = entry["images_per_s"]
    self.save()

  # -- the whole benchmark -------------------------------------------------

  def run(self) -> dict:
    s = self.s
    self._check_models()
    n = s.photos
    main_set = self.photo_set(max(3 * n, 4 * s.batch_size), s.size)
    print(f"photos: {self.results['photos']}", flush=True)
    self.ceilings(main_set)
    counts = self.results["photo_counts"] = {
        m: self.photos_for(m) for m in set(s.models) | set(s.stock_models)}
    for model in s.models:
      self.steady(NATVISION, [model], s.size, counts[model])
    if s.all_in_one and len(s.models) > 1:
      self.steady(NATVISION, list(s.models), s.size, n)
    for model in s.stock_models:
      self.steady(STOCK, [model], s.size, counts[model])
    if s.big_photos:
      self.steady(NATVISION, [s.big_model], s.big_size, s.big_photos)
      self.steady(STOCK, [s.big_model], s.big_size, s.big_photos)
    if len(s.memory_photos) >= 2:
      self.memory()
    self.results["ratios"] = ratios(self.results)
    self.save()
    return self.results

  def photos_for(self, model: str) -> int:
    """N for one model's end-to-end runs.

    With ``auto_photos``, N grows with the model's best ceiling so that the
    2N photos between the two runs take about ``target_seconds`` at the
    ceiling (a fast model at N=48 would finish the difference in a second
    or two, within the noise of start-up); in multiples of the batch size,
    between ``photos`` and ``max_photos``.
    """
    s = self.s
    rates = [c["images_per_s"] for c in self.results["ceilings"]
             if c["model"] == model]
    if not s.auto_photos or not rates:
      return s.photos
    wanted = max(rates) * s.target_seconds / 2
    batches = -(-int(wanted) // s.batch_size)
    return int(min(s.max_photos, max(s.photos, batches * s.batch_size)))

  def _check_models(self) -> None:
    missing = [m for m in set(self.s.models) | set(self.s.stock_models)
               if not os.path.exists(os.path.join(self.s.model_root, m,
                                                  "saved_model.pb"))]
    if missing:
      print(f"writing full-size stand-ins of {', '.join(sorted(missing))} to "
            f"{self.s.model_root} (once)", flush=True)
      from natvision.transforms import standins as standin_models  # pylint: disable=import-outside-toplevel
      standin_models.write_standins(self.s.model_root, tiny=False,
                                    models=sorted(missing))


def _others(record: dict) -> float:
  value = record["measured"].get("others_cpu_pct")
  return 0.0 if value is None else value


def steady_state(kind: str, models: Sequence[str], size: str, small: dict,
                 large: dict) -> dict:
  """Rate from the difference of two runs; start-up is the intercept."""
  n1, n2 = small["photos"], large["photos"]
  t1, t2 = small["measured"]["wall_s"], large["measured"]["wall_s"]
  rate = (n2 - n1) / (t2 - t1) if t2 > t1 else None
  startup = t1 - n1 / rate if rate else None
  return {
      "kind": kind, "models": list(models), "size": size,
      "photos": [n1, n2], "wall_s": [round(t1, 2), round(t2, 2)],
      "images_per_s": round(rate, 3) if rate else None,
      "startup_s": round(startup, 1) if startup is not None else None,
      "peak_rss_mb": [small["measured"]["peak_rss_mb"],
                      large["measured"]["peak_rss_mb"]],
      "others_cpu_pct": [small["measured"]["others_cpu_pct"],
                         large["measured"]["others_cpu_pct"]],
      "runtimes": (large.get("job") or {}).get("runtimes") or None,
  }


def _find(entries, **match) -> Optional[dict]:
  for e in entries:
    if all(e.get(k) == v for k, v in match.items()):
      return e
  return None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
  return round(a / b, 3) if a and b else None


def ratios(results: dict) -> dict:
  """natvision over the ceilings and over stock, from the measured rates."""
  settings = results["settings"]
  size = settings["size"]
  ceilings = results["ceilings"]
  steady = results["steady"]
  per_model = {}
  for model in settings["models"]:
    rates = {c["runtime"]: c["images_per_s"] for c in ceilings
             if c["model"] == model}
    best_runtime = max(rates, key=rates.get) if rates else None
    nv = _find(steady, kind=NATVISION, models=[model], size=size)
    st = _find(steady, kind=STOCK, models=[model], size=size)
    nv_rate = nv and nv["images_per_s"]
    st_rate = st and st["images_per_s"]
    per_model[model] = {
        "ceiling_tf": rates.get("tf"),
        "ceiling_best": rates.get(best_runtime),
        "best_runtime": best_runtime,
        "natvision": nv_rate,
        "natvision_runtime": (nv.get("runtimes") or {}).get(model)
        if nv else None,
        "stock": st_rate,
        "natvision_over_tf_ceiling": _ratio(nv_rate, rates.get("tf")),
        "natvision_over_best_ceiling": _ratio(nv_rate,
                                              rates.get(best_runtime)),
        "natvision_over_stock": _ratio(nv_rate, st_rate),
        "stock_over_tf_ceiling": _ratio(st_rate, rates.get("tf")),
    }
  out = {"per_model": per_model}
  models = list(settings["models"])
  together = _find(steady, kind=NATVISION, models=models, size=size)
  if together and together["images_per_s"] and len(models) > 1:
    per_photo = 1.0 / together["images_per_s"]

    def total(key):
      values = [per_model[m][key] for m in models]
      return sum(1.0 / v for v in values) if all(values) else None

    sums = {"best_ceilings": total("ceiling_best"),
            "tf_ceilings": total("ceiling_tf"),
            "natvision_separately": total("natvision"),
            "stock_separately": total("stock")}
    out["all_in_one"] = {
        "models": models,
        "images_per_s": together["images_per_s"],
        "seconds_per_image": round(per_photo, 4),
        "sum_seconds_per_image": {k: round(v, 4) if v else None
                                  for k, v in sums.items()},
        # > 1 would beat the ceilings; 1.0 is as fast as the bare forward
        # passes run back to back.
        "best_ceilings_over_natvision": _ratio(sums["best_ceilings"],
                                               per_photo),
        "tf_ceilings_over_natvision": _ratio(sums["tf_ceilings"], per_photo),
        "separate_natvision_jobs_over_one_pass": _ratio(
            sums["natvision_separately"], per_photo),
        "separate_stock_jobs_over_one_pass": _ratio(sums["stock_separately"],
                                                    per_photo),
    }
  big = settings.get("big_size")
  nv_big = _find(steady, kind=NATVISION, size=big)
  st_big = _find(steady, kind=STOCK, size=big)
  if nv_big and st_big:
    model = nv_big["models"][0]
    nv_main = per_model.get(model, {}).get("natvision")
    out["big_photos"] = {
        "size": big, "model": model,
        "natvision": nv_big["images_per_s"], "stock": st_big["images_per_s"],
        "natvision_over_stock": _ratio(nv_big["images_per_s"],
                                       st_big["images_per_s"]),
        "natvision_big_over_main_size": _ratio(nv_big["images_per_s"],
                                               nv_main),
    }
  return out


def machine_info() -> dict:
  cpu = None
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  mem_gib = None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal"):
          mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
  except OSError:
    pass
  return {"cpu": cpu, "cores": measure.cores(), "memory_gib": mem_gib,
          "platform": platform.platform(), "python": platform.python_version(),
          "loadavg_start": [round(v, 2) for v in os.getloadavg()]}


def versions() -> Dict[str, Optional[str]]:
  found = {}
  for dist in ("tensorflow", "tensorflow-hub", "tf-keras", "onnxruntime",
               "tf2onnx", "onnx", "apache-beam", "pillow", "pyarrow", "numpy"):
    try:
      found[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      found[dist] = None
  try:
    from natvision import transforms  # pylint: disable=import-outside-toplevel
    found["natvision"] = transforms.__version__
  except ImportError:
    found["natvision"] = None
  return found


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds")


def _csv(text: str) -> List[str]:
  return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv: Optional[Sequence[str]] = None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.run",
                              description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="smoke run: one model, 16/48 photos, short ceilings, "
                 "no 12 MP or memory runs (a minute or two)")
  p.add_argument("--photos", type=int,
                 help="N: end-to-end runs use N and 3N photos (default: 48, "
                 "more for faster models, up to 320, so that the 2N photos "
                 "between the runs take about 20 s at the ceiling; quick 16)")
  p.add_argument("--size", help="photo size, WIDTHxHEIGHT (default 2048x1536)")
  p.add_argument("--models", help="comma-separated models (default all three)")
  p.add_argument("--stock_models",
                 help="models for the stock baseline (default all three)")
  p.add_argument("--big_photos", type=int,
                 help="N for the 4032x3024 runs; 0 skips them (default 96)")
  p.add_argument("--memory_photos",
                 help="photo counts of the memory runs (default 500,5000); "
                 "'' skips them")
  p.add_argument("--memory_size",
                 help="photo size of the memory runs (default 1024x768, to keep 5000 photos quick to make)")
  p.add_argument("--model_root", default=DEFAULT_MODEL_ROOT,
                 help="folder of full-size stand-ins (written if missing)")
  p.add_argument("--max_others_pct", type=float,
                 help="retry a measurement when other processes used more "
                 "than this share of the CPU (default 25)")
  p.add_argument("--retries", type=int, help="extra attempts (default 1)")
  p.add_argument("--quiet_budget_s", type=float,
                 help="total seconds the run may wait, before measurements, "
                 "for other processes to calm down (default 600; 0: never)")
  p.add_argument("--reuse", metavar="RESULTS_JSON",
                 help="an earlier results file: its measurements taken while "
                 "the machine was quiet enough are kept, the noisy ones are "
                 "measured again (the quieter kept)")
  p.add_argument("--out", default=DEFAULT_OUT, help="results JSON")
  args = p.parse_args(argv)
  settings = Settings.quick() if args.quick else Settings()
  if args.photos is not None:
    settings.photos = args.photos
    settings.auto_photos = False
  if args.size:
    settings.size = args.size
  if args.models:
    settings.models = tuple(_csv(args.models))
    if not args.stock_models:
      settings.stock_models = settings.models
  if args.stock_models is not None:
    settings.stock_models = tuple(_csv(args.stock_models))
  if args.big_photos is not None:
    settings.big_photos = args.big_photos
  if args.memory_photos is not None:
    settings.memory_photos = tuple(int(v) for v in _csv(args.memory_photos))
  if args.memory_size:
    settings.memory_size = args.memory_size
  if args.max_others_pct is not None:
    settings.max_others_pct = args.max_others_pct
  if args.retries is not None:
    settings.retries = args.retries
  if args.quiet_budget_s is not None:
    settings.quiet_budget_s = args.quiet_budget_s
  settings.model_root = args.model_root
  settings.big_model = settings.memory_model = (
      "fungi_mobile_v1" if "fungi_mobile_v1" in settings.models
      else settings.models[0])
  for text in (settings.size, settings.big_size, settings.memory_size):
    photos_lib.parse_size(text)
  if settings.photos < 1:
    p.error("--photos must be at least 1")
  return settings, args


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  settings, args = parse_args(argv)
  out = args.out
  command = " ".join(["python -m benchmarks.run"] + argv)
  previous = None
  if args.reuse:
    with open(args.reuse) as f:
      previous = json.load(f)
    if previous.get("settings") != json.loads(json.dumps(
        dataclasses.asdict(settings))):
      print("note: --reuse: the earlier run had other settings; only "
            "measurements with the same label are reused", flush=True)
  bench = Bench(settings, out, command, previous)
  try:
    results = bench.run()
  finally:
    bench.save()
  from benchmarks import report  # pylint: disable=import-outside-toplevel
  print(report.summary(results), flush=True)
  print(f"results: {out}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
