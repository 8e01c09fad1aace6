"""An ONNX file opened by ONNX Runtime; what it records.

Decides how a file is opened (execution providers, one session per process
for all its threads, uint8 scaled straight into a per-thread buffer), which
metadata keys a natvision file carries (the model, the fingerprint of the
model files it was made from, its precision, and for an fp32 file the check
made when it was made: ``RecordedCheck``), and when a file is the one a
decision names (``require_identity``: precision and fingerprint).

Made by ``onnx_convert`` (fp32) and ``int8_file`` (int8); found by
``onnx_store`` and ``onnx``; onnxruntime is imported when a session opens.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.metadata
import json
import logging
import os
import threading
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from natvision.transforms import models as models_lib

ONNX_INPUT = "images"
ONNX_OUTPUT = "output"

METADATA_FINGERPRINT = "natvision_fingerprint"
METADATA_MODEL = "natvision_model"
METADATA_PRECISION = "natvision_precision"
METADATA_CHECK = "natvision_check"


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
    self.threads = intra_op_threads or process_cores()
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

  def predict_probe(self, batch: np.ndarray) -> np.ndarray:
    """``predict`` on a check's batch; ONNX Runtime's failures as ModelError.

    Raises:
      ModelError: naming the model, the file and ONNX Runtime's message.
    """
    try:
      return self.predict(batch)
    except Exception as e:  # noqa: BLE001 - ORT raises its own kinds
      raise models_lib.ModelError(
          f"model {self.resolved.name}: ONNX Runtime failed on the probe "
          f"batch ({self.path}): {e}") from e

  @property
  def fingerprint(self) -> Optional[str]:
    """The fingerprint of the model files the file records it was made
    from; None for a file natvision did not make."""
    return self.metadata.get(METADATA_FINGERPRINT)


def process_cores() -> int:
  """The cores this process may run on (its affinity on Linux)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def installed_version(dist: str) -> str:
  """An installed distribution's version, without importing it; ``none``."""
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "none"


def add_metadata(proto, metadata: Mapping[str, str]) -> None:
  """Adds ``metadata`` to an ONNX ModelProto's ``metadata_props``."""
  for key, value in metadata.items():
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value


def require_identity(session: OnnxSession, precision: str,
                     fingerprint: Optional[str], what: str) -> None:
  """Refuses a file that does not record ``precision`` and ``fingerprint``.

  Args:
    session: the opened file.
    precision: ``fp32`` or ``int8``.
    fingerprint: the fingerprint of the model files (``base.model_
      fingerprint``) the file must have been made from.
    what: the file as the message names it, e.g. "the int8 file the
      launcher checked".

  Raises:
    ModelError: naming the model, the path, what the file records and what
      was expected.
  """
  found = (session.metadata.get(METADATA_PRECISION), session.fingerprint)
  if found != (precision, fingerprint):
    raise models_lib.ModelError(
        f"model {session.resolved.name}: {session.path} is not {what} "
        f"(precision, fingerprint {found}, expected {precision}, "
        f"{fingerprint})")


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
