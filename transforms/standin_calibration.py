"""Calibrated weights of the tiny stand-ins, so that photos get apart.

Decides the scales and biases of a tiny stand-in (``tiny_weights``): its
kernels are ``standin_networks.random_kernels``, then every convolution and
the head are calibrated on seeded synthetic images
(``calibration_images``), as explained below.  The outputs still mean
nothing; they only differ clearly between photos.
"""

from __future__ import annotations

import functools
from typing import List

import numpy as np

from natvision.transforms import models as registry
from natvision.transforms.standin_networks import build_network, random_kernels

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
