"""The interface every runtime implements, and the decision that picks one.

A runtime is what turns a batch of prepared photos into model outputs:
TensorFlow (the reference) or ONNX Runtime (the same graph, converted).  Its
shape follows Beam's ``ModelHandler``: the object is small and picklable
until ``load()`` brings the model into memory, once per worker process;
``predict`` then maps a uint8 batch ``[n, size, size, 3]`` to float32
``[n, width]``; ``describe()`` says what was loaded, for logs.

The launcher (``transforms.runtimes.chooser``) decides once which runtime
each model runs on and records why in a ``RuntimeDecision``; the decision
travels with the model (``ResolvedModel.decision``) so that every worker
runs the runtime the launcher checked, and the tables record it.

Also here: the fixed probe batch on which runtimes are compared, the
comparison itself, the tolerance per kind of model, and the process's
loaded runtimes (``remember``/``recall``): the launcher checks a model once
and, when the pipeline runs in its process (the DirectRunner), the worker
takes over that loaded, checked runtime instead of loading it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from typing import (Any, Callable, Dict, Hashable, List, Literal, Optional,
                    Protocol, Sequence, runtime_checkable)

import numpy as np

from natvision.transforms import models as models_lib

RUNTIME_AUTO = "auto"
RUNTIME_TF = "tf"
RUNTIME_ONNX = "onnx"

# What --runtime may ask for, and what a decision may hold.
Decided = Literal["tf", "onnx"]
DECIDED = (RUNTIME_TF, RUNTIME_ONNX)

# --precision: fp32 (the models' own arithmetic, the default) or int8 (ONNX
# Runtime's static quantization, checked on the job's photos; see
# transforms/runtimes/quantize.py).
FP32 = "fp32"
INT8 = "int8"
PRECISIONS = (FP32, INT8)

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

# Timed runs of the probe batch per runtime, for ``--runtime auto``.
DEFAULT_TIMING_RUNS = 2
# Timed runs per runtime when a conversion records its timings: they decide
# ``auto`` for every later job on the file, so they are taken with more
# runs, alternating between the runtimes (a burst of load from other
# processes then slows both, not one).
RECORDED_TIMING_RUNS = 5

Clock = Callable[[], float]


@runtime_checkable
class Runtime(Protocol):
  """One model on one runtime.

  Attributes:
    name: ``tf`` or ``onnx``.
    resolved: the model.
  """

  name: str
  resolved: models_lib.ResolvedModel

  def load(self) -> None:
    """Brings the model into memory; a second call does nothing.

    Raises:
      ModelError: the model cannot be loaded (or, for ONNX, converted or
        checked against TensorFlow).
    """

  def predict(self, batch: np.ndarray) -> np.ndarray:
    """Runs one batch.

    Args:
      batch: uint8 ``[n, size, size, 3]`` (scaled to [0, 1] inside), or a
        float batch already in [0, 1].

    Returns:
      float32 ``[n, width]``.
    """

  def describe(self) -> dict:
    """A JSON-friendly summary of what was loaded, for logs."""


@dataclasses.dataclass(frozen=True)
class RuntimeDecision:
  """Which runtime a model runs on, decided once by the launcher, and why.

  Attributes:
    runtime: ``tf`` or ``onnx``, the runtime whose outputs go to the tables.
    note: one line on why, recorded in table metadata and run.json.
    max_diff: ``max|out - tf| / max(1, max|tf|)`` of the chosen runtime on
      the probe batch; 0.0 for ``tf`` (the reference itself).
    tolerance: the tolerance of the model's kind; None when ONNX was not
      tried.
    onnx_max_diff: the ONNX difference measured, also when ONNX was not
      chosen; None when ONNX never ran.
    onnx_path: the ONNX file the launcher checked; None when none.
    onnx_source: where that file came from: ``staged``, ``cached`` or
      ``converted``.
    fingerprint: the fingerprint of the model files that file was checked
      against (``model_fingerprint``).
    tf_seconds, onnx_seconds: best time of one probe batch per runtime;
      None when not timed.
    fallback: why ``auto`` did not pick ONNX; None when it did, or when
      ONNX was not asked for.
    checked_against: what the ONNX outputs were compared with: ``tf``
      (TensorFlow, loaded for the check) or ``recorded`` (TensorFlow's
      outputs on the probe batch, recorded in the file when it was made,
      so that no TensorFlow was loaded); for int8, ``fp32 on the job's
      photos``; None when ONNX never ran.
    timed: where ``tf_seconds`` and ``onnx_seconds`` come from: ``here``
      (timed by the launcher) or ``recorded`` (timed when the file was
      made, on that machine); None when not timed.
    precision: ``fp32`` or ``int8``; with ``int8``, ``onnx_path`` is the
      quantized file and ``max_diff`` its difference from the fp32 ONNX
      model on the probe batch (not bound by ``tolerance``).
    agreement: for ``int8``, the figures measured against fp32 on the
      job's held-out photos (``agreement.Agreement``); None for fp32.
  """

  runtime: Decided
  note: str
  max_diff: float = 0.0
  tolerance: Optional[float] = None
  onnx_max_diff: Optional[float] = None
  onnx_path: Optional[str] = None
  onnx_source: Optional[str] = None
  fingerprint: Optional[str] = None
  tf_seconds: Optional[float] = None
  onnx_seconds: Optional[float] = None
  fallback: Optional[str] = None
  checked_against: Optional[str] = None
  timed: Optional[str] = None
  precision: str = FP32
  agreement: Optional[Any] = None

  def __post_init__(self):
    if self.runtime not in DECIDED:
      raise ValueError(
          f"a runtime decision names tf or onnx, not {self.runtime!r} "
          f"(auto is a request, decided by transforms.runtimes.chooser)")
    if self.precision not in PRECISIONS:
      raise ValueError(f"precision is fp32 or int8, not {self.precision!r}")
    if self.precision == INT8 and self.runtime != RUNTIME_ONNX:
      raise ValueError("int8 runs on ONNX Runtime only")

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


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


def best_times(predicts: Sequence[Callable[[np.ndarray], np.ndarray]],
               batch: np.ndarray, runs: int,
               clock: Clock = time.perf_counter) -> List[float]:
  """The shortest of ``runs`` timed calls of each predict, alternating.

  Args:
    predicts: runtimes' predict functions, called in turn ``runs`` times.
    batch: uint8 ``[n, size, size, 3]``.
    runs: timed calls of each, at least 1.
    clock: seconds, monotonic.

  Returns:
    One best time per predict, in seconds, in their order.
  """
  best = [float("inf")] * len(predicts)
  for _ in range(runs):
    for i, predict in enumerate(predicts):
      start = clock()
      predict(batch)
      best[i] = min(best[i], clock() - start)
  return best


def output_difference(out: np.ndarray, reference: np.ndarray) -> float:
  """``max|out - reference| / max(1, max|reference|)``, as in TOLERANCES.

  Args:
    out: float ``[n, width]`` of the runtime under test.
    reference: float ``[n, width]`` of TensorFlow.

  Returns:
    The scaled difference; infinity when the shapes differ or ``out`` is not
    finite.
  """
  out = np.asarray(out, np.float64)
  reference = np.asarray(reference, np.float64)
  if out.shape != reference.shape:
    return float("inf")
  if not np.isfinite(out).all():
    return float("inf")
  scale = max(1.0, float(np.abs(reference).max(initial=0.0)))
  return float(np.abs(out - reference).max(initial=0.0)) / scale


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


def folder_megabytes(local_dir: str) -> float:
  """The size of the files under a local folder, in MB (1e6 bytes)."""
  total = 0
  for folder, _, names in os.walk(local_dir):
    for name in names:
      try:
        total += os.path.getsize(os.path.join(folder, name))
      except OSError:
        pass
  return total / 1e6


def announce(what: str, seconds: float) -> None:
  """The console line of a step that may take over 5 s (a conversion, a
  quantization, a model copy): what it does and about how long it takes.

  Printed by the ``natvision`` logger, which the quiet console shows
  (transforms/console.py).
  """
  logging.getLogger("natvision").info("%s (about %.0f s)", what,
                                      max(1.0, seconds))


# --------------------------------------------------------------------------
# Runtimes loaded and checked in this process.

_LOADED: Dict[Hashable, Any] = {}
_LOADED_LOCK = threading.Lock()


def remember(key: Hashable, loaded: Any) -> None:
  """Keeps a loaded, checked runtime for later ``recall`` in this process.

  The launcher remembers the runtime it decided on; a worker running in the
  same process (the DirectRunner) recalls it instead of loading and
  checking the model a second time.

  Args:
    key: what identifies exactly this model file on this runtime (see
      ``TFRuntime.key`` and ``OnnxRuntime.key``).
    loaded: the loaded runtime.
  """
  with _LOADED_LOCK:
    _LOADED[key] = loaded


def recall(key: Hashable) -> Optional[Any]:
  """The runtime remembered under ``key`` in this process, or None."""
  with _LOADED_LOCK:
    return _LOADED.get(key)


def forget(key: Optional[Hashable] = None) -> None:
  """Drops one remembered runtime, or all of them (``key`` None)."""
  with _LOADED_LOCK:
    if key is None:
      _LOADED.clear()
    else:
      _LOADED.pop(key, None)
