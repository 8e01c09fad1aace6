"""Inference: batches of prepared photos through one model.

Each model is loaded once per worker process and shared by all the threads
of that process through ``apache_beam.utils.shared``; the number of loads is
counted in the Beam counter ``natvision:model_loads_<model>``.  Photos travel
as uint8 up to here; the batch is stacked as uint8 and scaled to float32 in
[0, 1] inside TensorFlow.

If a batch fails, its photos are retried one by one so that only the photo
that fails becomes an error row (stage ``inference``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.utils import shared

from transforms import models as models_lib
from transforms.records import (ERRORS_TAG, STAGE_INFERENCE, EmbeddingResult,
                                ErrorRecord, PredictionResult, PreparedImage)

DEFAULT_BATCH_SIZE = 16
DEFAULT_TOP_K = 5


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
  """How one model runs.

  Attributes:
    model: the resolved model (location, preparation).
    batch_size: photos per forward pass.
    top_k: labels kept per photo for classifiers.
  """

  model: models_lib.ResolvedModel
  batch_size: int = DEFAULT_BATCH_SIZE
  top_k: int = DEFAULT_TOP_K

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError("--batch_size must be at least 1")
    if self.top_k < 1:
      raise ValueError("--top_k must be at least 1")
    if (self.model.spec.kind == models_lib.CLASSIFIER
        and self.top_k > self.model.spec.output_width):
      raise ValueError(
          f"--top_k {self.top_k} is more than the {self.model.spec.output_width} "
          f"classes of {self.model.name}")


class _SharedModel:
  """What one process holds per model: the model and, for classifiers, labels.

  A plain class (not a tuple) so that ``shared.Shared`` can weak-reference it.
  """

  def __init__(self, model: models_lib.LoadedModel,
               labels: Optional[List[str]]):
    self.model = model
    self.labels = labels


def load_model_on_runtime(resolved: models_lib.ResolvedModel):
  """Loads the model on the runtime the launcher chose for it."""
  if resolved.runtime == "tf":
    return models_lib.load_model(resolved)
  from transforms import runtimes  # pylint: disable=import-outside-toplevel
  # The launcher already compared the runtimes; the worker checks ONNX
  # against TF again on its own probe batch but does not re-time them.
  predictor, _, _ = runtimes.load_runtime(resolved, resolved.runtime,
                                          timing_runs=0)
  return predictor


def load_shared(resolved: models_lib.ResolvedModel,
                loader: Callable = load_model_on_runtime) -> _SharedModel:
  model = loader(resolved)
  labels = None
  if resolved.spec.kind == models_lib.CLASSIFIER:
    labels = models_lib.read_labelmap(resolved.labelmap_path,
                                      expected=resolved.spec.output_width)
  return _SharedModel(model, labels)


def top_k(scores: np.ndarray, k: int):
  """Indices and values of the k largest scores per row, descending.

  Ties are broken by the lower class id, so results are deterministic.
  """
  k = min(k, scores.shape[1])
  part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  part_scores = np.take_along_axis(scores, part, axis=1)
  order = np.lexsort((part, -part_scores), axis=1)
  ids = np.take_along_axis(part, order, axis=1).astype(np.int32)
  return ids, np.take_along_axis(scores, ids, axis=1).astype(np.float32)


class RunModelFn(beam.DoFn):
  """List[PreparedImage] -> List[EmbeddingResult | PredictionResult].

  One output element per input batch keeps the sink's work per batch, not
  per photo; failures go one ErrorRecord per photo to ``errors``.
  """

  def __init__(self, config: InferenceConfig, shared_handle: shared.Shared,
               loader: Callable = load_model_on_runtime):
    self._config = config
    self._shared_handle = shared_handle
    self._loader = loader
    self._held: Optional[_SharedModel] = None
    self._loaded_here = 0
    name = config.model.name
    self._loads = beam.metrics.Metrics.counter("natvision", f"model_loads_{name}")
    self._rows = beam.metrics.Metrics.counter("natvision", f"rows_{name}")
    self._errors = beam.metrics.Metrics.counter("natvision",
                                                f"inference_errors_{name}")

  def setup(self):
    resolved = self._config.model

    def construct():
      self._loaded_here += 1
      logging.info("loading %s from %s in this worker process", resolved.name,
                   resolved.path)
      return load_shared(resolved, self._loader)

    self._held = self._shared_handle.acquire(
        construct, tag=f"{resolved.name}@{resolved.path}")

  def _count_loads(self):
    if self._loaded_here:
      self._loads.inc(self._loaded_here)
      self._loaded_here = 0

  def process(self, batch: Sequence[PreparedImage]) -> Iterator:
    self._count_loads()
    policy = self._config.model.resize
    try:
      outputs = self._held.model.predict(
          np.stack([p.arrays[policy] for p in batch]))
      good = list(zip(batch, outputs))
    except Exception as e:  # noqa: BLE001
      logging.warning("batch of %d failed on %s (%s); retrying one by one",
                      len(batch), self._config.model.name, e)
      good = []
      for item in batch:
        try:
          out = self._held.model.predict(item.arrays[policy][None])[0]
          good.append((item, out))
        except Exception as item_error:  # noqa: BLE001
          self._errors.inc()
          yield beam.pvalue.TaggedOutput(ERRORS_TAG, ErrorRecord(
              ref=item.ref, stage=STAGE_INFERENCE,
              error=f"{type(item_error).__name__}: {item_error}",
              model=self._config.model.name))
    if not good:
      return
    self._rows.inc(len(good))
    yield self._results([g[0] for g in good], np.stack([g[1] for g in good]))

  def _results(self, items: List[PreparedImage], outputs: np.ndarray) -> list:
    name = self._config.model.name
    if self._config.model.spec.kind == models_lib.EMBEDDER:
      return [EmbeddingResult(ref=p.ref, model=name, embedding=out,
                              **_sizes(p))
              for p, out in zip(items, outputs)]
    ids, scores = top_k(outputs, self._config.top_k)
    labels = self._held.labels
    return [
        PredictionResult(ref=p.ref, model=name, label_ids=i, scores=s,
                         labels=tuple(labels[j] for j in i), **_sizes(p))
        for p, i, s in zip(items, ids, scores)
    ]


def _sizes(prepared: PreparedImage) -> Dict[str, int]:
  """The photo's source and decoded sizes, as result fields."""
  return {"source_width": prepared.source_width,
          "source_height": prepared.source_height,
          "decoded_width": prepared.decoded_width,
          "decoded_height": prepared.decoded_height}


class RunModel(beam.PTransform):
  """PCollection[PreparedImage] -> (results, errors) for one model.

  ``results`` holds one list of results per batch.
  """

  def __init__(self, config: InferenceConfig,
               loader: Callable = load_model_on_runtime):
    super().__init__()
    self._config = config
    self._loader = loader

  def expand(self, prepared):
    size = self._config.batch_size
    name = self._config.model.name
    return (prepared
            | "Route" >> beam.Filter(lambda p: p.ref.routed_to(name))
            | "Batch" >> beam.BatchElements(min_batch_size=size,
                                            max_batch_size=size)
            | "Infer" >> beam.ParDo(
                RunModelFn(self._config, shared.Shared(), self._loader)
            ).with_outputs(ERRORS_TAG, main="results"))

