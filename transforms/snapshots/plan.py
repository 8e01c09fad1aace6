"""Deciding the work: which models still have to see each photo.

``SelectWork`` joins the snapshot's photos and the history on ``image_id``
(a CoGroupByKey) and decides, per photo, which models still have to see it
(``plan_photo``): those it is routed to, minus those whose table already
holds it, minus those for which it has failed ``max_attempts`` times.
Errors raised before any model ran (stages read, decode, prepare; the errors
table's ``model`` is null) count as an attempt for every model: they depend
on the photo, not on the model.  ``NewPhotos`` is the whole reader: the
snapshot, the history and the selection.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Optional, Sequence, Tuple

import apache_beam as beam

from natvision.transforms import config
from natvision.transforms.records import ImageRef
from natvision.transforms.snapshots.filters import SnapshotConfig
from natvision.transforms.snapshots.history import History, ReadHistory
from natvision.transforms.snapshots.read import ReadSnapshot
from natvision.transforms.snapshots.stats import STATS, CountingDoFn, flatten_stats

@dataclasses.dataclass(frozen=True)
class PhotoPlan:
  """What one run does with one photo that passed the filters.

  Attributes:
    ref: the photo, routed to the models to run now (None: nothing to do).
    new: models that see the photo in this run.
    done: models whose table already holds it.
    held_back: models for which it failed ``max_attempts`` times.
  """

  ref: Optional[ImageRef]
  new: Tuple[str, ...]
  done: Tuple[str, ...]
  held_back: Tuple[str, ...]


def plan_photo(candidates: Iterable[ImageRef], done: Iterable[str],
               failed: Iterable[Optional[str]], models: Sequence[str],
               max_attempts: int) -> Optional[PhotoPlan]:
  """Decides which models still have to see one photo.

  Args:
    candidates: the photo's ImageRefs from the snapshot (one per kept
      observation holding it); none means it did not pass the filters.  A
      photo shared by several observations goes to every model that any of
      them is routed to; its rows carry the fields of the observation whose
      uuid sorts first.
    done: models whose table holds the photo in an earlier partition.
    failed: the ``model`` of each earlier error row of the photo (None for
      errors before any model, which count for every model).
    models: the run's models, in order.
    max_attempts: error rows after which a model stops retrying the photo.

  Returns:
    None when the photo did not pass the filters, else its PhotoPlan.
  """
  candidates = list(candidates)
  if not candidates:
    return None
  # The photo's rows carry the fields of the observation whose uuid sorts
  # first; it goes to a model when any of its observations qualifies.
  ref = min(candidates, key=lambda r: (r.extra_dict().get("observation_uuid")
                                       or "", r.uri))
  routes = [c.models for c in candidates]
  if any(r is None for r in routes):
    ref = dataclasses.replace(ref, models=None)
  else:
    qualifying = set().union(*routes)
    ref = dataclasses.replace(
        ref, models=tuple(m for m in models if m in qualifying))
  done = set(done)
  failed = list(failed)
  before_models = sum(1 for m in failed if m is None)
  new, already, held = [], [], []
  for model in models:
    if not ref.routed_to(model):
      continue
    if model in done:
      already.append(model)
    elif before_models + sum(1 for m in failed if m == model) >= max_attempts:
      held.append(model)
    else:
      new.append(model)
  work = dataclasses.replace(ref, models=tuple(new)) if new else None
  return PhotoPlan(ref=work, new=tuple(new), done=tuple(already),
                   held_back=tuple(held))


class _SelectWorkFn(CountingDoFn):

  def __init__(self, models: Sequence[str], max_attempts: int):
    super().__init__()
    self._models = tuple(models)
    self._max_attempts = max_attempts
    self._new = {m: f"new_{m}" for m in self._models}
    self._done = {m: f"done_before_{m}" for m in self._models}
    self._held = {m: f"held_back_{m}" for m in self._models}

  def process(self, item) -> Iterator[ImageRef]:
    _, grouped = item
    candidates = list(grouped["candidates"])
    plan = plan_photo(candidates, grouped["done"], grouped["failed"],
                      self._models, self._max_attempts)
    if plan is None:
      return
    self._count("photos_passed")
    self._count("duplicate_photo_rows", len(candidates) - 1)
    for model in plan.new:
      self._count(self._new[model])
    for model in plan.done:
      self._count(self._done[model])
    for model in plan.held_back:
      self._count(self._held[model])
    if plan.ref is not None:
      yield plan.ref


class SelectWork(beam.PTransform):
  """{candidates, done, failed} keyed by image_id -> ImageRef still to do.

  With ``with_stats``, returns {"work": ..., STATS: (name, count) pairs}.

  Args:
    models: the run's model names.
    max_attempts: error rows after which a photo is not retried for a model.
  """

  def __init__(self, models: Sequence[str], max_attempts: int,
               with_stats: bool = False):
    super().__init__()
    if max_attempts < 1:
      raise config.ConfigError("--max_attempts must be at least 1")
    self._models = tuple(models)
    self._max_attempts = max_attempts
    self._with_stats = with_stats

  def expand(self, keyed):
    planned = (keyed
               | "JoinOnImageId" >> beam.CoGroupByKey()
               | "Plan" >> beam.ParDo(_SelectWorkFn(
                   self._models, self._max_attempts)).with_outputs(
                       STATS, main="work"))
    if not self._with_stats:
      return planned.work
    return {"work": planned.work, STATS: planned[STATS]}


class NewPhotos(beam.PTransform):
  """PBegin -> ImageRef for each photo and model still to do in this run.

  With ``with_stats``, returns {"work": ..., STATS: (name, count) pairs of
  the snapshot and of the plan}; ``SumStats`` sums them into one dict.
  """

  def __init__(self, config: SnapshotConfig, history: History,
               max_attempts: int, with_stats: bool = False):
    super().__init__()
    self._config = config
    self._history = history
    self._max_attempts = max_attempts
    self._with_stats = with_stats

  def expand(self, pbegin):
    read = pbegin | "ReadSnapshot" >> ReadSnapshot(self._config,
                                                   with_stats=True)
    earlier = pbegin | "ReadHistory" >> ReadHistory(self._history,
                                                    self._config.models)
    selected = ({"candidates": read["refs"], "done": earlier["done"],
                 "failed": earlier["failed"]}
                | "SelectWork" >> SelectWork(self._config.models,
                                             self._max_attempts,
                                             with_stats=True))
    if not self._with_stats:
      return selected["work"]
    return {"work": selected["work"],
            STATS: flatten_stats((read[STATS], selected[STATS]),
                                  "AllStats")}
