"""The launcher's choice of runtime, made once per model before the job runs.

``choose`` turns the runtime a model asks for (``--runtime``: ``auto``,
``tf`` or ``onnx``, kept in ``ResolvedModel.requested_runtime``) into a
``RuntimeDecision`` (``tf`` or ``onnx``, and why):

* ``tf``: TensorFlow; the model is loaded once to check it.
* ``onnx``: ONNX Runtime, or ``ModelError`` when the conversion or the
  check against TensorFlow fails.
* ``auto``: ONNX Runtime when it passes the check and, timed on the probe
  batch (best of ``timing_runs`` runs each), is faster than TensorFlow;
  otherwise TensorFlow, with the reason in the decision and the log.

Only the launcher (``pipelines.common.check_models``) calls this: timings
differ from one machine to the next, so workers that each timed the
runtimes could write rows of both into one table.  A worker runs the
runtime its model's decision names (``transforms.runtimes.for_model``).
The clock is a parameter so that tests can fix which runtime is faster.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import numpy as np

from transforms import models as models_lib
from transforms.runtimes import base
from transforms.runtimes.onnx import OnnxRuntime
from transforms.runtimes.tf import TFRuntime

DEFAULT_TIMING_RUNS = 2

Clock = Callable[[], float]


def best_time(predict: Callable[[np.ndarray], np.ndarray], batch: np.ndarray,
              runs: int, clock: Clock = time.perf_counter) -> float:
  """The shortest of ``runs`` timed calls of ``predict(batch)``, in seconds.

  Args:
    predict: a runtime's predict.
    batch: uint8 ``[n, size, size, 3]``.
    runs: timed calls, at least 1.
    clock: seconds, monotonic; ``time.perf_counter`` by default.
  """
  best = float("inf")
  for _ in range(runs):
    start = clock()
    predict(batch)
    best = min(best, clock() - start)
  return best


def choose(resolved: models_lib.ResolvedModel,
           timing_runs: int = DEFAULT_TIMING_RUNS,
           clock: Clock = time.perf_counter,
           probe: Optional[np.ndarray] = None,
           intra_op_threads: Optional[int] = None) -> base.RuntimeDecision:
  """Decides the runtime of one model, as its ``requested_runtime`` asks.

  Args:
    resolved: the model; its ``decision``, if any, is not consulted.
    timing_runs: for ``auto``, timed runs of the probe batch per runtime
      (after the untimed check run); 0 keeps ONNX whenever it passes the
      check.
    clock: the clock the timings read.
    probe: uint8 batch for the check and the timings;
      ``base.probe_batch()`` by default.
    intra_op_threads: ONNX Runtime threads; all cores by default.

  Returns:
    The decision, with the measured difference, the timings and a note.

  Raises:
    ModelError: the model cannot be loaded on TensorFlow; for ``onnx``,
      ONNX Runtime or tf2onnx is missing, the conversion fails, or the check
      fails.
  """
  requested = resolved.requested_runtime
  tf_runtime = TFRuntime(resolved)
  tf_runtime.load()
  if requested == base.RUNTIME_TF:
    return base.RuntimeDecision(base.RUNTIME_TF,
                                note="TensorFlow, as --runtime tf asked")

  onnx_runtime = OnnxRuntime(resolved, reference=tf_runtime, probe=probe,
                             intra_op_threads=intra_op_threads)
  try:
    onnx_runtime.load()
  except models_lib.ModelError as e:
    if requested == base.RUNTIME_ONNX:
      raise
    return _fall_back(resolved, onnx_runtime, str(e))

  tf_seconds = onnx_seconds = None
  if requested == base.RUNTIME_AUTO and timing_runs > 0:
    batch = probe if probe is not None else base.probe_batch(
        resolved.spec.input_size)
    tf_seconds = best_time(tf_runtime.predict, batch, timing_runs, clock)
    onnx_seconds = best_time(onnx_runtime.predict, batch, timing_runs, clock)
    if onnx_seconds >= tf_seconds:
      return _fall_back(
          resolved, onnx_runtime,
          f"TF ran the probe batch in {tf_seconds:.3f} s, ONNX Runtime in "
          f"{onnx_seconds:.3f} s", tf_seconds, onnx_seconds,
          level=logging.INFO)
  timing = ""
  if tf_seconds and onnx_seconds:
    timing = (f"; probe batch {onnx_seconds:.3f} s vs TensorFlow "
              f"{tf_seconds:.3f} s")
  logging.info(
      "model %s runs on ONNX Runtime (%s, %s file %s); max difference from "
      "TF on the probe batch %.2g (tolerance %.0e)%s", resolved.name,
      ",".join(onnx_runtime.providers), onnx_runtime.source,
      onnx_runtime.path, onnx_runtime.max_diff, onnx_runtime.tolerance, timing)
  return base.RuntimeDecision(
      base.RUNTIME_ONNX,
      note=(f"ONNX Runtime; max difference from TensorFlow on the probe "
            f"batch {onnx_runtime.max_diff:.2g} (tolerance "
            f"{onnx_runtime.tolerance:.0e}){timing}"),
      max_diff=onnx_runtime.max_diff, **_onnx_fields(onnx_runtime),
      tf_seconds=tf_seconds, onnx_seconds=onnx_seconds)


def decided(resolved: models_lib.ResolvedModel,
            **kwargs) -> models_lib.ResolvedModel:
  """The model with its decision attached; ``kwargs`` go to ``choose``."""
  return resolved.with_decision(choose(resolved, **kwargs))


def _onnx_fields(onnx_runtime: OnnxRuntime) -> dict:
  return {"tolerance": onnx_runtime.tolerance,
          "onnx_max_diff": onnx_runtime.max_diff,
          "onnx_path": onnx_runtime.path,
          "onnx_source": onnx_runtime.source,
          "fingerprint": onnx_runtime.fingerprint}


def _fall_back(resolved: models_lib.ResolvedModel, onnx_runtime: OnnxRuntime,
               reason: str, tf_seconds: Optional[float] = None,
               onnx_seconds: Optional[float] = None,
               level: int = logging.WARNING) -> base.RuntimeDecision:
  logging.log(level, "model %s runs on TensorFlow, not ONNX Runtime: %s",
              resolved.name, reason)
  return base.RuntimeDecision(
      base.RUNTIME_TF, note=f"TensorFlow; ONNX Runtime not used: {reason}",
      max_diff=0.0, **_onnx_fields(onnx_runtime), tf_seconds=tf_seconds,
      onnx_seconds=onnx_seconds, fallback=reason)
