"""natvision-stage-onnx: convert models to ONNX once, next to the models.

    natvision-stage-onnx --model_root DIR --models a,b [--overwrite]
        [--model_handle NAME=PATH ...]

converts each model with tf2onnx, checks the result against TensorFlow on
the probe batch (the same tolerance as the jobs use), and writes
``<model_dir>/natvision.onnx`` (a local folder or a bucket).  Jobs with
``--runtime auto|onnx`` then find that file on every worker instead of
converting the model there (transforms/runtimes/onnx.py), which for the
full-size Inception models saves 20 to 50 s and several GB of memory per
machine.  The file records the fingerprint of the model it was made from;
a file that no longer matches the model next to it is ignored.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Optional, Sequence, Tuple

from apache_beam.io.filesystems import FileSystems

from natvision.transforms import helptext
from natvision.transforms import models as models_lib
from natvision.transforms.runtimes import base
from natvision.transforms.runtimes import onnx_convert
from natvision.transforms.runtimes import onnx_session
from natvision.transforms.runtimes import onnx_store
from natvision.transforms.runtimes.tf import TFRuntime


def stage_onnx(resolved: models_lib.ResolvedModel,
               overwrite: bool = False) -> Tuple[str, float]:
  """Converts a model, checks it against TF and writes ``natvision.onnx``.

  Args:
    resolved: the model.
    overwrite: replace a file staged earlier.

  Returns:
    The staged path and the checked difference from TF on the probe batch.

  Raises:
    ModelError: conversion or check failed; the file exists and overwrite
      is false.
  """
  target = onnx_store.staged_onnx_path(resolved)
  if FileSystems.exists(target) and not overwrite:
    raise models_lib.ModelError(
        f"{target} exists; pass --overwrite to replace it")
  reference = TFRuntime(resolved)
  reference.load()
  with tempfile.TemporaryDirectory(prefix="natvision-stage-") as tmp:
    local = os.path.join(tmp, onnx_store.STAGED_ONNX)
    onnx_convert.convert_to_onnx(resolved, local, reference)
    session = onnx_session.OnnxSession(resolved, local)
    probe = base.probe_batch(resolved.spec.input_size)
    diff = base.output_difference(session.predict(probe),
                                  reference.predict(probe))
    tolerance = base.TOLERANCES[resolved.spec.kind]
    if not diff <= tolerance:
      raise models_lib.ModelError(
          f"model {resolved.name}: the converted model differs from TF by "
          f"{diff:.3g} on the probe batch, more than the tolerance "
          f"{tolerance:.0e}; nothing staged")
    del session
    onnx_store.copy_file(local, target, replace=True)
  return target, diff


def _parser() -> argparse.ArgumentParser:
  parser = helptext.ArgumentParser(
      prog="natvision-stage-onnx",
      formatter_class=helptext.HelpFormatter,
      description=(
          "Convert models to ONNX once, check them against TensorFlow and "
          "write <model_dir>/natvision.onnx next to each, so that workers "
          "with --runtime auto|onnx load it instead of converting. Run it "
          "once where the models live (a bucket shared by Dataflow "
          "workers, say) after copying them there."),
      epilog=helptext.epilog([
          "natvision-stage-onnx --model_root gs://b/models "
          "--models inaturalist_v2,fungi_mobile_v1"]))
  parser.add_argument("--model_root",
                      help="folder (local or gs://) holding <name>/ copies")
  parser.add_argument("--models", required=True,
                      help="comma-separated registry names, e.g. "
                      + ",".join(models_lib.REGISTRY))
  parser.add_argument("--model_handle", action="append", default=[],
                      metavar="NAME=PATH",
                      help="explicit model folder; repeatable")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace natvision.onnx files staged earlier")
  helptext.mark_required(parser, "--model_root",
                         unless="--model_handle names every model")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Stages each model; returns 0, or 2 after printing what failed."""
  args = _parser().parse_args(argv)
  names = [n.strip() for n in args.models.split(",") if n.strip()]
  try:
    handles = dict(h.split("=", 1) for h in args.model_handle)
  except ValueError:
    print("error: --model_handle takes NAME=PATH", file=sys.stderr)
    return 2
  try:
    resolved = models_lib.resolve_models(names, args.model_root, handles)
    for model in resolved:
      start = time.perf_counter()
      target, diff = stage_onnx(model, overwrite=args.overwrite)
      print(f"staged {model.name}: {target} (max difference from TF on the "
            f"probe {diff:.2g}, {time.perf_counter() - start:.0f} s)")
  except models_lib.ModelError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
