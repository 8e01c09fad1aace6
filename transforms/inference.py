"""Inference: batches of prepared photos through one model.

Each model runs on the runtime the launcher decided for it
(``ResolvedModel.decision``, see transforms/runtimes): the worker builds
that runtime with ``runtimes.for_model`` and never chooses one itself.  It is
loaded once per worker process and shared by all the threads of that
process through ``apache_beam.utils.shared``; the number of loads is counted
in the Beam counter ``natvision:model_loads_<model>``.  Photos travel as
uint8 up to here; the batch is stacked as uint8 and scaled to float32 in
[0, 1] inside the runtime.

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

from natvision.transforms import config
from natvision.transforms import models as models_lib
from natvision.transforms import prior as prior_lib
from natvision.transforms import runtimes
from natvision.transforms import taxonomy
from natvision.transforms.records import (ERRORS_TAG, STAGE_INFERENCE, EmbeddingResult,
                                ErrorRecord, PredictionResult, PreparedImage,
                                PriorAnswer, RollUpResult)

DEFAULT_BATCH_SIZE = 16
DEFAULT_TOP_K = 5


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
  """How one model runs.

  Attributes:
    model: the resolved model (location, preparation) with the runtime the
      launcher decided for it.
    batch_size: photos per forward pass.
    top_k: labels kept per photo for classifiers.

  Raises:
    ValueError: a bad batch size or top-k, or a model without a runtime
      decision.
  """

  model: models_lib.ResolvedModel
  batch_size: int = DEFAULT_BATCH_SIZE
  top_k: int = DEFAULT_TOP_K

  def __post_init__(self):
    check_settings(self.model, self.batch_size, self.top_k)
    self.model.require_decision()


def add_flags(parser) -> None:
  """Adds --batch_size and --top_k."""
  parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                      help="photos per forward pass")
  parser.add_argument("--top_k", type=int, default=DEFAULT_TOP_K,
                      help="labels kept per photo by classifiers")


def check_settings(model: models_lib.ResolvedModel, batch_size: int,
                   top_k: int) -> None:
  """Checks --batch_size and --top_k for a model, decided or not.

  Raises:
    ValueError: naming the flag.
  """
  if batch_size < 1:
    raise config.ConfigError("--batch_size must be at least 1")
  if top_k < 1:
    raise config.ConfigError("--top_k must be at least 1")
  if (model.spec.kind == models_lib.CLASSIFIER
      and top_k > model.spec.output_width):
    raise config.ConfigError(
        f"--top_k {top_k} is more than the {model.spec.output_width} "
        f"classes of {model.name}")


# Builds a model's runtime, not loaded yet; tests pass a fake one.
RuntimeFactory = Callable[[models_lib.ResolvedModel], runtimes.Runtime]


class _SharedModel:
  """What one process holds per model: the runtime and, for classifiers,
  labels and, with ``--taxa``, the roll-up (its sparse matrix built once)
  and, with ``--prior``, the prior's lookup (its table read once).

  A plain class (not a tuple) so that ``shared.Shared`` can weak-reference it.
  """

  def __init__(self, model: runtimes.Runtime, labels: Optional[List[str]],
               rollup: Optional[taxonomy.RollUp] = None,
               prior: Optional[prior_lib.PriorLookup] = None):
    self.model = model
    self.labels = labels
    self.rollup = rollup
    self.prior = prior


def load_shared(resolved: models_lib.ResolvedModel,
                make_runtime: RuntimeFactory = runtimes.for_model
                ) -> _SharedModel:
  """Loads a model on its decided runtime, and a classifier's labels.

  Raises:
    ModelError: the model, its ONNX check or its labelmap fails.
  """
  model = make_runtime(resolved)
  model.load()
  logging.info("model %s loaded on %s: %s", resolved.name, model.name,
               model.describe())
  labels = None
  if resolved.spec.kind == models_lib.CLASSIFIER:
    labels = models_lib.read_labelmap(resolved.labelmap_path,
                                      expected=resolved.spec.output_width)
  rollup = (taxonomy.RollUp(resolved.label_taxa)
            if resolved.label_taxa is not None else None)
  lookup = None
  if resolved.prior is not None and resolved.label_taxa is not None:
    lookup = prior_lib.PriorLookup(resolved.prior,
                                   resolved.label_taxa.label_taxon)
  return _SharedModel(model, labels, rollup, lookup)


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


# Tag of the output counting model loads: (model name, loads).
LOADS_TAG = "loads"


class RunModelFn(beam.DoFn):
  """List[PreparedImage] -> List[EmbeddingResult | PredictionResult].

  One output element per input batch keeps the sink's work per batch, not
  per photo; failures go one ErrorRecord per photo to ``errors``.
  """

  def __init__(self, config: InferenceConfig, shared_handle: shared.Shared,
               make_runtime: RuntimeFactory = runtimes.for_model):
    self._config = config
    self._shared_handle = shared_handle
    self._make_runtime = make_runtime
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
      return load_shared(resolved, self._make_runtime)

    self._held = self._shared_handle.acquire(
        construct, tag=f"{resolved.name}@{resolved.path}")

  def _count_loads(self) -> Iterator:
    # Counted in the graph (a ``loads`` element, summed for run.json, which
    # also works under template launches) and as a Beam counter.
    if self._loaded_here:
      self._loads.inc(self._loaded_here)
      yield beam.pvalue.TaggedOutput(
          LOADS_TAG, (self._config.model.name, self._loaded_here))
      self._loaded_here = 0

  def process(self, batch: Sequence[PreparedImage]) -> Iterator:
    yield from self._count_loads()
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
    taxa = [{}] * len(items)
    if self._held.rollup is not None:
      taxa = with_taxa(self._held.rollup, outputs, ids)
    priors = [None] * len(items)
    if self._held.prior is not None:
      priors = with_prior(self._held.prior, outputs, [p.ref for p in items],
                          ids, self._config.top_k, labels)
    return [
        PredictionResult(ref=p.ref, model=name, label_ids=i, scores=s,
                         labels=tuple(labels[j] for j in i), **_sizes(p),
                         **t, prior=answer)
        for p, i, s, t, answer in zip(items, ids, scores, taxa, priors)
    ]


def with_prior(lookup: prior_lib.PriorLookup, outputs: np.ndarray, refs,
               ids: np.ndarray, k: int, labels: Sequence[str]
               ) -> List[PriorAnswer]:
  """Per photo, its prior-adjusted top-k (transforms/prior.py).

  Args:
    lookup: the worker's prior.
    outputs: the batch's full image probabilities, ``[n, T]``.
    refs: the batch's ``ImageRef`` values (their carried coordinates).
    ids: the image-only top-k label ids, int ``[n, k]`` (the top-1 is the
      label ``expected_nearby`` asks about).
    k: ``--top_k``.
    labels: the labelmap's names.
  """
  adjusted = lookup.adjust(outputs, [r.extra for r in refs])
  prior_ids, prior_scores = top_k(adjusted.probabilities, k)
  label_taxon = lookup.label_taxon
  answers = []
  for i, cell in enumerate(adjusted.cells):
    first = int(ids[i][0])
    nearby = None
    if cell is not None and label_taxon[first] is not None:
      nearby = lookup.observed_near(cell, first)
    answers.append(PriorAnswer(
        applied=bool(adjusted.applied[i]), reason=adjusted.reasons[i],
        h3_cell=cell,
        cell_observations=(int(adjusted.cell_observations[i])
                           if cell is not None else None),
        label_ids=prior_ids[i], scores=prior_scores[i],
        labels=tuple(labels[j] for j in prior_ids[i]),
        taxon_ids=tuple(label_taxon[j] for j in prior_ids[i]),
        expected_nearby=nearby))
  return answers


def with_taxa(rollup: taxonomy.RollUp, outputs: np.ndarray,
              ids: np.ndarray) -> List[dict]:
  """Per photo, its top-k labels' taxa and its roll-up, as result fields.

  Args:
    rollup: the worker's roll-up.
    outputs: the batch's full probability vectors, ``[n, T]``.
    ids: the batch's top-k label ids, int ``[n, k]``.
  """
  label_taxa = rollup.label_taxa
  found = rollup(outputs)
  fields = []
  for row, node, score in zip(ids, found.node, found.score):
    answer = None
    if node >= 0:
      answer = RollUpResult(taxon_id=label_taxa.node_ids[node],
                            name=label_taxa.node_names[node],
                            rank=label_taxa.node_ranks[node],
                            score=float(score))
    fields.append({"taxon_ids": tuple(label_taxa.label_taxon[j] for j in row),
                   "rollup": answer})
  return fields


def _sizes(prepared: PreparedImage) -> Dict[str, int]:
  """The photo's source and decoded sizes, as result fields."""
  return {"source_width": prepared.source_width,
          "source_height": prepared.source_height,
          "decoded_width": prepared.decoded_width,
          "decoded_height": prepared.decoded_height}


