"""ONNX Runtime: the same model, converted with tf2onnx and checked against TF.

Why: on CPU workers, ONNX Runtime runs MobileNetV2 (the fungi classifier)
about 1.5x faster per core than TensorFlow, and the Inception models a few
percent faster (see benchmarks/RESULTS.md), so a job costs fewer
worker-hours.  TensorFlow stays the reference: ``OnnxRuntime.load`` compares
the ONNX outputs with TensorFlow's on the fixed probe batch and refuses
(``ModelError``) beyond the model kind's tolerance, on the launcher and
again on every worker.

How a model gets its ONNX file, first found wins:

1. staged: ``<model_dir>/natvision.onnx``, written next to the model once by
   ``natvision-stage-onnx`` (tools/stage_onnx.py), so that no worker
   converts anything;
2. cached: ``<cache>/<name>-<key>.onnx`` on the machine's disk, where the
   key hashes the model path and a fingerprint of its files.  The first
   process of a machine converts (with tf2onnx, under a file lock) and the
   others of that machine wait and reuse the file; inside a process a
   runtime is loaded once per model (``transforms.inference`` shares it
   through ``apache_beam.utils.shared``), never per bundle.

A staged file records the fingerprint of the model it was made from; a
staged file that does not match the model next to it is ignored with a
warning (the model was replaced after staging).

onnxruntime, tf2onnx and onnx are imported lazily: the TF runtime needs none
of them, and ``OnnxSession`` alone (which opens a file that exists) does not
import TensorFlow.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import tempfile
import threading
import time
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
from apache_beam.io.filesystems import FileSystems

from transforms import models as models_lib
from transforms.runtimes import base
from transforms.runtimes.tf import TFRuntime

STAGED_ONNX = "natvision.onnx"
ONNX_OPSET = 17
ONNX_INPUT = "images"
ONNX_OUTPUT = "output"

METADATA_FINGERPRINT = "natvision_fingerprint"
METADATA_MODEL = "natvision_model"
_CACHE_ENV = "NATVISION_ONNX_CACHE"


class OnnxSession:
  """One ONNX file opened by ONNX Runtime: uint8 or float batch in, numpy out.

  ``predict`` takes a ``[n, size, size, 3]`` uint8 batch (or a float batch
  already in [0, 1]) and returns a float32 ``[n, width]`` array.  uint8 is
  scaled to float32/255 straight into a buffer kept per thread and per
  shape, so a batch costs no extra float copy; one session serves all the
  threads of a process (``InferenceSession.run`` is thread-safe).

  Args:
    resolved: the model the file was made from.
    onnx_path: a local .onnx file.
    intra_op_threads: ONNX Runtime threads; all cores of the process by
      default.
    providers: execution providers; CUDA when available, else CPU.

  Raises:
    ModelError: the file cannot be loaded or does not take one ``images``
      input.
  """

  def __init__(self, resolved: models_lib.ResolvedModel, onnx_path: str,
               intra_op_threads: Optional[int] = None,
               providers: Optional[Sequence[str]] = None):
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel

    self.resolved = resolved
    self.path = onnx_path
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.intra_op_num_threads = intra_op_threads or _process_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if providers is None:
      available = ort.get_available_providers()
      providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                   if p in available]
    try:
      self._session = ort.InferenceSession(onnx_path, options,
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


class OnnxRuntime:
  """A model run by ONNX Runtime after a check against TF; ``base.Runtime``.

  ``load()`` finds the model's ONNX file (staged, cached, or converted
  here), opens it and runs the probe batch through it and through
  TensorFlow.  After ``load()``, and after a ``load()`` that failed the
  check, ``path``, ``source``, ``fingerprint`` and ``max_diff`` say what was
  found and measured (None where it did not get that far).

  Args:
    resolved: the model.
    reference: the TF runtime to compare with and convert from, loaded or
      not; by default one is made and loaded here, then dropped after the
      check.
    probe: uint8 batch for the check; ``base.probe_batch()`` by default.
    intra_op_threads: ONNX Runtime threads; all cores of the process by
      default.
  """

  name = base.RUNTIME_ONNX

  def __init__(self, resolved: models_lib.ResolvedModel,
               reference: Optional[TFRuntime] = None,
               probe: Optional[np.ndarray] = None,
               intra_op_threads: Optional[int] = None):
    self.resolved = resolved
    self._reference = reference
    self._probe = probe
    self._threads = intra_op_threads
    self._session: Optional[OnnxSession] = None
    self.tolerance = base.TOLERANCES[resolved.spec.kind]
    self.path: Optional[str] = None
    self.source: Optional[str] = None
    self.fingerprint: Optional[str] = None
    self.max_diff: Optional[float] = None

  def load(self) -> None:
    """Finds or makes the ONNX file, opens it and checks it against TF.

    Raises:
      ModelError: onnxruntime or tf2onnx is missing, the model cannot be
        loaded or converted, or its ONNX outputs differ from TensorFlow's
        by more than the tolerance (the message names the model, the
        difference and the tolerance).
    """
    if self._session is not None:
      return
    spec = self.resolved.spec
    try:
      import onnxruntime  # pylint: disable=import-outside-toplevel,unused-import
      import tf2onnx  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
      raise models_lib.ModelError(
          f"model {spec.name}: the onnx runtime needs the onnxruntime and "
          f"tf2onnx packages ({e}); pip install onnxruntime tf2onnx, or pass "
          f"--runtime tf") from e
    reference = self._reference or TFRuntime(self.resolved)
    reference.load()
    session, self.source, self.fingerprint = find_or_convert(
        self.resolved, reference, self._threads)
    self.path = session.path
    batch = self._probe if self._probe is not None else base.probe_batch(
        spec.input_size)
    expected = reference.predict(batch)
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
      raise models_lib.ModelError(
          f"model {spec.name}: ONNX Runtime's outputs differ from "
          f"TensorFlow's by {self.max_diff:.3g} on the probe batch, more than "
          f"the {spec.kind} tolerance {self.tolerance:.0e} (max|onnx - tf| / "
          f"max(1, max|tf|)); ONNX file {session.path} ({self.source})")
    self._session = session
    self._reference = None  # a worker keeps ONNX Runtime alone in memory

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
            "onnx_path": self.path, "onnx_source": self.source,
            "providers": self.providers, "max_diff": self.max_diff,
            "tolerance": self.tolerance}


# --------------------------------------------------------------------------
# Conversion.


def model_fingerprint(local_dir: str) -> str:
  """A hash of what defines a SavedModel: its graph and its weights.

  Reads ``saved_model.pb`` and ``variables/variables.index`` (which holds a
  checksum of every weight tensor) and the sizes of the variable shards; a
  few MB at most, so computing it is cheap next to loading the model.

  Args:
    local_dir: a local SavedModel folder.

  Returns:
    32 hex digits.
  """
  digest = hashlib.sha256()
  for rel in ("saved_model.pb", os.path.join("variables", "variables.index")):
    path = os.path.join(local_dir, rel)
    if os.path.exists(path):
      with open(path, "rb") as f:
        digest.update(rel.encode() + b"\0")
        for chunk in iter(lambda: f.read(1 << 20), b""):
          digest.update(chunk)
  variables = os.path.join(local_dir, "variables")
  if os.path.isdir(variables):
    for name in sorted(os.listdir(variables)):
      size = os.path.getsize(os.path.join(variables, name))
      digest.update(f"{name}:{size}\0".encode())
  return digest.hexdigest()[:32]


def _tf2onnx_version() -> str:
  import tf2onnx  # pylint: disable=import-outside-toplevel
  return tf2onnx.__version__


def convert_to_onnx(resolved: models_lib.ResolvedModel, target_path: str,
                    reference: Optional[TFRuntime] = None,
                    opset: int = ONNX_OPSET) -> str:
  """Converts a model to ONNX with tf2onnx and writes it at ``target_path``.

  The converted function is the one the TF runtime calls
  (``TFRuntime.float_function``): the ``default`` signature of a TF1 Hub
  module (empty tag set), or ``obj(images, training=False)`` of a TF2
  SavedModel (which needs no ``serving_default`` signature).  The ONNX graph
  takes float32 ``images`` ``[batch, size, size, 3]`` in [0, 1] with a
  dynamic batch and returns ``output`` ``[batch, width]``; its metadata
  records the model's fingerprint.  The file is written to a temporary name
  and renamed into place, so a reader never sees half a file (a remote
  target is written in one object upload).

  Args:
    resolved: the model.
    target_path: where the .onnx goes; a local path or a bucket path.
    reference: the model already loaded on TF, to avoid loading its weights
      a second time.
    opset: ONNX opset; 17 runs on onnxruntime 1.14 and later.

  Returns:
    target_path.

  Raises:
    ModelError: the model cannot be loaded or converted.
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
      "natvision_source": resolved.path,
      "tf2onnx_version": tf2onnx.__version__,
      "tensorflow_version": tf.__version__,
  }
  for key, value in metadata.items():
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value
  data = proto.SerializeToString()
  write_atomically(target_path, data)
  logging.info("converted %s to ONNX (opset %d, %.1f MB) in %.1f s: %s",
               spec.name, opset, len(data) / 1e6,
               time.perf_counter() - start, target_path)
  return target_path


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
# Finding the file: staged, cached, or converted here.


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
  """The cache file of a model: keyed by its path, files and the converter."""
  key = hashlib.sha256("\0".join(
      (resolved.path, fingerprint, _tf2onnx_version(), str(ONNX_OPSET))
  ).encode()).hexdigest()[:16]
  return os.path.join(cache_dir(), f"{resolved.name}-{key}.onnx")


