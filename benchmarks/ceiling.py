"""The ceiling: one model's bare forward pass on prepared uint8 batches.

    python -m benchmarks.ceiling --model fungi_mobile_v1 --runtime tf \\
        --model_root /tmp/standins_full --photos DIR --out result.json

Photos are read, decoded and prepared (with natvision's own decode and
prepare, for the model's default preparation) before the clock starts, into
a few distinct batches of ``--batch_size``.  After ``--warmup`` untimed
batches (graph tracing, ONNX Runtime's first run), batches are run one after
the other, cycling through the prepared ones, until both ``--min_batches``
and ``--min_seconds`` are reached.  Nothing else runs in the process, so
images per second here is what the model costs on this machine: no pipeline
can beat it with the same runtime.

``--runtime onnx`` uses ``transforms.runtimes``: the ONNX file is converted
(and checked against TensorFlow, by the launcher's chooser) in a separate
step, ``--prepare_only``, so
that the measured process holds ONNX Runtime alone and its peak memory is
the runtime's, not TensorFlow's (``--onnx_path`` names the file).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time
from typing import List, Optional, Sequence

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RUNTIME_TF = "tf"
RUNTIME_ONNX = "onnx"


def available_runtimes() -> List[str]:
  """The runtimes the project offers here: ``tf`` and, if usable, ``onnx``."""
  found = [RUNTIME_TF]
  if onnx_unavailable_reason() is None:
    found.append(RUNTIME_ONNX)
  return found


def onnx_unavailable_reason() -> Optional[str]:
  """Why the ONNX ceiling cannot run, or None when it can."""
  try:
    from natvision.transforms import runtimes  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return f"natvision.transforms.runtimes cannot be imported ({e})"
  if not hasattr(runtimes, "OnnxRuntime"):
    return "natvision.transforms.runtimes has no OnnxRuntime"
  import importlib.util  # pylint: disable=import-outside-toplevel
  missing = [name for name in ("onnxruntime", "tf2onnx")
             if importlib.util.find_spec(name) is None]
  if missing:
    return f"{' and '.join(missing)} not installed"
  return None


def prepared_batches(photo_paths: Sequence[str], policy: str, size: int,
                     batch_size: int) -> List[np.ndarray]:
  """Decodes and prepares photos as natvision does; whole batches only."""
  from natvision.transforms import decode  # pylint: disable=import-outside-toplevel
  from natvision.transforms import preprocess  # pylint: disable=import-outside-toplevel
  min_side = decode.decoded_size_needed([policy], size)
  arrays = []
  for path in photo_paths:
    with open(path, "rb") as f:
      image = decode.decode_image(f.read(), min_side=min_side)
    arrays.append(preprocess.prepare(image, policy, size))
  count = len(arrays) // batch_size
  if count < 1:
    raise ValueError(f"need at least {batch_size} photos, got {len(arrays)}")
  return [np.stack(arrays[i * batch_size:(i + 1) * batch_size])
          for i in range(count)]


def _onnx_model(resolved, onnx_path: Optional[str]):
  """The ONNX model: the file that ``--prepare_only`` made and checked.

  Opening the file directly keeps TensorFlow (which tf2onnx imports) out of
  the measured process; without a file, ``OnnxRuntime.load`` converts here.
  """
  from natvision.transforms import runtimes  # pylint: disable=import-outside-toplevel
  from natvision.transforms.runtimes import onnx_session  # pylint: disable=import-outside-toplevel
  if onnx_path and os.path.exists(onnx_path):
    return onnx_session.OnnxSession(resolved, onnx_path), onnx_path
  model = runtimes.OnnxRuntime(resolved)
  model.load()
  return model, model.path


def prepare_onnx(resolved) -> dict:
  """Converts the model to ONNX (cached) and checks it against TF."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from natvision.transforms.runtimes import chooser  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  decision = chooser.choose(
      dataclasses.replace(resolved, requested_runtime=RUNTIME_ONNX))
  return {"runtime": decision.runtime, "onnx_path": decision.onnx_path,
          "seconds": round(time.perf_counter() - start, 2),
          "info": decision.as_dict()}


def measure(resolved, runtime: str, batches: List[np.ndarray], warmup: int,
            min_batches: int, min_seconds: float,
            onnx_path: Optional[str] = None) -> dict:
  """Loads the model on ``runtime`` and times its forward pass."""
  start = time.perf_counter()
  detail = {}
  if runtime == RUNTIME_TF:
    from natvision.transforms.runtimes import tf as tf_runtime  # pylint: disable=import-outside-toplevel
    model = tf_runtime.load_model(resolved)
  elif runtime == RUNTIME_ONNX:
    model, path = _onnx_model(resolved, onnx_path)
    detail["onnx_path"] = path
    detail["providers"] = list(getattr(model, "providers", []))
  else:
    raise ValueError(f"unknown runtime {runtime!r}")
  load_s = time.perf_counter() - start
  for i in range(warmup):
    model.predict(batches[i % len(batches)])
  times = []
  begun = time.perf_counter()
  i = 0
  while len(times) < min_batches or time.perf_counter() - begun < min_seconds:
    t0 = time.perf_counter()
    out = model.predict(batches[i % len(batches)])
    times.append(time.perf_counter() - t0)
    i += 1
  total = time.perf_counter() - begun
  batch_size = len(batches[0])
  return dict(
      detail,
      model=resolved.name, runtime=runtime, batch_size=batch_size,
      batches=len(times), images=len(times) * batch_size,
      seconds=round(total, 3),
      images_per_s=round(len(times) * batch_size / total, 3),
      median_images_per_s=round(batch_size / statistics.median(times), 3),
      load_s=round(load_s, 2), output_width=int(out.shape[1]))


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m benchmarks.ceiling",
                              description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True)
  p.add_argument("--model_root", required=True)
  p.add_argument("--runtime", default=RUNTIME_TF,
                 choices=(RUNTIME_TF, RUNTIME_ONNX))
  p.add_argument("--photos", help="folder of JPEGs to prepare the batches from")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--distinct_batches", type=int, default=4)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--min_batches", type=int, default=8)
  p.add_argument("--min_seconds", type=float, default=20.0)
  p.add_argument("--onnx_path",
                 help="with --runtime onnx: the file --prepare_only wrote")
  p.add_argument("--prepare_only", action="store_true",
                 help="with --runtime onnx: convert and check, do not time")
  p.add_argument("--out", required=True, help="JSON file for the result")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  from natvision.transforms import models as models_lib  # pylint: disable=import-outside-toplevel
  (resolved,) = models_lib.resolve_models([args.model], args.model_root)
  if args.prepare_only:
    result = prepare_onnx(resolved)
  else:
    paths = sorted(glob.glob(os.path.join(args.photos, "*.jpg")))
    paths = paths[:args.batch_size * args.distinct_batches]
    batches = prepared_batches(paths, resolved.resize,
                               resolved.spec.input_size, args.batch_size)
    result = measure(resolved, args.runtime, batches, args.warmup,
                     args.min_batches, args.min_seconds, args.onnx_path)
    result["tensorflow_imported"] = "tensorflow" in sys.modules
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
