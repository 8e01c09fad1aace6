"""The launcher's choice of runtime, made once per model before the job runs.

``choose`` turns the runtime a model asks for (``--runtime``: ``auto``,
``tf`` or ``onnx``, kept in ``ResolvedModel.requested_runtime``) into a
``RuntimeDecision`` (``tf`` or ``onnx``, and why):

* ``tf``: TensorFlow; the model is loaded once to check it.
* ``onnx``: ONNX Runtime, or ``ModelError`` when the conversion or the
  check against TensorFlow fails.
* ``auto``: ONNX Runtime when it passes the check and is faster than
  TensorFlow on the probe batch (best of ``timing_runs`` runs each);
  otherwise TensorFlow, with the reason in the decision and the log.

The check of a file that recorded it when it was made
(transforms/runtimes/onnx.py) needs no TensorFlow: ONNX Runtime's outputs
on the probe batch are compared with TensorFlow's recorded ones.  Its
recorded probe timings decide ``auto`` either way, without importing
TensorFlow to time it again; both runtimes are timed here only when the
file records no timings, or when ``--retime_runtimes`` asks
(``ResolvedModel.retime_runtimes``: the file was made while the machine
was busy, or on another machine).  So the launcher loads the model on
TensorFlow only when TensorFlow is what it decides on, when asked to time
again, or for a file without a recorded check, which is checked and timed
against TensorFlow here as before.

Each decision prints one line on the console (the ``natvision`` logger,
which the quiet console shows): the runtime chosen and why, with the
figures and where the timings come from.

The runtime decided on stays loaded (``base.remember``): when the pipeline
runs in this process (the DirectRunner), its worker takes it over instead
of loading and checking the model again.

Only the launcher (``pipelines.launch.check_models``) calls this: timings
differ from one machine to the next, so workers that each timed the
runtimes could write rows of both into one table.  A worker runs the
runtime its model's decision names (``transforms.runtimes.for_model``).
The clock is a parameter so that tests can fix which runtime is faster.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

import numpy as np

from natvision.transforms import models as models_lib
from natvision.transforms.runtimes import base
from natvision.transforms.runtimes import onnx as onnx_lib
from natvision.transforms.runtimes.onnx import OnnxRuntime
from natvision.transforms.runtimes.tf import TFRuntime

DEFAULT_TIMING_RUNS = base.DEFAULT_TIMING_RUNS

Clock = base.Clock


def choose(resolved: models_lib.ResolvedModel,
           timing_runs: int = DEFAULT_TIMING_RUNS,
           clock: Clock = time.perf_counter,
           probe: Optional[np.ndarray] = None,
           intra_op_threads: Optional[int] = None) -> base.RuntimeDecision:
  """Decides the runtime of one model, as its ``requested_runtime`` asks.

  Args:
    resolved: the model; its ``decision``, if any, is not consulted.
    timing_runs: for ``auto``, timed runs of the probe batch per runtime
      (also what a conversion made here records); 0 keeps ONNX whenever it
      passes the check.
    clock: the clock the timings made here read.
    probe: uint8 batch for the check and the timings;
      ``base.probe_batch()`` by default (another batch is checked against
      TensorFlow loaded here, never against recorded outputs).
    intra_op_threads: ONNX Runtime threads; all cores by default.

  Returns:
    The decision, with the measured difference, the timings and a note.
    The decided runtime stays loaded in this process for its workers.

  Raises:
    ModelError: the model cannot be loaded on TensorFlow (when TensorFlow is
      decided on or needed for the check); for ``onnx``, ONNX Runtime or
      tf2onnx is missing, the conversion fails, or the check fails.
  """
  requested = resolved.requested_runtime
  resolved = dataclasses.replace(resolved, decision=None)
  tf_runtime = TFRuntime(resolved)
  if requested == base.RUNTIME_TF:
    tf_runtime.load()
    tf_runtime.remember()
    _say(resolved, base.RUNTIME_TF, "as asked")
    return base.RuntimeDecision(base.RUNTIME_TF,
                                note="TensorFlow, as --runtime tf asked")

  onnx_runtime = OnnxRuntime(resolved, reference=tf_runtime, probe=probe,
                             intra_op_threads=intra_op_threads,
                             timing_runs=timing_runs)
  try:
    onnx_runtime.load()
  except models_lib.ModelError as e:
    if requested == base.RUNTIME_ONNX:
      raise
    return _fall_back(resolved, tf_runtime, onnx_runtime, str(e))

  tf_seconds = onnx_seconds = timed = None
  if requested == base.RUNTIME_AUTO and timing_runs > 0:
    recorded = onnx_runtime.recorded
    if (not resolved.retime_runtimes and not tf_runtime.is_loaded
        and recorded is not None and recorded.tf_seconds
        and recorded.onnx_seconds):
      tf_seconds, onnx_seconds = recorded.tf_seconds, recorded.onnx_seconds
      timed = "recorded"
    if timed is None:
      # No recorded timings, --retime_runtimes, or TensorFlow loaded for
      # the check already: both are timed on this machine.
      tf_runtime.load()
      batch = probe if probe is not None else base.probe_batch(
          resolved.spec.input_size)
      tf_seconds, onnx_seconds = base.best_times(
          [tf_runtime.predict, onnx_runtime.predict], batch, timing_runs,
          clock)
      timed = "here"
    if onnx_seconds >= tf_seconds:
      return _fall_back(
          resolved, tf_runtime, onnx_runtime,
          f"TF ran the probe batch in {tf_seconds:.3f} s, ONNX Runtime in "
          f"{onnx_seconds:.3f} s{_timed_where(timed)}", tf_seconds,
          onnx_seconds, timed, level=logging.INFO)
  timing = ""
  if tf_seconds and onnx_seconds:
    timing = (f"; probe batch {onnx_seconds:.3f} s vs TensorFlow "
              f"{tf_seconds:.3f} s{_timed_where(timed)}")
  from_file = (onnx_runtime.checked_against
               == onnx_lib.CHECKED_AGAINST_RECORDED)
  against = ("TensorFlow's outputs recorded in the file" if from_file
             else "TensorFlow")
  logging.info(
      "model %s runs on ONNX Runtime (%s, %s file %s); max difference from "
      "%s on the probe batch %.2g (tolerance %.0e)%s", resolved.name,
      ",".join(onnx_runtime.providers), onnx_runtime.source,
      onnx_runtime.path, against, onnx_runtime.max_diff,
      onnx_runtime.tolerance, timing)
  onnx_runtime.remember()
  _say(resolved, base.RUNTIME_ONNX,
       f"ONNX Runtime matched {against} within {onnx_runtime.max_diff:.2g} "
       f"(tolerance {onnx_runtime.tolerance:.0e}){timing}")
  return base.RuntimeDecision(
      base.RUNTIME_ONNX,
      note=(f"ONNX Runtime; max difference from TensorFlow on the probe "
            f"batch {onnx_runtime.max_diff:.2g} (tolerance "
            f"{onnx_runtime.tolerance:.0e}){timing}"),
      max_diff=onnx_runtime.max_diff, **_onnx_fields(onnx_runtime),
      tf_seconds=tf_seconds, onnx_seconds=onnx_seconds, timed=timed)


def _timed_where(timed: Optional[str]) -> str:
  if timed == "recorded":
    return (" (timed when the ONNX file was made; --retime_runtimes times "
            "them again here)")
  if timed == "here":
    return " (timed here)"
  return ""


def _say(resolved: models_lib.ResolvedModel, runtime: str,
         why: str) -> None:
  """The one console line of a decision: which runtime, and why."""
  logging.getLogger("natvision").info(
      "model %s runs on %s (--runtime %s): %s", resolved.name,
      "ONNX Runtime" if runtime == base.RUNTIME_ONNX else "TensorFlow",
      resolved.requested_runtime, why)


def decided(resolved: models_lib.ResolvedModel,
            **kwargs) -> models_lib.ResolvedModel:
  """The model with its decision attached; ``kwargs`` go to ``choose``."""
  return resolved.with_decision(choose(resolved, **kwargs))


def _onnx_fields(onnx_runtime: OnnxRuntime) -> dict:
  return {"tolerance": onnx_runtime.tolerance,
          "onnx_max_diff": onnx_runtime.max_diff,
          "onnx_path": onnx_runtime.path,
          "onnx_source": onnx_runtime.source,
          "fingerprint": onnx_runtime.fingerprint,
          "checked_against": onnx_runtime.checked_against}


def _fall_back(resolved: models_lib.ResolvedModel, tf_runtime: TFRuntime,
               onnx_runtime: OnnxRuntime, reason: str,
               tf_seconds: Optional[float] = None,
               onnx_seconds: Optional[float] = None,
               timed: Optional[str] = None,
               level: int = logging.WARNING) -> base.RuntimeDecision:
  """TensorFlow instead of ONNX: loads (checks) and keeps the TF model.

  Raises:
    ModelError: the model cannot be loaded on TensorFlow either.
  """
  tf_runtime.load()
  tf_runtime.remember()
  if level >= logging.WARNING:
    logging.log(level, "model %s runs on TensorFlow, not ONNX Runtime: %s",
                resolved.name, reason)
  else:
    _say(resolved, base.RUNTIME_TF, f"faster than ONNX Runtime: {reason}")
  return base.RuntimeDecision(
      base.RUNTIME_TF, note=f"TensorFlow; ONNX Runtime not used: {reason}",
      max_diff=0.0, **_onnx_fields(onnx_runtime), tf_seconds=tf_seconds,
      onnx_seconds=onnx_seconds, fallback=reason, timed=timed)
