"""Runtimes: the same model run by TensorFlow or by ONNX Runtime.

Why: on CPU workers, ONNX Runtime runs MobileNetV2 (the fungi classifier)
about 1.5x faster per core than TensorFlow, and the Inception models a few
percent faster (see benchmarks/RESULTS.md), so a job costs fewer
worker-hours.  TensorFlow stays the reference: a model runs on ONNX Runtime
only after its ONNX outputs were compared with TensorFlow's on a fixed probe
batch and found within the model kind's tolerance.

How a model gets its ONNX file, first found wins:

1. staged: ``<model_dir>/natvision.onnx``, written next to the model once by
   ``python -m transforms.runtimes --model_root DIR --models a,b``, so that no
   worker converts anything;
2. cached: ``<cache>/<name>-<key>.onnx`` on the worker's disk, where the key
   hashes the model path and a fingerprint of its files.  The first process
   of a machine converts (with tf2onnx, under a file lock) and the others of
   that machine wait and reuse the file; inside a process, ``load_runtime``
   is called once per model (``transforms.inference`` shares the model
   through ``apache_beam.utils.shared``), never per bundle.

A staged file records the fingerprint of the model it was made from; a
staged file that does not match the model next to it is ignored with a
warning (the model was replaced after staging).

``load_runtime(resolved, "auto")`` picks ONNX Runtime when it is installed,
the conversion works and the check passes (and, if asked to time them, when
it is faster than TensorFlow on the probe batch); otherwise it falls back to
TensorFlow and logs why.
``runtime="onnx"`` refuses (``ModelError``) instead of falling back.

onnxruntime, tf2onnx and onnx are imported lazily: the TF runtime needs none
of them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import logging
import os
import sys
import tempfile
import threading
import time
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
from apache_beam.io.filesystems import FileSystems

from transforms import models as models_lib

RUNTIME_AUTO = "auto"
RUNTIME_TF = "tf"
RUNTIME_ONNX = "onnx"
RUNTIMES = (RUNTIME_AUTO, RUNTIME_TF, RUNTIME_ONNX)

STAGED_ONNX = "natvision.onnx"
ONNX_OPSET = 17
ONNX_INPUT = "images"
ONNX_OUTPUT = "output"

# Largest difference accepted between ONNX Runtime's and TensorFlow's outputs
# on the probe batch, as ``max|onnx - tf| / max(1, max|tf|)``: an absolute
# difference for outputs up to 1 (probabilities), relative to the largest
# output for larger embeddings.  Both runtimes compute in float32; they differ
# only in the order of the sums inside convolutions and in fused ops.  On the
# full-size stand-ins (probe batch and 7 real photos) the observed values were
# at most 1.3e-6 for the 4128-way softmax and 2.8e-6 for the embeddings
# (Inception-ResNet-V2's features reach 18, its absolute difference 1.7e-5),
# see benchmarks/RESULTS.md; these tolerances leave a margin of about 35x
# while still catching a real mistake (other weights, another
# preprocessing), which shows up at 1e-2 or more.
TOLERANCES: Dict[str, float] = {
    models_lib.EMBEDDER: 1e-4,
    models_lib.CLASSIFIER: 5e-5,
}

PROBE_SIZE = 4

_CACHE_ENV = "NATVISION_ONNX_CACHE"
_METADATA_FINGERPRINT = "natvision_fingerprint"
_METADATA_MODEL = "natvision_model"

# Number of conversions run by this process, per model name; tests and logs
# use it to show that a model is converted once, not once per load.
CONVERSIONS: Dict[str, int] = {}


@dataclasses.dataclass
class RuntimeInfo:
  """What ``load_runtime`` chose and why; small and JSON-friendly.

  Attributes:
    runtime: ``tf`` or ``onnx``, the runtime whose outputs go to the tables.
    requested: the runtime asked for (``auto``, ``tf`` or ``onnx``).
    max_diff: ``max|out - tf|`` of the chosen runtime on the probe batch,
      scaled as in TOLERANCES; 0.0 for ``tf`` (the reference itself).
    onnx_max_diff: the ONNX difference measured, also when ONNX was not
      chosen; None when ONNX never ran.
    tolerance: the tolerance of the model's kind.
    tf_seconds, onnx_seconds: best time of one probe batch per runtime;
      None when not timed.
    onnx_path: the ONNX file used or checked; None when none.
    onnx_source: ``staged``, ``cached`` or ``converted``.
    fallback: why ``auto`` did not pick ONNX; None when it did.
  """

  runtime: str
  requested: str
  max_diff: float = 0.0
  onnx_max_diff: Optional[float] = None
  tolerance: Optional[float] = None
  tf_seconds: Optional[float] = None
  onnx_seconds: Optional[float] = None
  onnx_path: Optional[str] = None
  onnx_source: Optional[str] = None
  fallback: Optional[str] = None

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


# --------------------------------------------------------------------------
# The probe batch and the comparison.


def probe_batch(size: int = 299, n: int = PROBE_SIZE) -> np.ndarray:
  """A fixed uint8 batch ``[n, size, size, 3]`` for comparing runtimes.

  Image ``i`` cycles through: seeded uniform noise (every pixel value, high
  frequencies); smooth colour ramps; smooth random colour patches (bilinear
  upsampling of a seeded 6x6 image, like out-of-focus backgrounds); and
  sinusoidal stripes.  The same arguments always give the same bytes.
  """
  rng = np.random.default_rng(20240601)
  ramp = np.linspace(0.0, 1.0, size, dtype=np.float64)
  yy, xx = np.meshgrid(ramp, ramp, indexing="ij")
  images = []
  for i in range(n):
    kind = i % 4
    if kind == 0:
      image = rng.integers(0, 256, (size, size, 3)).astype(np.float64)
    elif kind == 1:
      image = 255.0 * np.stack([xx, yy, (xx + yy) / 2], axis=-1)
    elif kind == 2:
      coarse = rng.integers(0, 256, (6, 6, 3)).astype(np.float64)
      pos = ramp * 5
      lo = np.minimum(pos.astype(int), 4)
      frac = (pos - lo)[:, None]
      rows = (coarse[lo] * (1 - frac[..., None]) +
              coarse[lo + 1] * frac[..., None])
      image = (rows[:, lo] * (1 - frac[None, :, :]) +
               rows[:, lo + 1] * frac[None, :, :])
    else:
      image = 127.5 + 127.5 * np.stack([
          np.sin(2 * np.pi * (3 * xx + 2 * yy)),
          np.sin(2 * np.pi * 7 * yy),
          np.cos(2 * np.pi * 11 * xx * yy)], axis=-1)
    images.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
  return np.stack(images)


def output_difference(out: np.ndarray, reference: np.ndarray) -> float:
  """``max|out - reference| / max(1, max|reference|)``, as in TOLERANCES."""
  out = np.asarray(out, np.float64)
  reference = np.asarray(reference, np.float64)
  if out.shape != reference.shape:
    return float("inf")
  if not np.isfinite(out).all():
    return float("inf")
  scale = max(1.0, float(np.abs(reference).max(initial=0.0)))
  return float(np.abs(out - reference).max(initial=0.0)) / scale


def _best_time(predict, batch: np.ndarray, runs: int) -> float:
  best = float("inf")
  for _ in range(runs):
    start = time.perf_counter()
    predict(batch)
    best = min(best, time.perf_counter() - start)
  return best


# --------------------------------------------------------------------------
# ONNX Runtime.


class OnnxModel:
  """A model run by ONNX Runtime, with the interface of models.LoadedModel.

  ``predict`` takes a ``[n, size, size, 3]`` uint8 batch (or a float batch
  already in [0, 1]) and returns a float32 ``[n, width]`` array.  uint8 is
  scaled to float32/255 straight into a buffer kept per thread and per
  shape, so a batch costs no extra float copy; one session serves all the
  threads of a process (``InferenceSession.run`` is thread-safe).
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