def staged_onnx_path(resolved: models_lib.ResolvedModel) -> str:
  """Where ``natvision-stage-onnx`` puts a model's file: next to the model."""
  return FileSystems.join(resolved.path.rstrip("/"), STAGED_ONNX)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
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


def find_or_convert(resolved: models_lib.ResolvedModel, reference: TFRuntime,
                    intra_op_threads: Optional[int] = None
                    ) -> Tuple[OnnxSession, str, str]:
  """Finds (staged or cached) or makes the model's ONNX file and opens it.

  Args:
    resolved: the model.
    reference: the model on TF, converted when no file is found.
    intra_op_threads: ONNX Runtime threads.

  Returns:
    The open session; where its file came from (``staged``, ``cached`` or
    ``converted``); the fingerprint of the model files.

  Raises:
    ModelError: the conversion failed or the file cannot be opened.
  """
  local = models_lib.stage_locally(resolved.path)
  fingerprint = model_fingerprint(local)
  staged = os.path.join(local, STAGED_ONNX)
  if os.path.exists(staged):
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
    with _file_lock(os.path.join(os.path.dirname(path), ".convert.lock")):
      if not os.path.exists(path):
        convert_to_onnx(resolved, path, reference)
        source = "converted"
  return OnnxSession(resolved, path, intra_op_threads), source, fingerprint
