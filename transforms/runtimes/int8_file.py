"""The int8 file: static quantization of an fp32 ONNX file with ONNX Runtime.

Decides how a model is quantized and where the result is cached:
``quant_pre_process`` (shape inference and graph optimisation, without
which the QDQ graph runs barely faster than fp32 here), then
``quantize_static`` in the QDQ format, weights int8 per output channel,
activations uint8 (ONNX Runtime's advice for x86 CPUs with VNNI), ranges by
MinMax calibration on prepared photos of the job (``SETTINGS``); the head
(global pooling, dense layer, softmax) stays float32 (``head_nodes``).  It
runs in a spawned child process (``quantize_in_child``), like a conversion,
and the result is cached like a converted file, keyed by content
(``quantized_path``: the fp32 file's bytes, the calibration photos and the
settings), never by a path.  The file records the model, the fingerprint,
``int8`` and the calibration (``METADATA_CALIBRATION``).

Whether the file may run is ``quantize.decide_int8``'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from typing import List, Optional

import numpy as np

from natvision.transforms import models as models_lib
from natvision.transforms.runtimes import base
from natvision.transforms.runtimes import child
from natvision.transforms.runtimes import onnx_session as session_lib
from natvision.transforms.runtimes import onnx_store as store

CALIBRATION_BATCH = 8
# What the quantization does; part of the cache key and the file's metadata.
SETTINGS = {"format": "QDQ", "per_channel": True, "weights": "QInt8",
            "activations": "QUInt8", "calibration": "MinMax",
            "pre_process": True, "reduce_range": False}
METADATA_CALIBRATION = "natvision_calibration"


def array_digest(array: np.ndarray) -> str:
  """16 hex digits of sha256 over an array's shape and bytes."""
  digest = hashlib.sha256(repr(array.shape).encode())
  digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()[:16]


def quantized_path(resolved: models_lib.ResolvedModel, fp32_path: str,
                   fingerprint: str, calibration_digest: str) -> str:
  """The cache file of a quantized model, keyed by content only.

  Keyed by the fp32 file's bytes (a hash, read once per call; a fraction of
  a second for a full-size model, next to minutes of quantization), the
  model's fingerprint, the calibration photos, the settings and ONNX
  Runtime's version.  Not by the fp32 file's path or modification time: a
  model folder moved or copied with its staged file reuses the int8 file.
  """
  return store.cached_path(
      resolved.name, ".int8.onnx", store.file_digest(fp32_path), fingerprint,
      calibration_digest, json.dumps(SETTINGS, sort_keys=True),
      session_lib.installed_version("onnxruntime"))


def head_nodes(model) -> List[str]:
  """The nodes that stay float32: from the last global pooling to the end.

  Quantizing them would round the model's outputs to 8 bits: a softmax over
  thousands of classes would lose every probability under 1/255 (the
  top-k of a photo would become ties at 0), and an embedding would move by
  its rounding.  The head (pooling, the dense layer, the softmax) costs a
  few million multiply-adds next to the trunk's billions, so keeping it in
  float32 costs no measurable speed.  Without a global pooling, the nodes
  that produce the graph's outputs and every softmax stay float32.

  Args:
    model: an ONNX ModelProto, its nodes in topological order (as ONNX
      requires).

  Returns:
    The names of those nodes.
  """
  nodes = list(model.graph.node)
  pools = [i for i, n in enumerate(nodes)
           if n.op_type in ("GlobalAveragePool", "GlobalMaxPool")]
  if pools:
    return [n.name for n in nodes[pools[-1]:]]
  outputs = {o.name for o in model.graph.output}
  return [n.name for n in nodes
          if n.op_type == "Softmax" or outputs & set(n.output)]


class _Calibration:
  """An ``onnxruntime.quantization.CalibrationDataReader`` over uint8 photos."""

  def __init__(self, photos: np.ndarray):
    self._batches = iter([
        photos[i:i + CALIBRATION_BATCH].astype(np.float32) / 255.0
        for i in range(0, len(photos), CALIBRATION_BATCH)])

  def get_next(self) -> Optional[dict]:
    batch = next(self._batches, None)
    return None if batch is None else {session_lib.ONNX_INPUT: batch}

  def rewind(self) -> None:  # one pass is all MinMax needs
    pass