# --------------------------------------------------------------------------
# Conversion.


def model_fingerprint(local_dir: str) -> str:
  """A hash of what defines a SavedModel: its graph and its weights.

  Reads ``saved_model.pb`` and ``variables/variables.index`` (which holds a
  checksum of every weight tensor) and the sizes of the variable shards; a
  few MB at most, so computing it is cheap next to loading the model.
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
                    tf_model: Optional[models_lib.LoadedModel] = None,
                    opset: int = ONNX_OPSET) -> str:
  """Converts a model to ONNX with tf2onnx and writes it at ``target_path``.

  The converted function is the one the TF runtime calls: the ``default``
  signature of a TF1 Hub module (empty tag set), or ``obj(images,
  training=False)`` of a TF2 SavedModel (which needs no ``serving_default``
  signature).  The ONNX graph takes float32 ``images`` ``[batch, size, size,
  3]`` in [0, 1] with a dynamic batch and returns ``output`` ``[batch,
  width]``; its metadata records the model's fingerprint.  The file is
  written to a temporary name and renamed into place, so a reader never sees
  half a file (a remote target is written in one object upload).

  Args:
    resolved: the model.
    target_path: where the .onnx goes; a local path or a bucket path.
    tf_model: the model already loaded by models.load_model, to avoid
      loading its weights a second time.
    opset: ONNX opset; 17 runs on onnxruntime 1.14 and later.

  Returns:
    target_path.

  Raises:
    ModelError: the model cannot be loaded or converted.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tf2onnx  # pylint: disable=import-outside-toplevel

  spec = resolved.spec
  if tf_model is None:
    tf_model = models_lib.load_model(resolved)
  # LoadedModel keeps the model's float call in ``_fn``; converting that very
  # function guarantees that both runtimes run the same graph.
  call = tf_model._fn  # pylint: disable=protected-access
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
  CONVERSIONS[spec.name] = CONVERSIONS.get(spec.name, 0) + 1
  metadata = {
      _METADATA_MODEL: spec.name,
      _METADATA_FINGERPRINT: model_fingerprint(
          models_lib.stage_locally(resolved.path)),
      "natvision_source": resolved.path,
      "tf2onnx_version": tf2onnx.__version__,
      "tensorflow_version": tf.__version__,
  }
  for key, value in metadata.items():
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value
  data = proto.SerializeToString()
  _write_atomically(target_path, data)
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


