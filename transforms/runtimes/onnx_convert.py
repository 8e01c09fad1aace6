"""Conversion of a model to ONNX with tf2onnx, checked and timed when made.

Decides what is converted (the function the TF runtime calls,
``TFRuntime.float_function``: float32 ``images`` ``[batch, size, size, 3]``
in [0, 1], dynamic batch, ``output`` ``[batch, width]``, opset
``onnx_store.ONNX_OPSET``), how (tf2onnx without its per-pass graph copies,
retried with them when a pass fails), what the file records (the model's
fingerprint and the check made then: ``onnx_session.RecordedCheck``, with
the probe timings of both runtimes) and where it runs: ``convert_in_child``
runs it in a spawned child process (``child.run_in_child``) so that its
peak memory (several GB for the Inceptions) leaves with the child, and
``convert_many`` converts several models in one such child (TensorFlow and
tf2onnx start once).  Each conversion prints one console line first
(``base.announce``), with its estimate (``conversion_seconds``).

TensorFlow and tf2onnx are imported only by a conversion.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from typing import Dict, Iterator, Optional, Sequence, Tuple

from natvision.transforms import models as models_lib
from natvision.transforms.runtimes import base
from natvision.transforms.runtimes import child
from natvision.transforms.runtimes import onnx_session as session_lib
from natvision.transforms.runtimes import onnx_store as store
from natvision.transforms.runtimes.tf import TFRuntime


def convert_to_onnx(resolved: models_lib.ResolvedModel, target_path: str,
                    reference: Optional[TFRuntime] = None,
                    opset: int = store.ONNX_OPSET,
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
                             name=session_lib.ONNX_INPUT),)

  @tf.function(autograph=False)  # plain calls: nothing for AutoGraph to do
  def function(images):
    return {session_lib.ONNX_OUTPUT: call(images)}

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
      session_lib.METADATA_MODEL: spec.name,
      session_lib.METADATA_FINGERPRINT: base.model_fingerprint(
          models_lib.stage_locally(resolved.path)),
      session_lib.METADATA_PRECISION: base.FP32,
      "natvision_source": resolved.path,
      "tf2onnx_version": tf2onnx.__version__,
      "tensorflow_version": tf.__version__,
  }
  check = _check_converted(resolved, proto.SerializeToString(), reference,
                           timing_runs, clock)
  metadata.update(check.to_metadata())
  session_lib.add_metadata(proto, metadata)
  data = proto.SerializeToString()
  del proto
  store.write_atomically(target_path, data)
  logging.info("converted %s to ONNX (opset %d, %.1f MB) in %.1f s, max "
               "difference from TF on the probe batch %.2g: %s", spec.name,
               opset, len(data) / 1e6, time.perf_counter() - start,
               check.max_diff, target_path)
  return target_path


def _check_converted(resolved: models_lib.ResolvedModel, model_bytes: bytes,
                     reference: TFRuntime, timing_runs: int,
                     clock: base.Clock) -> session_lib.RecordedCheck:
  """Runs the probe batch through a converted model and TF, and times both.

  Raises:
    ModelError: ONNX Runtime cannot open or run the converted model.
  """
  spec = resolved.spec
  session = session_lib.OnnxSession(resolved, f"(converted {spec.name})",
                                    model_bytes=model_bytes)
  probe = base.probe_batch(spec.input_size)
  expected = reference.predict(probe)
  got = session.predict_probe(probe)
  tf_seconds = onnx_seconds = None
  if timing_runs > 0:
    tf_seconds, onnx_seconds = base.best_times(
        [reference.predict, session.predict], probe,
        max(timing_runs, base.RECORDED_TIMING_RUNS), clock)
  return session_lib.RecordedCheck(
      reference=expected, max_diff=base.output_difference(got, expected),
      tolerance=base.TOLERANCES[spec.kind], tf_seconds=tf_seconds,
      onnx_seconds=onnx_seconds,
      onnxruntime_version=session_lib.installed_version("onnxruntime"))


def _convert(resolved: models_lib.ResolvedModel, target_path: str,
             timing_runs: int) -> str:
  """What the child runs (module-level, so that spawn can pickle it)."""
  return convert_to_onnx(resolved, target_path, timing_runs=timing_runs)


def convert_in_child(resolved: models_lib.ResolvedModel, target_path: str,
                     timing_runs: int = base.DEFAULT_TIMING_RUNS) -> str:
  """``convert_to_onnx`` in a child process, so its memory leaves with it.

  The child is started with ``spawn`` (``child.run_in_child``); a daemonic
  process, which may not start children, converts in-process instead.

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
  return child.run_in_child(
      _convert, (resolved, target_path, timing_runs), resolved.name,
      "converting it to ONNX", advice=_ADVICE)


_ADVICE = (": stage the file with natvision-stage-onnx on a larger machine, "
           "or pass --runtime tf")


def _convert_many_job(pairs, timing_runs: int) -> Dict[str, float]:
  """The child converting several models: each one's seconds."""
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


def convert_many(pairs: Sequence[Tuple[models_lib.ResolvedModel, str]],
                 timing_runs: int = base.DEFAULT_TIMING_RUNS
                 ) -> Dict[str, float]:
  """``convert_to_onnx`` of several models in one child process.

  TensorFlow and tf2onnx start once for all of them.  A model whose
  conversion fails is skipped (``onnx.find_or_convert`` converts it alone
  later and says why).

  Args:
    pairs: (model, target path) of each conversion.
    timing_runs: timed probe runs per runtime to record.

  Returns:
    The seconds of each model converted, by name.

  Raises:
    ModelError: the child died (killed for memory, for instance).
  """
  return child.run_in_child(
      _convert_many_job, (list(pairs), timing_runs),
      ", ".join(r.name for r, _ in pairs), "converting them to ONNX",
      advice=_ADVICE)


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