class RunModel(beam.PTransform):
  """PCollection[PreparedImage] -> (results, errors, loads) for one model.

  ``results`` holds one list of results per batch; ``loads`` one
  (model name, number of loads) per worker process that loaded the model.

  Args:
    config: the model, with its runtime decision, and batch settings.
    make_runtime: builds the model's runtime from its decision;
      ``runtimes.for_model`` (tests pass a fake).
    shared_handle: the ``shared.Shared`` the model is held by in each
      process; give several RunModel of one model the same handle and a
      process loads the model once for all of them.  None: a new one.
  """

  def __init__(self, config: InferenceConfig,
               make_runtime: RuntimeFactory = runtimes.for_model,
               shared_handle: Optional[shared.Shared] = None):
    super().__init__()
    self._config = config
    self._make_runtime = make_runtime
    self._shared_handle = shared_handle or shared.Shared()

  def expand(self, prepared):
    size = self._config.batch_size
    name = self._config.model.name
    return (prepared
            | "Route" >> beam.Filter(lambda p: p.ref.routed_to(name))
            | "Batch" >> beam.BatchElements(min_batch_size=size,
                                            max_batch_size=size)
            | "Infer" >> beam.ParDo(
                RunModelFn(self._config, self._shared_handle,
                           self._make_runtime)
            ).with_outputs(ERRORS_TAG, LOADS_TAG, main="results"))

