"""transforms/standin_networks.py: the stand-ins' networks and kernels.

The kernels are drawn for fake variables (a name and a shape are all that
``random_kernels`` reads), so the default tier needs no TensorFlow; the
slow tier builds the full-size MobileNetV2 and counts its weights.
"""

import math
import types

import numpy as np
import pytest

from natvision.transforms import models
from natvision.transforms import standin_networks
from natvision.transforms import standins as standin_models
from natvision.transforms.runtimes import tf as tf_runtime


def _variable(name, shape):
  return types.SimpleNamespace(
      name=name, shape=types.SimpleNamespace(as_list=lambda: list(shape)))


def test_kernels_are_he_normal_and_fixed_by_seed_and_name():
  variables = [_variable("conv/kernel:0", (3, 3, 64, 64)),
               _variable("conv/bias:0", (64,)),
               _variable("dw/depthwise_kernel:0", (3, 3, 64, 1)),
               _variable("bn/gamma:0", (64,))]
  drawn = standin_networks.random_kernels(variables, 0, "inaturalist_v2")
  assert drawn[1] is None and drawn[3] is None  # keep their initial values
  kernel, depthwise = drawn[0], drawn[2]
  assert kernel.shape == (3, 3, 64, 64) and kernel.dtype == np.float32
  # He-normal: std sqrt(2 / fan_in); 36864 draws, so within 2 %.
  assert kernel.std() == pytest.approx(math.sqrt(2 / (3 * 3 * 64)), rel=0.02)
  assert abs(kernel.mean()) < 0.01
  assert depthwise.std() == pytest.approx(math.sqrt(2 / 9), rel=0.05)
  again = standin_networks.random_kernels(variables, 0, "inaturalist_v2")
  np.testing.assert_array_equal(again[0], kernel)
  for seed, name in ((1, "inaturalist_v2"), (0, "fungi_mobile_v1")):
    other = standin_networks.random_kernels(variables, seed, name)
    assert not np.array_equal(other[0], kernel)


def _resolve(name, handle):
  return models.resolve_models([name], handles={name: handle})[0]


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(123)
  return rng.uniform(0, 1, (3, 299, 299, 3)).astype(np.float32)


@pytest.mark.slow
def test_full_size_fungi_is_mobilenet_v2(tmp_path, batch):
  written = standin_models.write_standins(str(tmp_path),
                                          models=["fungi_mobile_v1"])
  network = standin_networks.build_network("fungi_mobile_v1")
  mobilenet_v2_no_top = 2_257_984  # tf_keras, alpha 1.0, include_top=False
  assert network.count_params() == mobilenet_v2_no_top + 1280 * 4128 + 4128
  loaded = tf_runtime.load_model(_resolve("fungi_mobile_v1",
                                          written["fungi_mobile_v1"]))
  out = loaded.predict(batch)
  np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
