"""ONNX Runtime: the same model, converted with tf2onnx and checked against TF.

Why: on CPU workers, ONNX Runtime runs MobileNetV2 (the fungi classifier)
about 1.5x faster per core than TensorFlow, and the Inception models a few
percent faster (see benchmarks/RESULTS.md), so a job costs fewer
worker-hours.  TensorFlow stays the reference: ``OnnxRuntime.load`` compares
the ONNX outputs with TensorFlow's on the fixed probe batch and refuses
(``ModelError``) beyond the model kind's tolerance.

How a model gets its ONNX file, first found wins:

1. staged: ``<model_dir>/natvision.onnx``, written next to the model once by
   ``natvision-stage-onnx`` (tools/stage_onnx.py), so that no worker
   converts anything;
2. cached: ``<cache>/<name>-<key>.onnx`` on the machine's disk, where the
   key hashes what the file is made from, never where the model lies: the
   fingerprint of its files, the converter's version, the opset and the
   cache format.  A moved or copied model folder finds the file made for
   the original, so it is not converted again.  The first
   process of a machine converts (under a file lock) and the others of
   that machine wait and reuse the file.

A conversion runs in a child process (``convert_in_child``, multiprocessing
``spawn``): it imports TensorFlow and tf2onnx, loads the model, converts it,
checks the result on the probe batch, times both runtimes on it and writes
the file; its peak memory (several GB for the Inceptions) leaves with it,
and the job's process stays as small as ONNX Runtime needs.

What a file records (its ONNX metadata): the fingerprint of the model files
it was made from, and the check made when it was made: TensorFlow's
outputs on the probe batch, the difference found and the probe timings of
both runtimes (``RecordedCheck``).  Loading a file whose fingerprint
matches runs the probe batch through ONNX Runtime and compares it with the
recorded TensorFlow outputs: no TensorFlow is imported, so a worker that
runs ONNX only never loads it, and the launcher of ``--runtime auto``
decides from the recorded timings.  A file without a recorded check (staged
by an older natvision) is checked against TensorFlow loaded for the
purpose, as before.  A staged file that does not match the model next to
it is ignored with a warning (the model was replaced after staging).

Inside a process a model is loaded and checked once: the launcher
remembers the runtime it decided on (``base.remember``) and a worker of
the same process (the DirectRunner) takes it over; a worker elsewhere
opens the very file the launcher checked (``RuntimeDecision.onnx_path``,
matched by fingerprint), or the staged or cached copy of it on its
machine.

onnxruntime, tf2onnx and onnx are imported lazily: the TF runtime needs none
of them, and nothing here imports TensorFlow unless a conversion or a check
against TensorFlow runs in this process.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import dataclasses
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import multiprocessing
import os
import tempfile
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import models as models_lib
from natvision.transforms.runtimes import base
from natvision.transforms.runtimes.tf import TFRuntime

STAGED_ONNX = "natvision.onnx"
ONNX_OPSET = 17
ONNX_INPUT = "images"
ONNX_OUTPUT = "output"

METADATA_FINGERPRINT = "natvision_fingerprint"
METADATA_MODEL = "natvision_model"
METADATA_PRECISION = "natvision_precision"
METADATA_CHECK = "natvision_check"
_CACHE_ENV = "NATVISION_ONNX_CACHE"
# Part of every cache key: files made before the check was recorded in them
# are not reused (they are converted again, once).
CACHE_FORMAT = "2"

CHECKED_AGAINST_TF = "tf"
CHECKED_AGAINST_RECORDED = "recorded"


class OnnxSession:
  """One ONNX file opened by ONNX Runtime: uint8 or float batch in, numpy out.

  ``predict`` takes a ``[n, size, size, 3]`` uint8 batch (or a float batch
  already in [0, 1]) and returns a float32 ``[n, width]`` array.  uint8 is
  scaled to float32/255 straight into a buffer kept per thread and per
  shape, so a batch costs no extra float copy; one session serves all the
  threads of a process (``InferenceSession.run`` is thread-safe).

  Args:
    resolved: the model the file was made from.
    onnx_path: a local .onnx file (with ``model_bytes``: only a name for
      messages).
    intra_op_threads: ONNX Runtime threads; all cores of the process by
      default.
    providers: execution providers; CUDA when available, else CPU.
    model_bytes: a serialized model to open instead of the file.

  Raises:
    ModelError: the file cannot be loaded or does not take one ``images``
      input.
  """

  def __init__(self, resolved: models_lib.ResolvedModel, onnx_path: str,
               intra_op_threads: Optional[int] = None,
               providers: Optional[Sequence[str]] = None,
               model_bytes: Optional[bytes] = None):
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel

    self.resolved = resolved
    self.path = onnx_path
    self.threads = intra_op_threads or _process_cores()
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.intra_op_num_threads = self.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if providers is None:
      available = ort.get_available_providers()
      providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                   if p in available]
    try:
      self._session = ort.InferenceSession(
          onnx_path if model_bytes is None else model_bytes, options,
          providers=list(providers))
    except Exception as e:  # noqa: BLE001 - ORT raises its own kinds
      raise models_lib.ModelError(
          f"model {resolved.name}: ONNX file {onnx_path} cannot be loaded: "
          f"{e}") from e
    self.providers = self._session.get_providers()
    inputs = self._session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != ONNX_INPUT:
      raise models_lib.ModelError(
          f"model {resolved.name}: ONNX file {onnx_path} takes "
          f"{[i.name for i in inputs]}, expected one input {ONNX_INPUT!r}")
    self.metadata = dict(self._session.get_modelmeta().custom_metadata_map)
    self._buffers = threading.local()

  def _scaled(self, batch: np.ndarray) -> np.ndarray:
    if batch.dtype != np.uint8:
      return np.ascontiguousarray(batch, dtype=np.float32)
    buffers = getattr(self._buffers, "by_shape", None)
    if buffers is None:
      buffers = self._buffers.by_shape = {}
    buffer = buffers.get(batch.shape)
    if buffer is None:
      if len(buffers) >= 4:  # a few shapes (full and last batches) at most
        buffers.clear()
      buffer = buffers[batch.shape] = np.empty(batch.shape, np.float32)
    np.multiply(batch, np.float32(1.0 / 255.0), out=buffer, dtype=np.float32)
    return buffer

  def predict(self, batch: np.ndarray) -> np.ndarray:
    batch = np.asarray(batch)
    (out,) = self._session.run(None, {ONNX_INPUT: self._scaled(batch)})
    return np.asarray(out, dtype=np.float32)


def _process_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class RecordedCheck:
  """The check made when an ONNX file was made, kept in the file's metadata.

  Attributes:
    reference: TensorFlow's float32 outputs ``[n, width]`` on
      ``base.probe_batch(size, n)``.
    max_diff: ``base.output_difference`` of ONNX Runtime's outputs from
      ``reference`` then.
    tolerance: the model kind's tolerance then.
    tf_seconds, onnx_seconds: best time of one probe batch per runtime,
      on the machine that made the file; None when not timed.
    onnxruntime_version: the ONNX Runtime that ran the check.
  """

  reference: np.ndarray
  max_diff: float
  tolerance: float
  tf_seconds: Optional[float] = None
  onnx_seconds: Optional[float] = None
  onnxruntime_version: str = ""

  def to_metadata(self) -> Dict[str, str]:
    """The check as ``{METADATA_CHECK: json}``; the reference in base64."""
    reference = np.ascontiguousarray(self.reference, dtype="<f4")
    record = {
        "reference_shape": list(reference.shape),
        "reference_f32le_b64": base64.b64encode(reference.tobytes()).decode(),
        "max_diff": self.max_diff, "tolerance": self.tolerance,
        "tf_seconds": self.tf_seconds, "onnx_seconds": self.onnx_seconds,
        "onnxruntime_version": self.onnxruntime_version,
    }
    return {METADATA_CHECK: json.dumps(record, sort_keys=True)}

  @classmethod
  def from_metadata(cls, metadata: Dict[str, str]
                    ) -> Optional["RecordedCheck"]:
    """The check a file's metadata records; None when it records none."""
    text = metadata.get(METADATA_CHECK)
    if not text:
      return None
    try:
      record = json.loads(text)
      shape = tuple(int(v) for v in record["reference_shape"])
      reference = np.frombuffer(
          base64.b64decode(record["reference_f32le_b64"]),
          dtype="<f4").reshape(shape).astype(np.float32)
      return cls(reference=reference, max_diff=float(record["max_diff"]),
                 tolerance=float(record["tolerance"]),
                 tf_seconds=record.get("tf_seconds"),
                 onnx_seconds=record.get("onnx_seconds"),
                 onnxruntime_version=record.get("onnxruntime_version", ""))
    except (KeyError, TypeError, ValueError) as e:
      logging.warning("ignoring an unreadable recorded check (%s)", e)
      return None


