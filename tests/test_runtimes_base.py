"""transforms/runtimes/base.py: what every runtime shares.

The probe batch on which runtimes are compared, the timing of a predict on
a clock, the comparison of outputs (``output_difference``, the measure the
tolerances bound), the decision a model carries, the fingerprint of a
model's files, and the runtimes this process keeps loaded.  No model is
loaded here: predicts are plain functions and clocks are fake
(tests/runtime_helpers.py), so each test is about the arithmetic.
"""

import os

import numpy as np
import pytest

from tests.runtime_helpers import (  # noqa: F401  (fixtures)
    FakeClock, nothing_remembered, onnx_cache)
from natvision.transforms import runtimes
from natvision.transforms.runtimes import base


def test_probe_batch_is_fixed_and_varied():
  probe = runtimes.probe_batch()
  assert probe.shape == (runtimes.PROBE_SIZE, 299, 299, 3)
  assert probe.dtype == np.uint8
  np.testing.assert_array_equal(probe, runtimes.probe_batch())
  for i in range(len(probe)):
    assert probe[i].min() < 30 and probe[i].max() > 225
    for j in range(i):
      assert not np.array_equal(probe[i], probe[j])


def test_best_time_reads_the_clock_around_each_call():
  clock = FakeClock()
  costs = iter([0.5, 0.2, 0.3])

  def predict(batch):
    clock.now += next(costs)
    return batch

  assert base.best_time(predict, np.zeros(1), 3, clock) == pytest.approx(0.2)


def test_a_decision_names_tf_or_onnx_never_auto():
  with pytest.raises(ValueError, match="auto is a request"):
    runtimes.RuntimeDecision("auto", note="")
  decision = runtimes.RuntimeDecision("onnx", note="n", max_diff=1e-6)
  assert decision.as_dict()["runtime"] == "onnx"
  with pytest.raises(AttributeError):
    decision.runtime = "tf"  # frozen


def test_best_times_alternate_and_keep_each_predicts_shortest():
  clock = FakeClock()
  calls = []
  costs = {"tf": iter([0.4, 0.1, 0.3]), "onnx": iter([0.2, 0.5, 0.25])}

  def timed(name):
    def predict(batch):
      calls.append(name)
      clock.now += next(costs[name])
      return batch
    return predict

  best = base.best_times([timed("tf"), timed("onnx")], np.zeros(1), 3, clock)
  assert best == pytest.approx([0.1, 0.2], abs=1e-12)
  assert calls == ["tf", "onnx"] * 3  # in turn, not all of one first


def test_output_difference_is_absolute_up_to_1_and_relative_above():
  small = np.array([[0.5, -0.25]], np.float32)
  assert runtimes.output_difference(small + [[1e-3, 0.0]], small) == (
      pytest.approx(1e-3, rel=1e-4))  # float32 inputs: about 1e-7 off
  large = np.array([[10.0, -20.0]])
  assert runtimes.output_difference(large + [[0.0, 1.0]], large) == (
      pytest.approx(1.0 / 20, rel=1e-12))
  assert runtimes.output_difference(large, large) == 0.0
  assert runtimes.output_difference(large[:, :1], large) == float("inf")
  assert runtimes.output_difference([[np.nan, -20.0]], large) == float("inf")


def test_a_decision_refuses_other_precisions_and_int8_on_tf():
  assert runtimes.RuntimeDecision("onnx", note="", precision="int8"
                                  ).precision == "int8"
  with pytest.raises(ValueError, match="fp32 or int8"):
    runtimes.RuntimeDecision("onnx", note="", precision="fp16")
  with pytest.raises(ValueError, match="ONNX Runtime only"):
    runtimes.RuntimeDecision("tf", note="", precision="int8")


def _saved_model(root, graph=b"graph", index=b"index"):
  os.makedirs(os.path.join(root, "variables"), exist_ok=True)
  with open(os.path.join(root, "saved_model.pb"), "wb") as f:
    f.write(graph)
  with open(os.path.join(root, "variables", "variables.index"), "wb") as f:
    f.write(index)
  return root


def test_fingerprint_follows_the_graph_and_weights_only(tmp_path):
  first = base.model_fingerprint(_saved_model(str(tmp_path / "a")))
  assert len(first) == 32 and int(first, 16) >= 0  # 32 hex digits
  assert base.model_fingerprint(_saved_model(str(tmp_path / "b"))) == first
  (tmp_path / "b" / "labels.txt").write_text("not part of the model")
  assert base.model_fingerprint(str(tmp_path / "b")) == first
  assert base.model_fingerprint(_saved_model(
      str(tmp_path / "c"), graph=b"other graph")) != first
  assert base.model_fingerprint(_saved_model(
      str(tmp_path / "d"), index=b"other weights")) != first
  (tmp_path / "a" / "variables" / "variables.data-00000-of-00001"
   ).write_bytes(b"12345")
  assert base.model_fingerprint(str(tmp_path / "a")) != first  # shard sizes


def test_remembered_runtimes_are_recalled_until_forgotten():
  one, two = object(), object()
  base.remember(("tf", "one"), one)
  base.remember(("tf", "two"), two)
  assert base.recall(("tf", "one")) is one
  assert base.recall(("onnx", "one")) is None
  base.forget(("tf", "one"))
  assert base.recall(("tf", "one")) is None
  assert base.recall(("tf", "two")) is two
  base.forget()
  assert base.recall(("tf", "two")) is None
