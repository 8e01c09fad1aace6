"""TensorFlow: the reference runtime.

The model is loaded with ``transforms.models.load_model`` (``tensorflow_hub``,
TF1 Hub modules and TF2 SavedModels alike); every other runtime is checked
against this one's outputs on the probe batch (or against the outputs
recorded when an ONNX file was made, see transforms/runtimes/onnx.py).

A model loaded by the launcher and remembered there (``base.remember``) is
taken over by a worker of the same process instead of being loaded again.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np

from transforms import models as models_lib
from transforms.runtimes import base


class TFRuntime:
  """A model run by TensorFlow; implements ``base.Runtime``.

  Args:
    resolved: the model.
  """

  name = base.RUNTIME_TF

  def __init__(self, resolved: models_lib.ResolvedModel):
    self.resolved = resolved
    self._model: Optional[models_lib.LoadedModel] = None
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
    """Loads the model and checks its output width (models.load_model).

    A model this process loaded and remembered already is taken over.

    Raises:
      ModelError: the model is missing or does not match the registry.
    """
    if self._model is None:
      held = base.recall(self.key)
      self._model = (held if held is not None
                     else models_lib.load_model(self.resolved))

  def remember(self) -> None:
    """Keeps the loaded model for the workers of this process."""
    base.remember(self.key, self.loaded)

  @property
  def loaded(self) -> models_lib.LoadedModel:
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