def _write_atomically(path: str, data: bytes) -> None:
  if "://" in path:
    with FileSystems.create(path) as f:  # an object appears whole on close
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


def _open_onnx(resolved: models_lib.ResolvedModel,
               tf_model: models_lib.LoadedModel,
               intra_op_threads: Optional[int]) -> Tuple[OnnxModel, str]:
  """Finds (staged or cached) or makes the ONNX file and opens it.

  Returns:
    The model and where its file came from: staged, cached or converted.
  """
  local = models_lib.stage_locally(resolved.path)
  fingerprint = model_fingerprint(local)
  staged = os.path.join(local, STAGED_ONNX)
  if os.path.exists(staged):
    model = OnnxModel(resolved, staged, intra_op_threads)
    if model.metadata.get(_METADATA_FINGERPRINT) == fingerprint:
      return model, "staged"
    logging.warning(
        "model %s: ignoring %s, which was made from other model files than "
        "the ones next to it (fingerprint %s, model %s); restage it with "
        "python -m transforms.runtimes", resolved.name,
        _join(resolved.path, STAGED_ONNX),
        model.metadata.get(_METADATA_FINGERPRINT), fingerprint)
    del model
  path = cached_onnx_path(resolved, fingerprint)
  source = "cached"
  if not os.path.exists(path):
    # One conversion at a time per machine: a conversion briefly takes
    # several times the model's memory, and the processes that wait for the
    # same model then find its file.
    with _file_lock(os.path.join(os.path.dirname(path), ".convert.lock")):
      if not os.path.exists(path):
        convert_to_onnx(resolved, path, tf_model)
        source = "converted"
  return OnnxModel(resolved, path, intra_op_threads), source


def _join(root: str, name: str) -> str:
  return FileSystems.join(root.rstrip("/"), name)