def quantize_file(resolved: models_lib.ResolvedModel, fp32_path: str,
                  target_path: str, calibration: np.ndarray,
                  fingerprint: str) -> str:
  """Quantizes an fp32 ONNX file to int8 and writes it at ``target_path``.

  Args:
    resolved: the model.
    fp32_path: its checked fp32 ONNX file.
    target_path: where the int8 file goes (written atomically).
    calibration: uint8 ``[n, size, size, 3]`` prepared photos.
    fingerprint: the model's fingerprint, recorded in the file.

  Returns:
    target_path.

  Raises:
    ModelError: ONNX Runtime's quantization tools fail.
  """
  # pylint: disable=import-outside-toplevel
  import onnx
  from onnxruntime import quantization as q
  from onnxruntime.quantization import shape_inference
  # pylint: enable=import-outside-toplevel

  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="natvision-int8-") as tmp:
    source = os.path.join(tmp, "pre.onnx")
    pre_processed = True
    try:
      shape_inference.quant_pre_process(fp32_path, source)
    except Exception as e:  # noqa: BLE001 - the tools raise many kinds
      logging.warning("model %s: quant_pre_process failed (%s); quantizing "
                      "the file as it is, which may run slower", resolved.name,
                      e)
      source, pre_processed = fp32_path, False
    output = os.path.join(tmp, "int8.onnx")
    head = head_nodes(onnx.load(source))
    try:
      q.quantize_static(
          source, output, _Calibration(calibration),
          quant_format=q.QuantFormat.QDQ, per_channel=True,
          reduce_range=False, activation_type=q.QuantType.QUInt8,
          weight_type=q.QuantType.QInt8,
          calibrate_method=q.CalibrationMethod.MinMax,
          nodes_to_exclude=head)
    except Exception as e:  # noqa: BLE001
      raise models_lib.ModelError(
          f"model {resolved.name}: int8 quantization failed: "
          f"{type(e).__name__}: {e}") from e
    proto = onnx.load(output)
  settings = dict(SETTINGS, pre_process=pre_processed,
                  float_head=len(head))
  metadata = {
      session_lib.METADATA_MODEL: resolved.name,
      session_lib.METADATA_FINGERPRINT: fingerprint,
      session_lib.METADATA_PRECISION: base.INT8,
      "natvision_fp32_source": fp32_path,
      METADATA_CALIBRATION: json.dumps({
          "photos": int(len(calibration)), "digest": array_digest(calibration),
          "settings": settings,
          "onnxruntime_version": session_lib.installed_version(
              "onnxruntime"),
      }, sort_keys=True),
  }
  del proto.metadata_props[:]  # the fp32 file's check says nothing of int8
  session_lib.add_metadata(proto, metadata)
  data = proto.SerializeToString()
  store.write_atomically(target_path, data)
  logging.info("quantized %s to int8 (%.1f MB) in %.1f s: %s", resolved.name,
               len(data) / 1e6, time.perf_counter() - start, target_path)
  return target_path


def quantize_in_child(resolved: models_lib.ResolvedModel, fp32_path: str,
                      target_path: str, calibration: np.ndarray,
                      fingerprint: str) -> str:
  """``quantize_file`` in a spawned child process (``child.run_in_child``).

  Raises:
    ModelError: the quantization failed or its process died.
  """
  base.announce(
      f"quantizing model {resolved.name} to int8 on {len(calibration)} of "
      f"the job's photos", QUANTIZE_START_SECONDS
      + QUANTIZE_SECONDS_PER_MB * os.path.getsize(fp32_path) / 1e6)
  return child.run_in_child(
      quantize_file, (resolved, fp32_path, target_path, calibration,
                      fingerprint), resolved.name, "quantizing it to int8")


# About what a quantization in a child costs: its start, then per MB of
# the fp32 file (calibration runs the photos through it).
QUANTIZE_START_SECONDS = 5.0
QUANTIZE_SECONDS_PER_MB = 0.3
