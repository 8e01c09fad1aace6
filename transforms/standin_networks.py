"""The networks of the stand-in models, and their seeded random kernels.

Decides what a stand-in computes: per seed model (``STANDINS``), the full
size architecture (Inception-V4, MobileNetV2 at 299x299,
Inception-ResNet-V2, so that a benchmark costs what the real model costs)
or, with ``tiny``, a few small layers (``tiny_trunk``), with the head of
the registry's output width (``build_network``); and the He-normal kernels
drawn from a generator seeded by (seed, name), so the same seed gives the
same model whatever Keras' own generators do (``random_kernels``).

The weights mean nothing; the tiny stand-ins' scales and biases are set by
transforms/standin_calibration.py, the folders written by
transforms/standins.py.  Keras is imported inside the builders, so that
importing this module (for flag parsing) stays cheap.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Callable, Dict, List, Optional

import numpy as np

from natvision.transforms import models as registry


@dataclasses.dataclass(frozen=True)
class StandinSpec:
  """How one seed model is imitated.

  Attributes:
    name: registry name.
    architecture: what the full-size stand-in is, for messages and README.
    trunk: builds the full-size feature extractor, a tf_keras model from
      ``[n, size, size, 3]`` to ``[n, d]``.
    head: ``None`` when the trunk's output is the model output, else the
      activation of a dense head of the registry's output width (``"linear"``
      or ``"softmax"``).
  """

  name: str
  architecture: str
  trunk: Callable[[int], object]
  head: Optional[str]



def _conv(x, filters: int, kernel, strides: int = 1, padding: str = "same"):
  """Conv (no bias) + batch norm + ReLU, the Inception building block."""
  from tf_keras import layers  # pylint: disable=import-outside-toplevel
  kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
  x = layers.Conv2D(filters, kernel, strides=strides, padding=padding,
                    use_bias=False)(x)
  x = layers.BatchNormalization(scale=False, epsilon=1e-3)(x)
  return layers.Activation("relu")(x)


def _pool(x, kind: str, strides: int = 1, padding: str = "same"):
  from tf_keras import layers  # pylint: disable=import-outside-toplevel
  pool = layers.MaxPooling2D if kind == "max" else layers.AveragePooling2D
  return pool(3, strides=strides, padding=padding)(x)


def _concat(branches):
  from tf_keras import layers  # pylint: disable=import-outside-toplevel
  return layers.Concatenate(axis=-1)(branches)


def _inception_a(x):
  return _concat([
      _conv(x, 96, 1),
      _conv(_conv(x, 64, 1), 96, 3),
      _conv(_conv(_conv(x, 64, 1), 96, 3), 96, 3),
      _conv(_pool(x, "avg"), 96, 1),
  ])


def _reduction_a(x):
  return _concat([
      _conv(x, 384, 3, 2, "valid"),
      _conv(_conv(_conv(x, 192, 1), 224, 3), 256, 3, 2, "valid"),
      _pool(x, "max", 2, "valid"),
  ])


def _inception_b(x):
  b2 = _conv(x, 192, 1)
  for filters, kernel in ((192, (7, 1)), (224, (1, 7)), (224, (7, 1)),
                          (256, (1, 7))):
    b2 = _conv(b2, filters, kernel)
  return _concat([
      _conv(x, 384, 1),
      _conv(_conv(_conv(x, 192, 1), 224, (1, 7)), 256, (7, 1)),
      b2,
      _conv(_pool(x, "avg"), 128, 1),
  ])


def _reduction_b(x):
  b1 = _conv(_conv(_conv(x, 256, 1), 256, (1, 7)), 320, (7, 1))
  return _concat([
      _conv(_conv(x, 192, 1), 192, 3, 2, "valid"),
      _conv(b1, 320, 3, 2, "valid"),
      _pool(x, "max", 2, "valid"),
  ])


def _inception_c(x):
  b1 = _conv(x, 384, 1)
  b2 = _conv(_conv(_conv(x, 384, 1), 448, (3, 1)), 512, (1, 3))
  return _concat([
      _conv(x, 256, 1),
      _conv(b1, 256, (1, 3)), _conv(b1, 256, (3, 1)),
      _conv(b2, 256, (1, 3)), _conv(b2, 256, (3, 1)),
      _conv(_pool(x, "avg"), 256, 1),
  ])


def inception_v4(size: int = 299):
  """Inception-V4 (Szegedy et al. 2016, fig. 9), global-average-pooled.

  Returns a tf_keras model from ``[n, size, size, 3]`` to ``[n, 1536]``; at
  299x299 it has the paper's 35x35, 17x17 and 8x8 grids and about 41M
  weights.
  """
  import tf_keras  # pylint: disable=import-outside-toplevel
  inputs = tf_keras.Input((size, size, 3))
  # Stem (fig. 3).
  x = _conv(inputs, 32, 3, 2, "valid")
  x = _conv(x, 32, 3, 1, "valid")
  x = _conv(x, 64, 3)
  x = _concat([_pool(x, "max", 2, "valid"), _conv(x, 96, 3, 2, "valid")])
  x = _concat([
      _conv(_conv(x, 64, 1), 96, 3, 1, "valid"),
      _conv(_conv(_conv(_conv(x, 64, 1), 64, (7, 1)), 64, (1, 7)), 96, 3, 1,
            "valid"),
  ])
  x = _concat([_conv(x, 192, 3, 2, "valid"), _pool(x, "max", 2, "valid")])
  # 4 x Inception-A, Reduction-A, 7 x Inception-B, Reduction-B,
  # 3 x Inception-C.
  for _ in range(4):
    x = _inception_a(x)
  x = _reduction_a(x)
  for _ in range(7):
    x = _inception_b(x)
  x = _reduction_b(x)
  for _ in range(3):
    x = _inception_c(x)
  x = tf_keras.layers.GlobalAveragePooling2D()(x)
  return tf_keras.Model(inputs, x, name="inception_v4")


def mobilenet_v2(size: int = 299):
  """MobileNetV2 (alpha 1.0), global-average-pooled to 1280."""
  import tf_keras  # pylint: disable=import-outside-toplevel
  return tf_keras.applications.MobileNetV2(
      input_shape=(size, size, 3), alpha=1.0, include_top=False,
      weights=None, pooling="avg")


def inception_resnet_v2(size: int = 299):
  """Inception-ResNet-V2, global-average-pooled to 1536."""
  import tf_keras  # pylint: disable=import-outside-toplevel
  return tf_keras.applications.InceptionResNetV2(
      input_shape=(size, size, 3), include_top=False, weights=None,
      pooling="avg")


def tiny_trunk(size: int = 299):
  """Two small strided convolutions and a pooling: 16 features, ~1.4k weights.

  The input is pooled 4x first so that a forward pass costs next to nothing.
  """
  import tf_keras  # pylint: disable=import-outside-toplevel
  layers = tf_keras.layers
  inputs = tf_keras.Input((size, size, 3))
  x = layers.AveragePooling2D(4)(inputs)
  x = layers.Conv2D(8, 3, strides=2, activation="relu")(x)
  x = layers.Conv2D(16, 3, strides=2, activation="relu")(x)
  x = layers.GlobalAveragePooling2D()(x)
  return tf_keras.Model(inputs, x, name="tiny_trunk")


STANDINS: Dict[str, StandinSpec] = {
    s.name: s for s in (
        StandinSpec("inaturalist_v2",
                    "Inception-V4, average-pooled, dense 64 head",
                    inception_v4, head="linear"),
        StandinSpec("fungi_mobile_v1",
                    "MobileNetV2 (alpha 1.0) at 299x299, 4128-way softmax head",
                    mobilenet_v2, head="softmax"),
        StandinSpec("inception_resnet_v2",
                    "Inception-ResNet-V2, average-pooled to 1536",
                    inception_resnet_v2, head=None),
    )
}


def build_network(name: str, tiny: bool = False):
  """Builds the stand-in network for a registry name (random Keras weights).

  Returns a tf_keras model from float32 ``[n, size, size, 3]`` to float32
  ``[n, output_width]``.  Works both eagerly and inside a
  ``tf.Graph().as_default()`` block.
  """
  import tf_keras  # pylint: disable=import-outside-toplevel
  spec, standin = registry.get_spec(name), STANDINS[name]
  trunk = (tiny_trunk if tiny else standin.trunk)(spec.input_size)
  x = trunk.output
  # Tiny trunks always get a head, so that every output width is reached.
  head = standin.head or ("linear" if tiny else None)
  if head:
    x = tf_keras.layers.Dense(spec.output_width, activation=head,
                              name="head")(x)
  if x.shape[-1] != spec.output_width:
    raise AssertionError(f"{name}: stand-in width {x.shape[-1]} != "
                         f"{spec.output_width}")
  return tf_keras.Model(trunk.input, x, name=f"standin_{name}")


def random_kernels(variables, seed: int,
                   name: str) -> List[Optional[np.ndarray]]:
  """Draws He-normal values for every kernel in ``variables``, in order.

  Biases and batch-norm parameters keep their constant Keras initial values
  (zeros, ones), so the model is fully determined by (name, seed) and the
  architecture, whatever Keras' own random generators do.

  Returns:
    One array per variable, or None for variables that keep their initial
    value.
  """
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  values = []
  for v in variables:
    leaf = v.name.split("/")[-1].split(":")[0]
    shape = v.shape.as_list()
    if leaf == "depthwise_kernel":
      fan_in = shape[0] * shape[1]
    elif leaf == "kernel":
      fan_in = math.prod(shape[:-1])
    else:
      values.append(None)
      continue
    std = math.sqrt(2.0 / fan_in)
    values.append(rng.standard_normal(shape, dtype=np.float32) * std)
  return values