class OnnxRuntime:
  """A model run by ONNX Runtime after a check against TF; ``base.Runtime``.

  ``load()`` finds the model's ONNX file (the one its decision names,
  staged, cached, or converted in a child process), opens it and runs the
  probe batch through it, comparing the outputs with TensorFlow's: those
  recorded in the file when it was made, or, for a file that records none,
  TensorFlow's own, loaded here.  After ``load()``, and after a ``load()``
  that failed the check, ``path``, ``source``, ``fingerprint``,
  ``max_diff`` and ``checked_against`` say what was found and measured
  (None where it did not get that far); ``recorded`` is the file's
  recorded check, if any.

  A model whose decision says ``int8`` opens the quantized file the
  launcher checked (transforms/runtimes/quantize.py), refusing any other.
  A runtime this process loaded and remembered already (``base.recall``) is
  taken over, not loaded again.

  Args:
    resolved: the model, with or without a decision (the launcher's chooser
      loads undecided models; workers decided ones).
    reference: the TF runtime to compare with, loaded or not, used only for
      a file without a recorded check; by default one is made and loaded
      then, and dropped after the check.
    probe: uint8 batch for the check; ``base.probe_batch()`` by default
      (another batch is always checked against TensorFlow itself).
    intra_op_threads: ONNX Runtime threads; all cores of the process by
      default.
    timing_runs: timed probe runs per runtime recorded by a conversion made
      here; 0 records no timings.
  """

  name = base.RUNTIME_ONNX

  def __init__(self, resolved: models_lib.ResolvedModel,
               reference: Optional[TFRuntime] = None,
               probe: Optional[np.ndarray] = None,
               intra_op_threads: Optional[int] = None,
               timing_runs: int = base.DEFAULT_TIMING_RUNS):
    self.resolved = resolved
    self._reference = reference
    self._probe = probe
    self._threads = intra_op_threads or _process_cores()
    self._timing_runs = timing_runs
    self._session: Optional[OnnxSession] = None
    decision = resolved.decision
    self.precision = decision.precision if decision else base.FP32
    self.tolerance = base.TOLERANCES[resolved.spec.kind]
    self.path: Optional[str] = None
    self.source: Optional[str] = None
    self.fingerprint: Optional[str] = None
    self.max_diff: Optional[float] = None
    self.checked_against: Optional[str] = None
    self.recorded: Optional[RecordedCheck] = None

  @classmethod
  def opened(cls, resolved: models_lib.ResolvedModel, session: OnnxSession,
             source: str, fingerprint: str, max_diff: float,
             precision: str, checked_against: Optional[str]
             ) -> "OnnxRuntime":
    """A runtime around a session opened and checked elsewhere (int8)."""
    runtime = cls(resolved, intra_op_threads=session.threads)
    runtime._session = session  # pylint: disable=protected-access
    runtime.path, runtime.source = session.path, source
    runtime.fingerprint, runtime.max_diff = fingerprint, max_diff
    runtime.precision, runtime.checked_against = precision, checked_against
    return runtime

  @property
  def key(self) -> tuple:
    """What identifies this file on ONNX Runtime in ``base.remember``."""
    return file_key(self.resolved.name, self.path, self.fingerprint,
                    self.precision, self._threads)

  def remember(self) -> None:
    """Keeps the loaded runtime for the workers of this process."""
    base.remember(self.key, self)

  def _take_over(self, held: "OnnxRuntime") -> None:
    for name in ("path", "source", "fingerprint", "max_diff",
                 "checked_against", "recorded", "precision"):
      setattr(self, name, getattr(held, name))
    self._session = held.session

  def load(self) -> None:
    """Finds or makes the ONNX file, opens it and checks it.

    Raises:
      ModelError: onnxruntime is missing, the file cannot be found, made or
        opened, or its outputs differ from TensorFlow's by more than the
        tolerance (the message names the model, the difference and the
        tolerance); for int8, the launcher's file is not here or is not
        the one it checked.
    """
    if self._session is not None:
      return
    decision = self.resolved.decision
    if decision is not None and decision.onnx_path and decision.fingerprint:
      held = base.recall(file_key(self.resolved.name, decision.onnx_path,
                                  decision.fingerprint, decision.precision,
                                  self._threads))
      if held is not None:
        self._take_over(held)
        return
    spec = self.resolved.spec
    if importlib.util.find_spec("onnxruntime") is None:
      raise models_lib.ModelError(
          f"model {spec.name}: the onnx runtime needs the onnxruntime "
          f"package; pip install onnxruntime tf2onnx, or pass --runtime tf")
    if self.precision == base.INT8:
      self._load_int8(decision)
      return
    session, self.source, self.fingerprint = find_or_convert(
        self.resolved, self._threads, self._timing_runs,
        fingerprint=decision.fingerprint if decision else None,
        decided_path=decision.onnx_path if decision else None,
        decided_source=decision.onnx_source if decision else None)
    self.path = session.path
    self._check(session)
    self._session = session
    self._reference = None  # a worker keeps ONNX Runtime alone in memory
    if decision is not None:
      self.remember()

  def _check(self, session: OnnxSession) -> None:
    spec = self.resolved.spec
    batch = self._probe
    recorded = None
    if batch is None:
      batch = base.probe_batch(spec.input_size)
      if session.metadata.get(METADATA_FINGERPRINT) == self.fingerprint:
        recorded = RecordedCheck.from_metadata(session.metadata)
      if recorded is not None and recorded.reference.shape != (
          len(batch), spec.output_width):
        recorded = None
    self.recorded = recorded
    if recorded is not None:
      expected = recorded.reference
      self.checked_against = CHECKED_AGAINST_RECORDED
    else:
      if self._reference is None:
        self._reference = TFRuntime(self.resolved)
      self._reference.load()
      expected = self._reference.predict(batch)
      self.checked_against = CHECKED_AGAINST_TF
    try:
      got = session.predict(batch)
    except Exception as e:  # noqa: BLE001 - ORT raises its own kinds
      raise models_lib.ModelError(
          f"model {spec.name}: ONNX Runtime failed on the probe batch "
          f"({session.path}): {e}") from e
    self.max_diff = base.output_difference(got, expected)
    if got.shape != expected.shape:
      raise models_lib.ModelError(
          f"model {spec.name}: ONNX output shape {list(got.shape)} differs "
          f"from TF's {list(expected.shape)} on the probe batch "
          f"({session.path})")
    if not self.max_diff <= self.tolerance:
      where = ("TensorFlow's outputs recorded in the file"
               if recorded is not None else "TensorFlow's")
      raise models_lib.ModelError(
          f"model {spec.name}: ONNX Runtime's outputs differ from "
          f"TensorFlow's by {self.max_diff:.3g} on the probe batch, more than "
          f"the {spec.kind} tolerance {self.tolerance:.0e} (max|onnx - tf| / "
          f"max(1, max|tf|), against {where}); ONNX file {session.path} "
          f"({self.source})")

  def _load_int8(self, decision) -> None:
    """Opens the quantized file the launcher checked, and only that one."""
    spec = self.resolved.spec
    path = decision.onnx_path
    if path and "://" in path:  # published by the launcher for this worker
      local = os.path.join(cache_dir(), os.path.basename(path))
      if not os.path.exists(local) and FileSystems.exists(path):
        with FileSystems.open(path) as f:
          write_atomically(local, f.read())
      path = local
    if not path or not os.path.exists(path):
      raise models_lib.ModelError(
          f"model {spec.name}: the int8 file the launcher checked "
          f"({decision.onnx_path}) cannot be found from this machine; with "
          f"--precision int8 the output must be on a bucket (the file is "
          f"published under it) or on the launcher's machine")
    session = OnnxSession(self.resolved, path, self._threads)
    found = (session.metadata.get(METADATA_PRECISION),
             session.metadata.get(METADATA_FINGERPRINT))
    if found != (base.INT8, decision.fingerprint):
      raise models_lib.ModelError(
          f"model {spec.name}: {path} is not the int8 file the launcher "
          f"checked (precision, fingerprint {found}, expected int8, "
          f"{decision.fingerprint})")
    self._session = session
    self.path, self.source = decision.onnx_path, decision.onnx_source
    self.fingerprint, self.max_diff = decision.fingerprint, decision.max_diff
    self.checked_against = decision.checked_against
    self.remember()

  @property
  def session(self) -> OnnxSession:
    if self._session is None:
      raise RuntimeError(
          f"model {self.resolved.name}: OnnxRuntime.predict before load()")
    return self._session

  @property
  def providers(self) -> list:
    """ONNX Runtime's execution providers in use; empty before load()."""
    return list(self._session.providers) if self._session else []

  def predict(self, batch: np.ndarray) -> np.ndarray:
    """uint8 or [0, 1] float ``[n, s, s, 3]`` -> float32 ``[n, width]``."""
    return self.session.predict(batch)

  def describe(self) -> dict:
    return {"runtime": self.name, "model": self.resolved.name,
            "precision": self.precision, "onnx_path": self.path,
            "onnx_source": self.source, "providers": self.providers,
            "max_diff": self.max_diff, "tolerance": self.tolerance,
            "checked_against": self.checked_against}


