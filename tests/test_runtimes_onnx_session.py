"""transforms/runtimes/onnx_session.py: opening a file, what it records.

A hand-made ONNX graph (``Flatten`` of ``images``, built with onnx.helper)
shows the scaling of uint8 input and the metadata without TensorFlow;
converted tiny stand-ins show that one session serves many threads.
"""

import threading
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.runtime_helpers import (  # noqa: F401  (fixtures)
    model_root, noise, nothing_remembered, onnx_cache, photos, resolve)
from natvision.transforms import models as models_lib
from natvision.transforms.runtimes import onnx_convert
from natvision.transforms.runtimes import onnx_session


def _flatten_model(metadata=None) -> bytes:
  """``images`` float32 [n, 2, 2, 3] -> ``output`` [n, 12], opset 17."""
  graph = helper.make_graph(
      [helper.make_node("Flatten", ["images"], ["output"], axis=1)], "flat",
      [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                     ["n", 2, 2, 3])],
      [helper.make_tensor_value_info("output", TensorProto.FLOAT,
                                     ["n", 12])])
  proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  proto.ir_version = 8  # onnxruntime 1.17 reads up to 9
  onnx_session.add_metadata(proto, metadata or {})
  return proto.SerializeToString()


def _model(name="fungi_mobile_v1"):
  """A stand-in of a resolved model: a session reads only its name."""
  return types.SimpleNamespace(name=name)


def test_uint8_is_scaled_to_floats_in_0_1():
  session = onnx_session.OnnxSession(_model(), "(flat)",
                                     model_bytes=_flatten_model())
  batch = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3) * 10
  got = session.predict(batch)
  assert got.dtype == np.float32 and got.shape == (2, 12)
  np.testing.assert_allclose(got, batch.reshape(2, 12) / 255.0, rtol=1e-6)
  # A float batch is taken as it is.
  np.testing.assert_array_equal(
      session.predict(batch.astype(np.float32)), batch.reshape(2, 12))


def test_a_file_is_refused_unless_it_records_precision_and_fingerprint():
  metadata = {onnx_session.METADATA_FINGERPRINT: "a" * 32,
              onnx_session.METADATA_PRECISION: "int8"}
  session = onnx_session.OnnxSession(_model(), "/cache/m.int8.onnx",
                                     model_bytes=_flatten_model(metadata))
  assert session.fingerprint == "a" * 32
  onnx_session.require_identity(session, "int8", "a" * 32, "the file")
  with pytest.raises(models_lib.ModelError) as raised:
    onnx_session.require_identity(session, "int8", "b" * 32,
                                  "the int8 file the launcher checked")
  message = str(raised.value)
  assert message.startswith("model fungi_mobile_v1: /cache/m.int8.onnx is "
                            "not the int8 file the launcher checked")
  assert "b" * 32 in message
  with pytest.raises(models_lib.ModelError, match="expected fp32"):
    onnx_session.require_identity(session, "fp32", "a" * 32, "the file")


def test_a_failed_probe_run_names_the_model_and_the_file():
  session = onnx_session.OnnxSession(_model(), "/cache/m.onnx",
                                     model_bytes=_flatten_model())
  wrong = np.zeros((1, 3, 3, 3), np.uint8)  # the graph takes 2x2 images
  with pytest.raises(models_lib.ModelError) as raised:
    session.predict_probe(wrong)
  assert str(raised.value).startswith(
      "model fungi_mobile_v1: ONNX Runtime failed on the probe batch "
      "(/cache/m.onnx): ")


def test_a_file_without_one_images_input_is_refused():
  proto = onnx.load_from_string(_flatten_model())
  proto.graph.input[0].name = "pixels"
  proto.graph.node[0].input[0] = "pixels"
  with pytest.raises(models_lib.ModelError, match="expected one input"):
    onnx_session.OnnxSession(_model(), "(x)",
                             model_bytes=proto.SerializeToString())


def test_a_recorded_check_reads_back_bit_for_bit():
  reference = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
  check = onnx_session.RecordedCheck(reference=reference, max_diff=1.5e-6,
                                     tolerance=1e-4, tf_seconds=0.25,
                                     onnxruntime_version="1.20.0")
  back = onnx_session.RecordedCheck.from_metadata(check.to_metadata())
  np.testing.assert_array_equal(back.reference, reference)
  assert (back.max_diff, back.tolerance, back.tf_seconds, back.onnx_seconds,
          back.onnxruntime_version) == (1.5e-6, 1e-4, 0.25, None, "1.20.0")
  assert onnx_session.RecordedCheck.from_metadata({}) is None
  assert onnx_session.RecordedCheck.from_metadata(
      {onnx_session.METADATA_CHECK: "{not json"}) is None


def test_uint8_and_float_inputs_agree(model_root, photos, tmp_path):
  resolved = resolve(model_root, "inception_resnet_v2")
  path = onnx_convert.convert_to_onnx(resolved, str(tmp_path / "m.onnx"))
  session = onnx_session.OnnxSession(resolved, path, intra_op_threads=1)
  np.testing.assert_allclose(
      session.predict(photos),
      session.predict(photos.astype(np.float32) / 255), rtol=1e-6,
      atol=1e-6)


def test_one_session_serves_many_threads(model_root, tmp_path):
  resolved = resolve(model_root, "fungi_mobile_v1")
  session = onnx_session.OnnxSession(
      resolved,
      onnx_convert.convert_to_onnx(resolved, str(tmp_path / "m.onnx")))
  batches = [noise(2, seed) for seed in range(6)]
  expected = [session.predict(b) for b in batches]
  results = [None] * len(batches)

  def work(i):
    for _ in range(3):
      results[i] = session.predict(batches[i])

  threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for got, want in zip(results, expected):
    np.testing.assert_array_equal(got, want)
