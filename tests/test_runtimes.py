"""transforms/runtimes/__init__.py: the package's entry point for workers.

``for_model`` builds the runtime a model's decision names, and refuses a
model that went through no decision; the runtime modules themselves are
tested in test_runtimes_<module>.py (shared helpers in
tests/runtime_helpers.py).
"""

import pytest

from tests.runtime_helpers import (  # noqa: F401  (fixtures)
    model_root, nothing_remembered, onnx_cache, resolve)
from natvision.transforms import runtimes


def test_workers_get_the_decided_runtime_or_refuse(model_root):
  resolved = resolve(model_root, "fungi_mobile_v1")
  assert resolved.runtime is None and resolved.decision is None
  with pytest.raises(ValueError, match="no runtime decision"):
    runtimes.for_model(resolved)
  on_tf = resolved.with_decision(runtimes.RuntimeDecision("tf", note="t"))
  on_onnx = resolved.with_decision(runtimes.RuntimeDecision("onnx", note="o"))
  assert isinstance(runtimes.for_model(on_tf), runtimes.TFRuntime)
  assert isinstance(runtimes.for_model(on_onnx), runtimes.OnnxRuntime)
  assert on_onnx.runtime == "onnx" and on_onnx.requested_runtime == "auto"
  assert on_onnx.describe()["runtime"] == "onnx"
  assert on_onnx.describe()["runtime_note"] == "o"
  with pytest.raises(TypeError):
    resolved.with_decision("onnx")