# --------------------------------------------------------------------------
# Choosing a runtime.


def load_runtime(resolved: models_lib.ResolvedModel,
                 runtime: str = RUNTIME_AUTO,
                 tf_model: Optional[models_lib.LoadedModel] = None,
                 probe: Optional[np.ndarray] = None,
                 timing_runs: int = 0,
                 intra_op_threads: Optional[int] = None):
  """Loads a model on the requested runtime, checked against TensorFlow.

  Args:
    resolved: the model.
    runtime: ``tf``; ``onnx`` (refuse if ONNX is unavailable or differs);
      ``auto`` (ONNX when it passes the check, else TF with a warning saying
      why).
    tf_model: the model already loaded by models.load_model, if any.
    probe: uint8 batch for the check; ``probe_batch()`` by default.
    timing_runs: for ``auto``, time this many runs of the probe batch on
      each runtime (after the untimed check run) and keep the faster one.
      Off by default: where each worker decides alone, noisy timings of
      models that run about as fast on both (Inception-V4 and
      Inception-ResNet-V2 on AVX-512 CPUs) would make one table mix rows of
      both runtimes; a launcher that decides once for all workers can turn
      it on.
    intra_op_threads: ONNX Runtime threads; all cores of the process by
      default.

  Returns:
    ``(predictor, runtime_name, info)``: an object with ``predict(uint8
    batch) -> float32 [n, width]``, ``"tf"`` or ``"onnx"``, and a RuntimeInfo
    whose ``max_diff`` and ``as_dict()`` go into run.json and table
    metadata.

  Raises:
    ModelError: unknown runtime; the model cannot be loaded; for ``onnx``,
      ONNX Runtime or tf2onnx is missing, the conversion fails, or the check
      fails (the message names the model, the difference and the tolerance).
  """
  if runtime not in RUNTIMES:
    raise models_lib.ModelError(
        f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
  if tf_model is None:
    tf_model = models_lib.load_model(resolved)
  if runtime == RUNTIME_TF:
    return tf_model, RUNTIME_TF, RuntimeInfo(RUNTIME_TF, runtime)

  name = resolved.name
  tolerance = TOLERANCES[resolved.spec.kind]
  info = RuntimeInfo(RUNTIME_ONNX, runtime, tolerance=tolerance)
  try:
    onnx_model = _checked_onnx(resolved, tf_model, probe, info,
                               intra_op_threads)
  except models_lib.ModelError as e:
    if runtime == RUNTIME_ONNX:
      raise
    return _fall_back(tf_model, info, str(e))

  if runtime == RUNTIME_AUTO and timing_runs > 0:
    batch = probe if probe is not None else probe_batch(
        resolved.spec.input_size)
    info.tf_seconds = _best_time(tf_model.predict, batch, timing_runs)
    info.onnx_seconds = _best_time(onnx_model.predict, batch, timing_runs)
    if info.onnx_seconds >= info.tf_seconds:
      return _fall_back(
          tf_model, info,
          f"TF ran the probe batch in {info.tf_seconds:.3f} s, ONNX Runtime "
          f"in {info.onnx_seconds:.3f} s", level=logging.INFO)
  logging.info(
      "model %s runs on ONNX Runtime (%s, %s file %s); max difference from "
      "TF on the probe batch %.2g (tolerance %.0e)%s", name,
      ",".join(onnx_model.providers), info.onnx_source, info.onnx_path,
      info.onnx_max_diff, tolerance,
      "" if info.tf_seconds is None else
      f"; probe batch TF {info.tf_seconds:.3f} s, ONNX "
      f"{info.onnx_seconds:.3f} s")
  info.max_diff = info.onnx_max_diff
  return onnx_model, RUNTIME_ONNX, info


def _checked_onnx(resolved: models_lib.ResolvedModel,
                  tf_model: models_lib.LoadedModel,
                  probe: Optional[np.ndarray], info: RuntimeInfo,
                  intra_op_threads: Optional[int]) -> OnnxModel:
  """Opens the ONNX model and compares it with TF; fills ``info``.

  Raises:
    ModelError: any reason not to run the model on ONNX Runtime.
  """
  spec = resolved.spec
  try:
    import onnxruntime  # pylint: disable=import-outside-toplevel,unused-import
    import tf2onnx  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise models_lib.ModelError(
        f"model {spec.name}: the onnx runtime needs the onnxruntime and "
        f"tf2onnx packages ({e}); pip install onnxruntime tf2onnx, or pass "
        f"--runtime tf") from e
  onnx_model, info.onnx_source = _open_onnx(resolved, tf_model,
                                            intra_op_threads)
  info.onnx_path = onnx_model.path
  batch = probe if probe is not None else probe_batch(spec.input_size)
  expected = tf_model.predict(batch)
  try:
    got = onnx_model.predict(batch)
  except Exception as e:  # noqa: BLE001 - ORT raises its own kinds
    raise models_lib.ModelError(
        f"model {spec.name}: ONNX Runtime failed on the probe batch "
        f"({onnx_model.path}): {e}") from e
  info.onnx_max_diff = output_difference(got, expected)
  if got.shape != expected.shape:
    raise models_lib.ModelError(
        f"model {spec.name}: ONNX output shape {list(got.shape)} differs from "
        f"TF's {list(expected.shape)} on the probe batch ({onnx_model.path})")
  if not info.onnx_max_diff <= info.tolerance:
    raise models_lib.ModelError(
        f"model {spec.name}: ONNX Runtime's outputs differ from TensorFlow's "
        f"by {info.onnx_max_diff:.3g} on the probe batch, more than the "
        f"{spec.kind} tolerance {info.tolerance:.0e} (max|onnx - tf| / "
        f"max(1, max|tf|)); ONNX file {onnx_model.path} ({info.onnx_source})")
  return onnx_model


def _fall_back(tf_model: models_lib.LoadedModel, info: RuntimeInfo,
               reason: str, level: int = logging.WARNING):
  logging.log(level, "model %s runs on TensorFlow, not ONNX Runtime: %s",
              tf_model.resolved.name, reason)
  info.runtime = RUNTIME_TF
  info.max_diff = 0.0
  info.fallback = reason
  return tf_model, RUNTIME_TF, info


# --------------------------------------------------------------------------
# Staging: python -m transforms.runtimes


def stage_onnx(resolved: models_lib.ResolvedModel,
               overwrite: bool = False) -> Tuple[str, float]:
  """Converts a model, checks it against TF and writes ``natvision.onnx``.

  The file goes next to the model (a local folder or a bucket), where every
  worker's ``load_runtime`` finds it instead of converting.

  Returns:
    The staged path and the checked difference from TF on the probe.

  Raises:
    ModelError: conversion or check failed; the file exists and overwrite
      is false.
  """
  target = _join(resolved.path, STAGED_ONNX)
  if FileSystems.exists(target) and not overwrite:
    raise models_lib.ModelError(
        f"{target} exists; pass --overwrite to replace it")
  tf_model = models_lib.load_model(resolved)
  with tempfile.TemporaryDirectory(prefix="natvision-stage-") as tmp:
    local = os.path.join(tmp, STAGED_ONNX)
    convert_to_onnx(resolved, local, tf_model)
    onnx_model = OnnxModel(resolved, local)
    probe = probe_batch(resolved.spec.input_size)
    diff = output_difference(onnx_model.predict(probe),
                             tf_model.predict(probe))
    tolerance = TOLERANCES[resolved.spec.kind]
    if not diff <= tolerance:
      raise models_lib.ModelError(
          f"model {resolved.name}: the converted model differs from TF by "
          f"{diff:.3g} on the probe batch, more than the tolerance "
          f"{tolerance:.0e}; nothing staged")
    del onnx_model
    with open(local, "rb") as f:
      _write_atomically(target, f.read())
  return target, diff


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m transforms.runtimes",
      description=(
          "Convert models to ONNX once, check them against TensorFlow and "
          "write <model_dir>/natvision.onnx next to each, so that workers "
          "with --runtime auto|onnx load it instead of converting."))
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
  args = parser.parse_args(argv)
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
