"""TensorFlow: the reference runtime, and loading a model on it.

``load_model`` loads a model found by transforms/models.py with
``tensorflow_hub.load``, which understands both the legacy TF1 Hub format
(called through its ``default`` signature with ``images=``) and TF2
SavedModels (called directly), and checks it against its registry entry;
``LoadedModel`` is the loaded model behind one call.  Every other runtime is
checked against this one's outputs on the probe batch (or against the
outputs recorded when an ONNX file was made, see
transforms/runtimes/onnx.py).  TensorFlow is imported only when a model is
loaded or run.

A model loaded by the launcher and remembered there (``base.remember``) is
taken over by a worker of the same process instead of being loaded again.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import numpy as np
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import models as models_lib
from natvision.transforms.runtimes import base


class LoadedModel:
  """A loaded model behind one call: uint8 or float batch in, numpy out.

  ``predict`` takes a ``[n, size, size, 3]`` uint8 batch, scales it to
  float32 in [0, 1] inside TensorFlow and returns a float32 ``[n, width]``
  array.

  Attributes:
    resolved: the model.
    float_call: the model's own call, float32 images in [0, 1] -> output
      tensor; what ``predict`` runs and what an ONNX conversion converts.
  """

  def __init__(self, resolved: models_lib.ResolvedModel, obj, fn: Callable):
    self.resolved = resolved
    self._obj = obj  # keeps the loaded variables alive
    self.float_call = fn

  def predict(self, batch: np.ndarray) -> np.ndarray:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    images = tf.convert_to_tensor(batch)
    if images.dtype == tf.uint8:
      images = tf.cast(images, tf.float32) * (1.0 / 255.0)
    return np.asarray(self.float_call(images), dtype=np.float32)


def _tf1_call(resolved: models_lib.ResolvedModel, obj) -> Callable:
  spec = resolved.spec
  signatures = getattr(obj, "signatures", {})
  if spec.signature not in signatures:
    raise models_lib.ModelError(
        f"model {spec.name} at {resolved.path}: no signature "
        f"{spec.signature!r} (found {sorted(signatures)}); is this the "
        f"{spec.model_format} module {spec.source}?")
  fn = signatures[spec.signature]
  args, kwargs = fn.structured_input_signature
  if args or set(kwargs) != {spec.input_key}:
    raise models_lib.ModelError(
        f"model {spec.name} at {resolved.path}: signature {spec.signature!r} "
        f"takes {sorted(kwargs)}, expected only {spec.input_key!r}")
  if spec.output_key not in fn.structured_outputs:
    raise models_lib.ModelError(
        f"model {spec.name} at {resolved.path}: signature {spec.signature!r} "
        f"has outputs {sorted(fn.structured_outputs)}, expected "
        f"{spec.output_key!r}")
  key_in, key_out = spec.input_key, spec.output_key
  return lambda images: fn(**{key_in: images})[key_out]


def _tf2_call(resolved: models_lib.ResolvedModel, obj) -> Callable:
  if not callable(obj):
    raise models_lib.ModelError(
        f"model {resolved.name} at {resolved.path}: the SavedModel is not "
        f"callable; expected a TF2 SavedModel whose object takes images")
  return lambda images: obj(images, training=False)


def load_model(resolved: models_lib.ResolvedModel,
               check: bool = True) -> LoadedModel:
  """Loads a model with ``tensorflow_hub.load`` and checks it.

  The check runs one zero image through the model and compares the output
  width with the registry, so a wrong folder fails here, not in a worker.

  Raises:
    ModelError: the folder is missing, is not the expected format, or the
      model's signature or output width differ from the registry.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_hub as hub  # pylint: disable=import-outside-toplevel

  spec = resolved.spec
  path = resolved.path
  marker = models_lib.TF1_MODULE_MARKER
  if not (FileSystems.exists(FileSystems.join(path, "saved_model.pb"))
          or FileSystems.exists(FileSystems.join(path, "saved_model.pbtxt"))):
    raise models_lib.ModelError(
        f"model {spec.name}: no SavedModel at {path} (no saved_model.pb); put "
        f"a copy of {spec.source} there or pass --model_handle "
        f"{spec.name}=PATH")
  is_tf1 = FileSystems.exists(FileSystems.join(path, marker))
  if spec.model_format == models_lib.TF1_HUB and not is_tf1:
    raise models_lib.ModelError(
        f"model {spec.name} at {path}: no {marker}; expected the TF1 Hub "
        f"format module {spec.source}")
  if spec.model_format == models_lib.TF2_SAVED_MODEL and is_tf1:
    raise models_lib.ModelError(
        f"model {spec.name} at {path}: found {marker}, a TF1 Hub module; "
        f"expected a TF2 SavedModel ({spec.source})")
  local = models_lib.stage_locally(path)
  try:
    obj = hub.load(local)
  except Exception as e:  # noqa: BLE001 - TF raises many kinds
    raise models_lib.ModelError(
        f"model {spec.name} at {path} cannot be loaded: {e}") from e
  if spec.model_format == models_lib.TF1_HUB:
    fn = _tf1_call(resolved, obj)
  else:
    fn = _tf2_call(resolved, obj)
  model = LoadedModel(resolved, obj, fn)
  if check:
    size = spec.input_size
    try:
      out = model.predict(np.zeros((1, size, size, 3), np.uint8))
    except Exception as e:  # noqa: BLE001
      raise models_lib.ModelError(
          f"model {spec.name} at {path}: a probe batch of shape "
          f"[1, {size}, {size}, 3] failed: {e}") from e
    if out.shape != (1, spec.output_width):
      raise models_lib.ModelError(
          f"model {spec.name} at {path}: output shape {list(out.shape)} for "
          f"one image; the registry expects width {spec.output_width}")
  logging.info("loaded model %s from %s", spec.name, path)
  del tf
  return model


