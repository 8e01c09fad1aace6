"""transforms/runtimes/int8_file.py: which nodes stay float, the cache key.

Hand-made ONNX graphs (onnx.helper) stand for the models' heads; the
quantization itself runs on the tiny stand-ins in
tests/test_runtimes_quantize.py.
"""

import shutil
import types

import numpy as np
from onnx import TensorProto, helper

from natvision.transforms.runtimes import int8_file


def _graph(ops):
  """A chain of single-input nodes named after their ops, x -> y."""
  names = [f"t{i}" for i in range(len(ops))] + ["y"]
  nodes = [helper.make_node(op, [names[i - 1] if i else "x"], [names[i]],
                            name=f"{op.lower()}_{i}")
           for i, op in enumerate(ops)]
  nodes[-1].output[0] = "y"
  value = helper.make_tensor_value_info
  return helper.make_model(helper.make_graph(
      nodes, "g", [value("x", TensorProto.FLOAT, None)],
      [value("y", TensorProto.FLOAT, None)]))


def test_the_head_from_the_last_global_pooling_stays_float():
  model = _graph(["Relu", "GlobalAveragePool", "Relu", "GlobalMaxPool",
                  "Flatten", "Softmax"])
  assert int8_file.head_nodes(model) == [
      "globalmaxpool_3", "flatten_4", "softmax_5"]


def test_without_pooling_the_outputs_and_softmaxes_stay_float():
  model = _graph(["Relu", "Softmax", "Relu", "Sigmoid"])
  assert int8_file.head_nodes(model) == ["softmax_1", "sigmoid_3"]


def test_the_cache_key_is_the_bytes_not_the_path(tmp_path, monkeypatch):
  monkeypatch.setenv("NATVISION_ONNX_CACHE", str(tmp_path / "cache"))
  resolved = types.SimpleNamespace(name="fungi_mobile_v1")
  first = tmp_path / "a" / "natvision.onnx"
  first.parent.mkdir()
  first.write_bytes(b"fp32 model")
  moved = tmp_path / "b.onnx"
  shutil.copy(first, moved)
  path = int8_file.quantized_path(resolved, str(first), "f" * 32, "c" * 16)
  assert path.startswith(str(tmp_path / "cache" / "fungi_mobile_v1-"))
  assert path.endswith(".int8.onnx")
  assert int8_file.quantized_path(resolved, str(moved), "f" * 32,
                                  "c" * 16) == path
  moved.write_bytes(b"other model")
  assert int8_file.quantized_path(resolved, str(moved), "f" * 32,
                                  "c" * 16) != path
  assert int8_file.quantized_path(resolved, str(first), "f" * 32,
                                  "d" * 16) != path


def test_the_calibration_digest_covers_shape_and_pixels():
  photos = np.arange(48, dtype=np.uint8).reshape(4, 2, 2, 3)
  digest = int8_file.array_digest(photos)
  assert len(digest) == 16
  assert int8_file.array_digest(photos.copy()) == digest
  assert int8_file.array_digest(photos.reshape(2, 4, 2, 3)) != digest
  changed = photos.copy()
  changed[3, 1, 1, 2] += 1
  assert int8_file.array_digest(changed) != digest
