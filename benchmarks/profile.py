"""Where the time of one natvision job goes: read, decode, prepare, model...

    python -m benchmarks.profile --models fungi_mobile_v1 --photos 144 \\
        [--size 2048x1536] [--model_root /tmp/standins_full]

Runs the job once with its default flags on generated photos, sampled by
py-spy when it is installed (``pip install py-spy``; 100 samples a second,
a sampling profiler that barely slows the job), else under cProfile (which
slows Python-heavy code much more than TensorFlow's native kernels, so its
shares are only indicative).  On the DirectRunner the bundles run in the
main thread, so its samples are the job's critical path.

Each sample goes to the innermost stage it is in:

* read, decode, prepare: ``photos.read_with_retries``,
  ``decode.decode_image``, ``preprocess.prepare_all``;
* inference: a model's ``predict`` (TF or ONNX Runtime) called by the
  pipeline (the probe batches of the model checks are counted as model
  loading);
* batch assembly: the rest of ``RunModelFn.process`` (stacking the batch,
  top-k, result records);
* to Arrow, Parquet write: ``sinks.results_to_table``, Beam's
  ``parquetio`` and file sink;
* model loading: the TF runtime's ``load_model`` and the runtimes' ``load``;
* Beam: everything else inside ``Pipeline.run`` (bundle and element
  handling, coders, BatchElements, ...);
* outside the pipeline: Python start, imports, flag parsing, the model
  checks before start, the commit and the report.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from benchmarks import photos as photos_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (stage, file suffix, function name or None for any), innermost match wins.
RULES: Tuple[Tuple[str, str, Optional[str]], ...] = (
    ("model loading", "transforms/runtimes/tf.py", "load_model"),
    ("model loading", "transforms/runtimes/onnx.py", "load"),
    ("model loading", "transforms/runtimes/tf.py", "load"),
    ("read", "transforms/photos.py", "read_with_retries"),
    ("decode", "transforms/decode.py", "decode_image"),
    ("prepare", "transforms/preprocess.py", "prepare_all"),
    ("inference", "transforms/runtimes/onnx.py", "predict"),
    ("inference", "transforms/runtimes/tf.py", "predict"),
    ("batch assembly", "transforms/inference.py", "process"),
    ("waiting for decoded photos", "transforms/photos.py", "process"),
    ("waiting for decoded photos", "transforms/photos.py", "finish_bundle"),
    ("to Arrow", "transforms/sinks.py", "results_to_table"),
    ("Parquet write", "apache_beam/io/parquetio.py", None),
    ("Parquet write", "apache_beam/io/filebasedsink.py", None),
    ("idle (pool waiting for work)", "concurrent/futures/thread.py",
     "_worker"),
    ("Beam", "apache_beam/pipeline.py", "run"),
)
OUTSIDE = "outside the pipeline"
STAGES = ("read", "decode", "prepare", "inference", "batch assembly",
          "waiting for decoded photos", "to Arrow", "Parquet write",
          "model loading", "Beam", "idle (pool waiting for work)", OUTSIDE)
MAIN, POOL, OTHER = "main thread", "decode threads", "other threads"


def _frame_parts(frame: str) -> Tuple[str, str]:
  """``"Cls.name (path/to/file.py:12)"`` -> ``("Cls.name", "path/...py")``."""
  name, _, rest = frame.partition(" (")
  return name.strip(), rest.rsplit(":", 1)[0]


def _matches(rule, name: str, path: str) -> bool:
  _, suffix, function = rule
  return path.endswith(suffix) and (
      function is None or name == function or name.endswith("." + function))


def stage_of(stack: Sequence[str]) -> str:
  """The stage of one sampled stack (outermost frame first)."""
  for frame in reversed(stack):
    name, path = _frame_parts(frame)
    for rule in RULES:
      if _matches(rule, name, path):
        return rule[0]
  return OUTSIDE


def _thread_group(frame: str) -> str:
  """py-spy's ``thread (tid): name`` frame -> main, decode pool or other."""
  name = frame.partition("): ")[2]
  if name.startswith("natvision-decode"):
    return POOL
  if name in ("MainThread", ""):
    return MAIN
  return OTHER


def split_py_spy(raw_path: str) -> Dict[str, Dict[str, int]]:
  """Samples per thread group and stage, from py-spy's raw output.

  The file is py-spy's ``--format raw --threads`` output: one line per
  distinct stack, ``thread (tid): name;frame;frame... count``.
  """
  counts: Dict[str, Dict[str, int]] = collections.defaultdict(
      collections.Counter)
  with open(raw_path) as f:
    for line in f:
      line = line.rstrip("\n")
      if not line:
        continue
      stack_text, _, count = line.rpartition(" ")
      frames = stack_text.split(";")
      group = MAIN
      if frames and frames[0].startswith("thread ("):
        group = _thread_group(frames[0])
        frames = frames[1:]
      counts[group][stage_of(frames)] += int(count)
  return {g: dict(c) for g, c in counts.items()}


