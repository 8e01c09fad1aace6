"""transforms/runtimes/tf.py: TensorFlow, the reference runtime.

On the session's tiny stand-ins (``tiny_models``): a uint8 batch goes in,
float32 rows of the model's width come out, the same for the same photo
whatever batch it is in; a predict before ``load()`` is refused; a model
remembered by the launcher is taken over, not loaded again.
"""

import numpy as np
import pytest

from tests.runtime_helpers import (  # noqa: F401  (fixtures)
    nothing_remembered, resolve, tf_loads)
from natvision.transforms import runtimes


def test_predict_maps_uint8_photos_to_float32_rows(tiny_models):
  resolved = resolve(tiny_models, "inaturalist_v2")
  runtime = runtimes.TFRuntime(resolved)
  with pytest.raises(RuntimeError, match="before load"):
    runtime.predict(np.zeros((1, 299, 299, 3), np.uint8))
  assert not runtime.is_loaded
  runtime.load()
  batch = np.random.default_rng(5).integers(0, 256, (3, 299, 299, 3),
                                            dtype=np.uint8)
  out = runtime.predict(batch)
  assert out.dtype == np.float32
  assert out.shape == (3, resolved.spec.output_width)
  assert np.isfinite(out).all()
  assert np.abs(out[0] - out[1]).max() > 1e-3  # photos are told apart
  # A photo's row does not depend on the others in its batch (float32
  # sums in another order: 1e-5 relative).
  np.testing.assert_allclose(runtime.predict(batch[1:2]), out[1:2],
                             rtol=1e-5, atol=1e-5)
  assert runtime.describe() == {"runtime": "tf", "model": "inaturalist_v2",
                                "path": resolved.path}


def test_a_remembered_model_is_taken_over(tiny_models, tf_loads):
  resolved = resolve(tiny_models, "fungi_mobile_v1")
  launcher = runtimes.TFRuntime(resolved)
  launcher.load()
  launcher.remember()
  worker = runtimes.TFRuntime(resolved)
  assert worker.key == launcher.key
  assert worker.key[:3] == ("tf", "fungi_mobile_v1", resolved.path)
  worker.load()
  assert worker.loaded is launcher.loaded
  assert tf_loads == ["fungi_mobile_v1"]  # the launcher's load only
  runtimes.forget()
  again = runtimes.TFRuntime(resolved)
  again.load()
  assert again.loaded is not launcher.loaded
  assert tf_loads == ["fungi_mobile_v1"] * 2