def file_key(name: str, path: Optional[str], fingerprint: Optional[str],
             precision: str, threads: int) -> tuple:
  """The ``base.remember`` key of one model's ONNX file opened with
  ``threads``."""
  real = os.path.realpath(path) if path and "://" not in path else path
  return (base.RUNTIME_ONNX, name, real, fingerprint, precision, threads)


# --------------------------------------------------------------------------
# Conversion.


model_fingerprint = base.model_fingerprint


def installed_version(dist: str) -> str:
  """An installed distribution's version, without importing it."""
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "none"


def convert_to_onnx(resolved: models_lib.ResolvedModel, target_path: str,
                    reference: Optional[TFRuntime] = None,
                    opset: int = ONNX_OPSET,
                    timing_runs: int = base.DEFAULT_TIMING_RUNS,
                    clock: base.Clock = time.perf_counter) -> str:
  """Converts a model to ONNX, checks and times it, and writes the file.

  The converted function is the one the TF runtime calls
  (``TFRuntime.float_function``): the ``default`` signature of a TF1 Hub
  module (empty tag set), or ``obj(images, training=False)`` of a TF2
  SavedModel (which needs no ``serving_default`` signature).  The ONNX graph
  takes float32 ``images`` ``[batch, size, size, 3]`` in [0, 1] with a
  dynamic batch and returns ``output`` ``[batch, width]``.  Before it is
  written, the converted model runs the probe batch on ONNX Runtime; its
  metadata records the model's fingerprint and that check
  (``RecordedCheck``: TensorFlow's outputs, the difference, the probe
  timings of both runtimes), whatever the difference: a file that failed
  its check fails it again wherever it is loaded.  The file is written to
  a temporary name and renamed into place, so a reader never sees half a
  file (a remote target is written in one object upload).

  This runs in the calling process, which then holds TensorFlow, the model
  and the converter's copies of it; ``convert_in_child`` runs it in a child
  process instead.

  Args:
    resolved: the model.
    target_path: where the .onnx goes; a local path or a bucket path.
    reference: the model already loaded on TF, to avoid loading its weights
      a second time.
    opset: ONNX opset; 17 runs on onnxruntime 1.14 and later.
    timing_runs: timed probe runs per runtime to record; 0 records none.
    clock: the clock of the timings.

  Returns:
    target_path.

  Raises:
    ModelError: the model cannot be loaded or converted, or ONNX Runtime
      cannot run the result.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tf2onnx  # pylint: disable=import-outside-toplevel

  spec = resolved.spec
  if reference is None:
    reference = TFRuntime(resolved)
  reference.load()
  call = reference.float_function()
  size = spec.input_size
  signature = (tf.TensorSpec([None, size, size, 3], tf.float32,
                             name=ONNX_INPUT),)

  @tf.function(autograph=False)  # plain calls: nothing for AutoGraph to do
  def function(images):
    return {ONNX_OUTPUT: call(images)}

  start = time.perf_counter()
  try:
    try:
      with _tf2onnx_catch_errors(False):
        proto, _ = tf2onnx.convert.from_function(
            function, input_signature=signature, opset=opset)
    except Exception as e:  # noqa: BLE001 - tf2onnx raises many kinds
      logging.warning(
          "model %s: fast ONNX conversion failed (%s: %s); retrying with "
          "tf2onnx skipping the optimizers that fail", spec.name,
          type(e).__name__, e)
      with _tf2onnx_catch_errors(True):
        proto, _ = tf2onnx.convert.from_function(
            function, input_signature=signature, opset=opset)
  except Exception as e:  # noqa: BLE001
    raise models_lib.ModelError(
        f"model {spec.name} at {resolved.path}: conversion to ONNX failed: "
        f"{type(e).__name__}: {e}") from e
  finally:
    _release_memory()
  metadata = {
      METADATA_MODEL: spec.name,
      METADATA_FINGERPRINT: model_fingerprint(
          models_lib.stage_locally(resolved.path)),
      METADATA_PRECISION: base.FP32,
      "natvision_source": resolved.path,
      "tf2onnx_version": tf2onnx.__version__,
      "tensorflow_version": tf.__version__,
  }
  check = _check_converted(resolved, proto.SerializeToString(), reference,
                           timing_runs, clock)
  metadata.update(check.to_metadata())
  for key, value in metadata.items():
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value
  data = proto.SerializeToString()
  del proto
  write_atomically(target_path, data)
  logging.info("converted %s to ONNX (opset %d, %.1f MB) in %.1f s, max "
               "difference from TF on the probe batch %.2g: %s", spec.name,
               opset, len(data) / 1e6, time.perf_counter() - start,
               check.max_diff, target_path)
  return target_path


def _check_converted(resolved: models_lib.ResolvedModel, model_bytes: bytes,
                     reference: TFRuntime, timing_runs: int,
                     clock: base.Clock) -> RecordedCheck:
  """Runs the probe batch through a converted model and TF, and times both.

  Raises:
    ModelError: ONNX Runtime cannot open or run the converted model.
  """
  spec = resolved.spec
  session = OnnxSession(resolved, f"(converted {spec.name})",
                        model_bytes=model_bytes)
  probe = base.probe_batch(spec.input_size)
  expected = reference.predict(probe)
  try:
    got = session.predict(probe)
  except Exception as e:  # noqa: BLE001 - ORT raises its own kinds
    raise models_lib.ModelError(
        f"model {spec.name}: ONNX Runtime failed on the probe batch of the "
        f"converted model: {e}") from e
  tf_seconds = onnx_seconds = None
  if timing_runs > 0:
    tf_seconds, onnx_seconds = base.best_times(
        [reference.predict, session.predict], probe,
        max(timing_runs, base.RECORDED_TIMING_RUNS), clock)
  return RecordedCheck(
      reference=expected, max_diff=base.output_difference(got, expected),
      tolerance=base.TOLERANCES[spec.kind], tf_seconds=tf_seconds,
      onnx_seconds=onnx_seconds,
      onnxruntime_version=installed_version("onnxruntime"))


def _convert_job(resolved: models_lib.ResolvedModel, target_path: str,
                 timing_runs: int) -> dict:
  """What the conversion child process runs; returns its own figures."""
  import resource  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.WARNING)
  start = time.perf_counter()
  convert_to_onnx(resolved, target_path, timing_runs=timing_runs)
  return {"seconds": time.perf_counter() - start,
          "peak_rss_mb": resource.getrusage(
              resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def convert_in_child(resolved: models_lib.ResolvedModel, target_path: str,
                     timing_runs: int = base.DEFAULT_TIMING_RUNS) -> str:
  """``convert_to_onnx`` in a child process, so its memory leaves with it.

  The child is started with ``spawn`` (a fresh interpreter: nothing of this
  process's threads or TensorFlow state is copied).  A daemonic process,
  which may not start children, converts in-process instead.

  Args:
    resolved: the model.
    target_path: where the .onnx goes.
    timing_runs: timed probe runs per runtime to record.

  Returns:
    target_path.

  Raises:
    ModelError: the conversion failed, or the child died (killed for
      memory, for instance).
  """
  base.announce(
      f"converting model {resolved.name} to ONNX, once per machine (cached "
      f"in {os.path.dirname(target_path)})",
      conversion_seconds(models_lib.stage_locally(resolved.path)))
  if multiprocessing.current_process().daemon:
    return convert_to_onnx(resolved, target_path, timing_runs=timing_runs)
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    future = pool.submit(_convert_job, resolved, target_path, timing_runs)
    try:
      figures = future.result()
    except concurrent.futures.process.BrokenProcessPool as e:
      raise models_lib.ModelError(
          f"model {resolved.name}: the process converting it to ONNX died "
          f"({e}); it may have run out of memory: stage the file with "
          f"natvision-stage-onnx on a larger machine, or pass --runtime tf"
      ) from e
  logging.info("model %s converted to ONNX in a child process in %.1f s "
               "(its peak memory %.0f MiB): %s", resolved.name,
               figures["seconds"], figures["peak_rss_mb"], target_path)
  return target_path


def _convert_many_job(pairs, timing_runs: int) -> dict:
  """The child converting several models: each one's seconds."""
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("tensorflow").setLevel(logging.ERROR)
  seconds = {}
  for resolved, target in pairs:
    if os.path.exists(target):  # another process made it meanwhile
      continue
    start = time.perf_counter()
    try:
      convert_to_onnx(resolved, target, timing_runs=timing_runs)
    except models_lib.ModelError:
      continue  # converted alone later by find_or_convert, which says why
    finally:
      _release_memory()
    seconds[resolved.name] = time.perf_counter() - start
  return seconds


def convert_missing(models: Sequence[models_lib.ResolvedModel],
                    timing_runs: int = base.DEFAULT_TIMING_RUNS) -> List[str]:
  """Converts, in one child process, every model that has no ONNX file.

  The launcher calls this before it decides the runtimes, so that a run
  whose models all need converting starts TensorFlow and tf2onnx once
  rather than once per model.  Models asking for ``--runtime tf``, with a
  staged file, or with a cached one are left alone (``find_or_convert``
  opens theirs); so is everything when tf2onnx is missing (the chooser
  then says so, per model).  One console line says what is converted and
  about how long it takes.

  Returns:
    The names of the models converted.

  Raises:
    ModelError: the child failed or died.
  """
  if importlib.util.find_spec("tf2onnx") is None:
    return []
  pairs, seconds = [], 0.0
  for resolved in models:
    if resolved.requested_runtime == base.RUNTIME_TF:
      continue
    staged, fingerprint = _local_staged(resolved, None)
    path = cached_onnx_path(resolved, fingerprint)
    if staged is None and not os.path.exists(path):
      pairs.append((resolved, path))
      seconds += conversion_seconds(models_lib.stage_locally(resolved.path))
  if not pairs:
    return []
  names = [r.name for r, _ in pairs]
  folder = os.path.dirname(pairs[0][1])
  base.announce(
      f"converting {len(pairs)} model(s) to ONNX in one child process, once "
      f"per machine (cached in {folder}): {', '.join(names)}",
      seconds - CONVERSION_START_SECONDS * (len(pairs) - 1))
  with file_lock(os.path.join(folder, ".convert.lock")):
    pairs = [(r, p) for r, p in pairs if not os.path.exists(p)]
    if not pairs:
      return []
    if multiprocessing.current_process().daemon:
      done = _convert_many_job(pairs, timing_runs)
    else:
      context = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(
          1, mp_context=context) as pool:
        try:
          done = pool.submit(_convert_many_job, pairs, timing_runs).result()
        except concurrent.futures.process.BrokenProcessPool as e:
          raise models_lib.ModelError(
              f"models {', '.join(names)}: the process converting them to "
              f"ONNX died ({e}); it may have run out of memory: stage the "
              f"files with natvision-stage-onnx on a larger machine, or pass "
              f"--runtime tf") from e
  logging.info("converted %s to ONNX in one child process: %s",
               ", ".join(done), ", ".join(f"{s:.1f} s" for s in done.values()))
  return list(done)


# What a conversion in a child costs on a 2-core machine: the child's start
# (TensorFlow and tf2onnx imported), then about 0.2 s per MB of weights
# (tiny stand-ins: 8 s in all; Inception-ResNet-V2, 220 MB: about 50 s).
CONVERSION_START_SECONDS = 8.0
CONVERSION_SECONDS_PER_MB = 0.2


def conversion_seconds(local_dir: str) -> float:
  """About how long converting the model in ``local_dir`` takes, in s."""
  return (CONVERSION_START_SECONDS
          + CONVERSION_SECONDS_PER_MB * base.folder_megabytes(local_dir))


def _release_memory() -> None:
  """Frees what a conversion left behind and returns it to the system.

  The converter's graphs hold copies of the weights in reference cycles, and
  glibc keeps freed memory in its arenas; without this, a worker that
  converted Inception-ResNet-V2 stays 0.8 GB larger.
  """
  gc.collect()
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


@contextlib.contextmanager
def _tf2onnx_catch_errors(catch: bool) -> Iterator[None]:
  """Sets whether tf2onnx's optimizers may fail without failing the whole.

  By default tf2onnx deep-copies the whole graph, weights included, before
  each of its dozen optimizer passes, so that a failing pass can be undone:
  for Inception-V4 that took 30 s and 14 GB.  Without the copies the
  conversion takes half the time and half the memory; the default (catching)
  mode is kept as the retry when a pass fails.  tf2onnx reads
  ``$TF2ONNX_CATCH_ERRORS`` at each conversion, and (tf2onnx 1.17) any value
  of it turns catching off, so catching is turned on by removing it.
  """
  key = "TF2ONNX_CATCH_ERRORS"
  saved = os.environ.get(key)
  if catch:
    os.environ.pop(key, None)
  else:
    os.environ[key] = "FALSE"
  try:
    yield
  finally:
    if saved is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = saved


def write_atomically(path: str, data: bytes) -> None:
  """Writes ``data`` at ``path`` so that no reader sees half of it.

  A local file is written under a temporary name and renamed into place; a
  bucket object appears whole when its upload closes.
  """
  if "://" in path:
    with FileSystems.create(path) as f:
      f.write(data)
    return
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                             suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; other users' workers read it
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


# --------------------------------------------------------------------------
# Finding the file: the decided one, staged, cached, or converted here.


def cache_dir() -> str:
  """Where converted models are kept on this machine.

  ``$NATVISION_ONNX_CACHE``, else ``onnx/`` under ``$NATVISION_MODEL_CACHE``
  (where remote models are copied), else ``natvision-onnx`` in the temp dir.
  """
  explicit = os.environ.get(_CACHE_ENV)
  if explicit:
    return explicit
  models_cache = os.environ.get("NATVISION_MODEL_CACHE")
  if models_cache:
    return os.path.join(models_cache, "onnx")
  return os.path.join(tempfile.gettempdir(), "natvision-onnx")


def cached_onnx_path(resolved: models_lib.ResolvedModel,
                     fingerprint: str) -> str:
  """The cache file of a model, keyed by content only.

  The key is the fingerprint of the model files, tf2onnx's version, the
  opset and ``CACHE_FORMAT``; the model's path is left out on purpose, so
  that a model folder moved or copied (``cp -r``) reuses the file converted
  for the original (a conversion takes 20-50 s and several GB for a
  full-size model).
  """
  key = hashlib.sha256("\0".join(
      (fingerprint, installed_version("tf2onnx"), str(ONNX_OPSET),
       CACHE_FORMAT)).encode()).hexdigest()[:16]
  return os.path.join(cache_dir(), f"{resolved.name}-{key}.onnx")


def staged_onnx_path(resolved: models_lib.ResolvedModel) -> str:
  """Where ``natvision-stage-onnx`` puts a model's file: next to the model."""
  return FileSystems.join(resolved.path.rstrip("/"), STAGED_ONNX)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
  """An exclusive lock between the processes of one machine (flock)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a+b") as f:
    try:
      import fcntl  # pylint: disable=import-outside-toplevel
    except ImportError:  # Windows: no lock; the rename keeps files whole
      yield
      return
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _local_staged(resolved: models_lib.ResolvedModel,
                  fingerprint: Optional[str]) -> Tuple[Optional[str], str]:
  """The staged file as a local path (None if none), and the fingerprint.

  Without a fingerprint (the launcher) the model is staged locally and
  fingerprinted.  With one (a worker, from its decision) only the staged
  file is looked at: a remote one is copied alone into the cache, the model
  is not downloaded.
  """
  if fingerprint is None:
    local = models_lib.stage_locally(resolved.path)
    fingerprint = model_fingerprint(local)
    staged = os.path.join(local, STAGED_ONNX)
    return (staged if os.path.exists(staged) else None), fingerprint
  staged = staged_onnx_path(resolved)
  if "://" not in staged:
    return (staged if os.path.exists(staged) else None), fingerprint
  if not FileSystems.exists(staged):
    return None, fingerprint
  local = os.path.join(cache_dir(),
                       f"{resolved.name}-staged-{fingerprint[:16]}.onnx")
  if not os.path.exists(local):
    with FileSystems.open(staged) as f:
      write_atomically(local, f.read())
  return local, fingerprint


def find_or_convert(resolved: models_lib.ResolvedModel,
                    intra_op_threads: Optional[int] = None,
                    timing_runs: int = base.DEFAULT_TIMING_RUNS,
                    fingerprint: Optional[str] = None,
                    decided_path: Optional[str] = None,
                    decided_source: Optional[str] = None
                    ) -> Tuple[OnnxSession, str, str]:
  """Finds the model's ONNX file, or makes it, and opens it.

  Looks for, in order: the file a decision names (when it is on this
  machine and records ``fingerprint``), the staged file, the cached file;
  else converts the model in a child process (one conversion per machine
  at a time, under a file lock).

  Args:
    resolved: the model.
    intra_op_threads: ONNX Runtime threads.
    timing_runs: timed probe runs per runtime a conversion records.
    fingerprint: the fingerprint of the model files, when known (from the
      launcher's decision); computed from the model files otherwise.
    decided_path, decided_source: the file the launcher checked and where
      it came from.

  Returns:
    The open session; where its file came from (``staged``, ``cached`` or
    ``converted``, or the decision's source for the decided file); the
    fingerprint of the model files.

  Raises:
    ModelError: the conversion failed or the file cannot be opened.
  """
  if (decided_path and fingerprint and "://" not in decided_path
      and os.path.exists(decided_path)):
    session = OnnxSession(resolved, decided_path, intra_op_threads)
    if session.metadata.get(METADATA_FINGERPRINT) == fingerprint:
      return session, decided_source or "cached", fingerprint
    del session
  staged, fingerprint = _local_staged(resolved, fingerprint)
  if staged is not None:
    session = OnnxSession(resolved, staged, intra_op_threads)
    if session.metadata.get(METADATA_FINGERPRINT) == fingerprint:
      return session, "staged", fingerprint
    logging.warning(
        "model %s: ignoring %s, which was made from other model files than "
        "the ones next to it (fingerprint %s, model %s); restage it with "
        "natvision-stage-onnx", resolved.name, staged_onnx_path(resolved),
        session.metadata.get(METADATA_FINGERPRINT), fingerprint)
    del session
  path = cached_onnx_path(resolved, fingerprint)
  source = "cached"
  if not os.path.exists(path):
    # One conversion at a time per machine: a conversion briefly takes
    # several times the model's memory, and the processes that wait for the
    # same model then find its file.
    with file_lock(os.path.join(os.path.dirname(path), ".convert.lock")):
      if not os.path.exists(path):
        if importlib.util.find_spec("tf2onnx") is None:
          raise models_lib.ModelError(
              f"model {resolved.name}: no ONNX file staged or cached, and "
              f"converting one needs the tf2onnx package; pip install "
              f"tf2onnx, stage the file with natvision-stage-onnx, or pass "
              f"--runtime tf")
        convert_in_child(resolved, path, timing_runs)
        source = "converted"
  return OnnxSession(resolved, path, intra_op_threads), source, fingerprint
