"""transforms/runtimes/onnx_convert.py: tf2onnx conversion, checked when made.

Tiny stand-ins in the seeds' three formats are converted in this process;
the file's outputs are compared with TensorFlow's within the tolerance of
the model's kind, and what the file records with the model's fingerprint.
"""

import os

import numpy as np
import pytest

from tests.runtime_helpers import (  # noqa: F401  (fixtures)
    NAMES, loaded_tf, model_root, noise, nothing_remembered, onnx_cache,
    photos, resolve)
from natvision.transforms import runtimes
from natvision.transforms.runtimes import base as runtimes_base
from natvision.transforms.runtimes import onnx_convert
from natvision.transforms.runtimes import onnx_session


@pytest.mark.parametrize("name", NAMES)
def test_conversion_matches_tf_on_photos_and_noise(model_root, photos, tmp_path,
                                                   name):
  resolved = resolve(model_root, name)
  tf_runtime = loaded_tf(resolved)
  path = onnx_convert.convert_to_onnx(resolved, str(tmp_path / "m.onnx"),
                                      tf_runtime)
  assert os.listdir(tmp_path) == ["m.onnx"]  # no temporary file left behind
  assert "TF2ONNX_CATCH_ERRORS" not in os.environ  # restored
  session = onnx_session.OnnxSession(resolved, path)
  assert session.metadata["natvision_fingerprint"] == (
      runtimes_base.model_fingerprint(model_root + "/" + name))
  tolerance = runtimes.TOLERANCES[resolved.spec.kind]
  # The batch dimension is dynamic: 1, 2 and 3 photos through one file.
  diffs = []
  for batch in (photos, photos[:1], noise(3)):
    expected = tf_runtime.predict(batch)
    got = session.predict(batch)
    assert got.dtype == np.float32
    assert got.shape == (len(batch), resolved.spec.output_width)
    diffs.append(runtimes.output_difference(got, expected))
    assert diffs[-1] <= tolerance
  # The two photos' outputs differ far more than the runtimes do, so the
  # comparison is not trivially passed.
  out = session.predict(photos)
  assert np.abs(out[0] - out[1]).max() > 100 * max(diffs)