def _job_argv(folder: str, models: str, output: str, model_root: str,
              extra: Sequence[str]) -> List[str]:
  return ["--input", os.path.join(folder, "*.jpg"), "--output_dir", output,
          "--models", models, "--model_root", model_root] + list(extra)


def py_spy_path() -> Optional[str]:
  """py-spy on PATH or next to this Python (a virtual environment's bin)."""
  beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
  return shutil.which("py-spy") or (beside if os.path.exists(beside) else None)


def profile_py_spy(argv: List[str], rate: int,
                   raw_path: str) -> Dict[str, Dict[str, int]]:
  """Samples every thread, idle ones included, so main-thread samples
  measure wall time: waiting on the decode pool shows as such."""
  cmd = [py_spy_path(), "record", "--threads", "--idle", "--format", "raw",
         "--rate", str(rate), "--output", raw_path, "--", sys.executable,
         "-m", "natvision.pipelines.embed_images"] + argv
  subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
  return split_py_spy(raw_path)


def profile_cprofile(argv: List[str]) -> Dict[str, float]:
  """Cumulative seconds of each stage's root functions (nested calls overlap)."""
  import cProfile  # pylint: disable=import-outside-toplevel
  import pstats  # pylint: disable=import-outside-toplevel
  from natvision.pipelines import embed_images  # pylint: disable=import-outside-toplevel
  prof = cProfile.Profile()
  prof.enable()
  embed_images.run(argv)
  prof.disable()
  stats = pstats.Stats(prof).stats  # pylint: disable=no-member
  seconds: Dict[str, float] = collections.Counter()
  total = 0.0
  for (path, _, name), (_, _, _, cumulative, _) in stats.items():
    if name == "run" and path.endswith("pipelines/embed_images.py"):
      total = cumulative
    for rule in RULES:
      if rule[2] is not None and _matches(rule, name, path):
        seconds[rule[0]] += cumulative
  seconds["whole run()"] = total
  return dict(seconds)


def table(counts: Dict[str, float], unit: str, scale: float = 1.0) -> str:
  """A Markdown table of one thread group's stages, with shares."""
  total = sum(v for k, v in counts.items() if k != "whole run()")
  lines = [f"| stage | {unit} | share |", "|---|---|---|"]
  for stage in list(STAGES) + sorted(set(counts) - set(STAGES)):
    if stage in counts and stage != "whole run()":
      value = counts[stage] * scale
      share = f"{100 * counts[stage] / total:.1f}%" if total else "n/a"
      lines.append(f"| {stage} | {value:.4g} | {share} |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.profile",
                              description=__doc__.split("\n")[0])
  p.add_argument("--models", default="fungi_mobile_v1")
  p.add_argument("--photos", type=int, default=144)
  p.add_argument("--size", default="2048x1536")
  p.add_argument("--model_root", default="/tmp/standins_full")
  p.add_argument("--rate", type=int, default=100, help="py-spy samples/s")
  p.add_argument("--cprofile", action="store_true",
                 help="use cProfile even when py-spy is installed")
  args, extra = p.parse_known_args(argv)
  folder = photos_lib.photo_set(args.photos, photos_lib.parse_size(args.size))
  output = tempfile.mkdtemp(prefix="natvision-profile-")
  job = _job_argv(folder, args.models, output, args.model_root, extra)
  try:
    if py_spy_path() and not args.cprofile:
      raw = os.path.join(photos_lib.WORK_DIR, "logs",
                         f"profile-{args.models.replace(',', '+')}.txt")
      os.makedirs(os.path.dirname(raw), exist_ok=True)
      groups = profile_py_spy(job, args.rate, raw)
      print(f"py-spy, {args.rate} samples/s of every thread, idle included "
            f"({args.photos} photos, {args.size}, {args.models}); raw "
            f"stacks: {raw}")
      for group in (MAIN, POOL, OTHER):
        if group in groups:
          print(f"\n{group}:\n")
          print(table(groups[group], "seconds", 1.0 / args.rate))
    else:
      seconds = profile_cprofile(job)
      print(f"cProfile cumulative seconds by stage ({args.photos} photos, "
            f"{args.size}, {args.models}); whole run() "
            f"{seconds.get('whole run()', 0):.1f} s\n")
      print(table(seconds, "seconds"))
  finally:
    shutil.rmtree(output, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