class TFRuntime:
  """A model run by TensorFlow; implements ``base.Runtime``.

  Args:
    resolved: the model.
  """

  name = base.RUNTIME_TF

  def __init__(self, resolved: models_lib.ResolvedModel):
    self.resolved = resolved
    self._model: Optional[LoadedModel] = None
    self._key: Optional[tuple] = None

  @property
  def key(self) -> tuple:
    """What identifies this model on TensorFlow in ``base.remember``: its
    registry name (the checks differ per entry), path and the fingerprint
    of its files (a model replaced at the same path is loaded anew)."""
    if self._key is None:
      fingerprint = None
      try:
        local = models_lib.stage_locally(self.resolved.path)
        if os.path.isdir(local):
          fingerprint = base.model_fingerprint(local)
      except Exception:  # noqa: BLE001 - load_model says what is wrong
        pass
      self._key = (base.RUNTIME_TF, self.resolved.name, self.resolved.path,
                   fingerprint)
    return self._key

  @property
  def is_loaded(self) -> bool:
    return self._model is not None

  def load(self) -> None:
    """Loads the model and checks its output width (``load_model``).

    A model this process loaded and remembered already is taken over.

    Raises:
      ModelError: the model is missing or does not match the registry.
    """
    if self._model is None:
      held = base.recall(self.key)
      self._model = (held if held is not None
                     else load_model(self.resolved))

  def remember(self) -> None:
    """Keeps the loaded model for the workers of this process."""
    base.remember(self.key, self.loaded)

  @property
  def loaded(self) -> LoadedModel:
    if self._model is None:
      raise RuntimeError(
          f"model {self.resolved.name}: TFRuntime.predict before load()")
    return self._model

  def predict(self, batch: np.ndarray) -> np.ndarray:
    """uint8 or [0, 1] float ``[n, s, s, 3]`` -> float32 ``[n, width]``."""
    return self.loaded.predict(batch)

  def float_function(self) -> Callable:
    """The model's call on float32 ``[n, size, size, 3]`` images in [0, 1].

    The very function ``predict`` calls, so that a conversion of it runs the
    same graph.
    """
    return self.loaded.float_call

  def describe(self) -> dict:
    return {"runtime": self.name, "model": self.resolved.name,
            "path": self.resolved.path}
