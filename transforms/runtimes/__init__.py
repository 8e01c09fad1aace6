"""Runtimes: the same model run by TensorFlow or by ONNX Runtime.

    base.py     the Runtime interface (load, predict, describe), the
                RuntimeDecision a model carries, the probe batch, the
                tolerances, and the runtimes this process has loaded
    tf.py       TFRuntime, the reference
    onnx.py     OnnxRuntime: which ONNX file a model opens (decided,
                staged, cached or converted) and its check against
                TensorFlow (recorded in the file, or live)
    onnx_session.py  an ONNX file opened by ONNX Runtime; what its
                metadata records (RecordedCheck, precision, fingerprint)
    onnx_store.py    where files lie: staged and cached paths, content
                keys, one maker per machine, atomic writes and copies
    onnx_convert.py  tf2onnx conversion, checked and timed when made
    child.py    a memory-heavy step in a spawned child process
    chooser.py  the launcher's choice of runtime per model (auto|tf|onnx ->
                a RuntimeDecision); workers never call it
    quantize.py --precision int8: the flags and the decision on the job's
                photos
    int8_file.py     static quantization with ONNX Runtime, cached by
                content
    agreement.py     int8-vs-fp32 figures and their minimums (pure numpy)
    sample.py   the job's photos the launcher reads for int8

A worker builds its model's runtime with ``for_model``, from the decision
the launcher attached, and calls ``load()`` once per process; a runtime
the launcher left loaded in the same process is taken over.
"""

from __future__ import annotations

from typing import Optional

from natvision.transforms import models as models_lib
from natvision.transforms.runtimes.base import (DECIDED, FP32, INT8, PRECISIONS,
                                      PROBE_SIZE, RUNTIME_AUTO,
                                      RUNTIME_ONNX, RUNTIME_TF, TOLERANCES,
                                      Runtime, RuntimeDecision, forget,
                                      output_difference, probe_batch)
from natvision.transforms.runtimes.onnx import OnnxRuntime
from natvision.transforms.runtimes.tf import TFRuntime

__all__ = [
    "DECIDED", "FP32", "INT8", "PRECISIONS", "PROBE_SIZE",
    "RUNTIME_AUTO", "RUNTIME_ONNX", "RUNTIME_TF", "TOLERANCES", "OnnxRuntime",
    "Runtime", "RuntimeDecision", "TFRuntime", "for_model", "forget",
    "output_difference", "probe_batch",
]


def for_model(resolved: models_lib.ResolvedModel,
              intra_op_threads: Optional[int] = None) -> Runtime:
  """The runtime a model's decision names, not loaded yet.

  Args:
    resolved: a model that went through the launcher's chooser.
    intra_op_threads: ONNX Runtime threads; all cores by default.

  Returns:
    A TFRuntime or an OnnxRuntime (which, when loaded, takes over the
    runtime the launcher left loaded in this process, or opens the file the
    launcher checked and checks it again).

  Raises:
    ValueError: the model carries no decision.
  """
  decision = resolved.require_decision()
  if decision.runtime == RUNTIME_ONNX:
    return OnnxRuntime(resolved, intra_op_threads=intra_op_threads)
  return TFRuntime(resolved)
