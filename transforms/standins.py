"""Writes stand-ins of the three seed models, in the seeds' exact formats.

Why: the iNaturalist and fungi TF1 Hub modules were removed from tfhub.dev in
2024 and cannot be downloaded any more, and Inception-ResNet-V2 is a 200 MB
download.  Tests, benchmarks and demos still need something that loads and
runs exactly like them.  A stand-in is a model folder with

* the seed's format: the legacy TF1 Hub format (a SavedModel with the empty
  tag set, a ``default`` signature taking ``images`` and returning
  ``default``, and a ``tfhub_module.pb`` marker) for ``inaturalist_v2`` and
  ``fungi_mobile_v1``; a TF2 SavedModel whose object is called as
  ``obj(images, training=False)`` for ``inception_resnet_v2``;
* the seed's input (float32 ``[n, 299, 299, 3]`` in [0, 1]) and output width
  (64; a 4128-way softmax plus a ``labelmap.csv``; 1536);
* by default, the seed's architecture (Inception-V4, MobileNetV2 at 299x299,
  Inception-ResNet-V2), so that a benchmark costs what the real model costs;
  with ``--tiny``, a few small layers, so that tests run in seconds, whose
  scales and biases are calibrated on synthetic images so that different
  photos get clearly different outputs (see ``tiny_weights``).

THE OUTPUTS OF A STAND-IN MEAN NOTHING.  Its weights are random (drawn from a
seeded generator, so the same seed gives the same model), not the published
ones: its embeddings carry no information about the photo and its fungi
"species" are placeholders.  Every folder gets a README.txt saying so.  Never
write stand-ins where real copies of the models are kept; this tool refuses to
replace a folder that it did not write itself.

The command is tools/standins.py (``natvision-standins``, ``python -m
tools.standins``); the writer is here, in transforms/, because
``natvision-embed --demo`` writes tiny stand-ins too, and pipelines/ never
import tools/.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import shutil
import zlib
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from natvision.transforms import models as registry

# The serialized ModuleDef proto of the TF1 Hub format: ``format: FORMAT_V3``
# (field 1, varint 1).  tensorflow_hub 0.16 only checks that the file exists.
TF1_MODULE_DEF = b"\x08\x01"

README = "README.txt"
README_MARKER = "STAND-IN MODEL"
MEANINGLESS = (
    "outputs of stand-in models are meaningless (random weights, not the "
    "published models); use them for tests and benchmarks only")


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


# --------------------------------------------------------------------------
# Architectures.  Keras is imported inside the builders so that importing
# this module (for flag parsing) stays cheap.


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


def random_kernels(variables, seed: int, name: str) -> List[Optional[np.ndarray]]:
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


# --------------------------------------------------------------------------
# Tiny stand-ins that tell photos apart.
#
# With plain He-normal kernels and zero biases, the tiny trunk's ReLU
# features are all positive and mostly follow the photo's brightness, so
# every photo got nearly the same embedding (cosine > 0.9998 between
# unrelated photos) and the same top-1 label.  The tiny stand-ins therefore
# start from the same random kernels and then set their scales and biases
# from a fixed, synthetic calibration set:
#
# * each convolution is rescaled and given a bias so that its pre-activation
#   has zero mean and unit variance per channel over the calibration images
#   (the data-dependent "LSUV" initialisation), so half of every ReLU's
#   responses survive and the features follow texture and colour;
# * the dense head's random kernel is preceded by a whitening of the pooled
#   features (their calibration mean subtracted, their covariance made the
#   identity, regularised), folded into the head's kernel and bias, so that
#   the head sees how a photo differs from a typical one rather than what
#   every photo shares;
# * the classifier's logits are scaled so that its softmax is not flat.
#
# The calibration images are seeded 1/f ("pink") noise with random mean
# colours and contrasts, which have the power spectrum of natural photos
# without being any particular photo.  The outputs still mean nothing.

CALIBRATION_IMAGES = 48
# Regularisation of the whitening, relative to the largest eigenvalue of the
# features' covariance: small directions are amplified at most ~3x relative
# to the largest, so noise in them cannot dominate.
WHITENING_EPS = 0.1
# Standard deviation the classifier's logits get on the calibration images.
CLASSIFIER_LOGIT_STD = 3.0


@functools.lru_cache(maxsize=4)
def calibration_images(seed: int, n: int = CALIBRATION_IMAGES,
                       size: int = 299) -> np.ndarray:
  """Seeded synthetic photos with natural-image statistics.

  Each image is 1/f^a noise per channel (a drawn in [0.8, 1.2]), mixed
  across channels, with a random mean colour and contrast.  Cached per
  process (the three stand-ins share them); the array is read-only.

  Returns:
    float32 ``[n, size, size, 3]`` in [0, 1]; the same seed gives the same
    images.
  """
  rng = np.random.default_rng([seed, 0x5EED])
  freq = np.fft.fftfreq(size)
  radius = np.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2)
  radius[0, 0] = 1.0
  images = np.empty((n, size, size, 3), np.float32)
  for i in range(n):
    exponent = rng.uniform(0.8, 1.2)
    channels = []
    for _ in range(3):
      spectrum = (rng.standard_normal((size, size))
                  + 1j * rng.standard_normal((size, size))) / radius ** exponent
      spectrum[0, 0] = 0.0
      noise = np.fft.ifft2(spectrum).real
      channels.append(noise / noise.std())
    mix = np.eye(3) + 0.3 * rng.standard_normal((3, 3))
    noise = np.stack(channels, axis=-1) @ mix.T
    image = rng.uniform(0.2, 0.7, 3) + noise * rng.uniform(0.05, 0.25)
    images[i] = np.clip(image, 0.0, 1.0)
  images.flags.writeable = False
  return images


def tiny_weights(name: str, seed: int) -> List[np.ndarray]:
  """Every weight of the tiny stand-in ``name``, calibrated (see above).

  Builds the tiny network eagerly (call it outside any ``tf.Graph`` block),
  draws its kernels with ``random_kernels`` and calibrates the convolutions
  and the head on ``calibration_images(seed)``.

  Returns:
    One array per entry of ``build_network(name, tiny=True).weights``, in
    that order.
  """
  import tf_keras  # pylint: disable=import-outside-toplevel
  tf_keras.backend.clear_session()
  network = build_network(name, tiny=True)
  for v, x in zip(network.weights, random_kernels(network.weights, seed, name)):
    if x is not None:
      v.assign(x)
  images = calibration_images(seed, size=registry.get_spec(name).input_size)
  for layer in network.layers:
    if not isinstance(layer, tf_keras.layers.Conv2D):
      continue
    activation = layer.activation
    layer.activation = tf_keras.activations.linear
    try:
      pre = tf_keras.Model(network.input, layer.output)(images).numpy()
    finally:
      layer.activation = activation
    mean = pre.mean(axis=(0, 1, 2))
    std = np.maximum(pre.std(axis=(0, 1, 2)), 1e-6)
    layer.kernel.assign(layer.kernel.numpy() / std)
    layer.bias.assign(-mean / std)
  head = network.get_layer("head")
  features = tf_keras.Model(network.input, head.input)(images).numpy()
  features = features.astype(np.float64)
  mean = features.mean(axis=0)
  eigenvalues, vectors = np.linalg.eigh(np.cov(features, rowvar=False))
  eigenvalues = np.maximum(eigenvalues, 0.0)
  eps = WHITENING_EPS * max(float(eigenvalues.max()), 1e-12)
  whiten = vectors @ np.diag(1.0 / np.sqrt(eigenvalues + eps)) @ vectors.T
  kernel = whiten @ head.kernel.numpy().astype(np.float64)
  bias = -mean @ kernel
  if registry.get_spec(name).kind == registry.CLASSIFIER:
    logits = features @ kernel + bias
    scale = CLASSIFIER_LOGIT_STD / max(float(logits.std()), 1e-12)
    kernel, bias = kernel * scale, bias * scale
  head.kernel.assign(kernel.astype(np.float32))
  head.bias.assign(bias.astype(np.float32))
  return [v.numpy() for v in network.weights]


# --------------------------------------------------------------------------
# Writers.


def _write_tf1_hub(path: str, name: str, tiny: bool, seed: int) -> int:
  """Saves a TF1 Hub format module at ``path``; returns its weight count."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tf_keras  # pylint: disable=import-outside-toplevel

  spec = registry.get_spec(name)
  size = spec.input_size
  calibrated = tiny_weights(name, seed) if tiny else None
  tf_keras.backend.clear_session()  # fresh layer names for every model
  with tf.Graph().as_default() as graph:
    images = tf.compat.v1.placeholder(
        tf.float32, [None, size, size, 3], name=spec.input_key)
    network = build_network(name, tiny)
    outputs = tf.identity(network(images, training=False),
                          name=spec.output_key)
    values = calibrated or random_kernels(network.weights, seed, name)
    # Feeding a variable's initial value replaces Keras' random draw with
    # ours, without adding assign ops to the saved graph.
    feed = {v.initial_value: x for v, x in zip(network.weights, values)
            if x is not None}
    with tf.compat.v1.Session(graph=graph) as sess:
      sess.run(tf.compat.v1.global_variables_initializer(), feed_dict=feed)
      signature = tf.compat.v1.saved_model.predict_signature_def(
          inputs={spec.input_key: images}, outputs={spec.output_key: outputs})
      builder = tf.compat.v1.saved_model.Builder(path)
      builder.add_meta_graph_and_variables(
          sess, tags=[], signature_def_map={spec.signature: signature},
          strip_default_attrs=True)
      builder.save()
    count = network.count_params()
  with open(os.path.join(path, registry.TF1_MODULE_MARKER), "wb") as f:
    f.write(TF1_MODULE_DEF)
  return count


