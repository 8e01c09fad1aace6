"""TensorFlow: the reference runtime.

The model is loaded with ``transforms.models.load_model`` (``tensorflow_hub``,
TF1 Hub modules and TF2 SavedModels alike); every other runtime is checked
against this one's outputs on the probe batch.
"""

from __future__ import annotations

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

  def load(self) -> None:
    """Loads the model and checks its output width (models.load_model).

    Raises:
      ModelError: the model is missing or does not match the registry.
    """
    if self._model is None:
      self._model = models_lib.load_model(self.resolved)

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