def _write_tf2_saved_model(path: str, name: str, tiny: bool, seed: int) -> int:
  """Saves a callable TF2 SavedModel at ``path``; returns its weight count."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tf_keras  # pylint: disable=import-outside-toplevel

  spec = registry.get_spec(name)
  calibrated = tiny_weights(name, seed) if tiny else None
  tf_keras.backend.clear_session()
  network = build_network(name, tiny)
  values = calibrated or random_kernels(network.weights, seed, name)
  for v, x in zip(network.weights, values):
    if x is not None:
      v.assign(x)

  class StandinModule(tf.Module):
    """``obj(images, training=False)`` -> float32 ``[n, width]``."""

    def __init__(self):
      super().__init__(name=f"standin_{name}")
      # Only the variables are tracked.  Tracking the Keras model itself would
      # make tf.saved_model.save trace every layer, which is 4x slower and
      # adds nothing that hub.load users call.
      self._weights = list(network.weights)
      self._call = network.__call__

    @tf.function
    def __call__(self, images, training=False):
      return self._call(images, training=training)

  module = StandinModule()
  images = tf.TensorSpec([None, spec.input_size, spec.input_size, 3],
                         tf.float32)
  module.__call__.get_concrete_function(images, training=True)
  inference = module.__call__.get_concrete_function(images, training=False)

  @tf.function(input_signature=[images])
  def serve(images):  # pylint: disable=redefined-outer-name
    return {spec.output_key: inference(images)}

  tf.saved_model.save(module, path, signatures={
      "serving_default": serve.get_concrete_function()})
  return network.count_params()


def _write_labelmap(path: str, width: int) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "name"])
    for i in range(width):
      writer.writerow([i, f"standin species {i:04d}"])


def _readme(name: str, tiny: bool, seed: int, params: int) -> str:
  spec = registry.get_spec(name)
  architecture = ("tiny: two small convolutions and a dense head, scaled "
                  "and whitened on synthetic calibration images" if tiny
                  else STANDINS[name].architecture)
  lines = [
      f"{README_MARKER} - NOT THE PUBLISHED MODEL. ITS OUTPUTS MEAN NOTHING.",
      "",
      f"Stand-in for {name}, published at",
      f"  {spec.source}",
      "written by `python -m tools.standins`. Its weights are",
      f"random (seed {seed}); only the format, signature, input shape and",
      "output width match the real model, so that pipelines, tests and",
      "benchmarks run against it. Do not use its outputs for anything.",
      "",
      f"format: {spec.model_format}",
      f"architecture: {architecture}",
      f"weights: {params:,} (random)",
      f"input: float32 [n, {spec.input_size}, {spec.input_size}, 3] in [0, 1]",
      f"output: float32 [n, {spec.output_width}]",
  ]
  if spec.kind == registry.CLASSIFIER:
    lines.append(f"{spec.labelmap}: placeholder names, not species")
  return "\n".join(lines) + "\n"


def _is_standin(path: str) -> bool:
  try:
    with open(os.path.join(path, README), encoding="utf-8") as f:
      return f.read().startswith(README_MARKER)
  except OSError:
    return False


def write_standin(path: str, name: str, tiny: bool = False, seed: int = 0,
                  overwrite: bool = False) -> int:
  """Writes one stand-in at ``path`` (a local folder); returns its weights.

  The folder is written next to ``path`` and renamed into place when
  complete.

  Raises:
    FileExistsError: ``path`` exists and is not empty, and either
      ``overwrite`` is false or the folder was not written by this tool.
  """
  spec = registry.get_spec(name)
  if os.path.exists(path) and os.listdir(path):
    if not overwrite:
      raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    if not _is_standin(path):
      raise FileExistsError(
          f"{path} exists and was not written by this tool (no {README} "
          f"starting with {README_MARKER!r}); refusing to replace what may be "
          f"a real model")
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    if spec.model_format == registry.TF1_HUB:
      params = _write_tf1_hub(tmp, name, tiny, seed)
    else:
      params = _write_tf2_saved_model(tmp, name, tiny, seed)
    if spec.kind == registry.CLASSIFIER:
      _write_labelmap(os.path.join(tmp, spec.labelmap), spec.output_width)
    with open(os.path.join(tmp, README), "w", encoding="utf-8") as f:
      f.write(_readme(name, tiny, seed, params))
    if os.path.exists(path):
      shutil.rmtree(path)
    os.rename(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return params


def write_standins(output_dir: str, tiny: bool = False,
                   models: Optional[Sequence[str]] = None, seed: int = 0,
                   overwrite: bool = False,
                   log: Optional[Callable[[str], None]] = None
                   ) -> Dict[str, str]:
  """Writes stand-ins at ``<output_dir>/<name>/``, ready for --model_root.

  Args:
    output_dir: local folder; created if missing.
    tiny: small networks instead of the real architectures.
    models: registry names; all three when None.
    seed: seeds the random weights; the same seed gives the same outputs.
    overwrite: replace earlier stand-ins (never anything else).
    log: called with one line per model written.

  Returns:
    Registry name -> folder written.
  """
  names = list(models) if models else list(STANDINS)
  for name in names:
    registry.get_spec(name)  # raises ModelError for unknown names
  written = {}
  for name in names:
    path = os.path.join(output_dir, name)
    params = write_standin(path, name, tiny=tiny, seed=seed,
                           overwrite=overwrite)
    written[name] = path
    if log:
      spec = registry.get_spec(name)
      kind = "tiny" if tiny else STANDINS[name].architecture
      log(f"wrote stand-in {name} ({spec.model_format}, {kind}, "
          f"{params:,} random weights, output width {spec.output_width}) "
          f"to {path}")
  return written
