"""Which observations a run takes, and which models see which.

``Filters`` holds the flags (``--quality_grade``, ``--taxon_id``,
``--route``); ``SnapshotConfig`` joins them to the tables, the template and
the models and decides, per observation, whether it is kept and which models
it is routed to.  Taxonomy filters work on subtrees: one set of taxon ids per
root taxon, built from ``taxa.ancestry`` (the '/'-separated list of ancestor
ids; a taxon is in its own subtree) inside the pipeline, by ``ReadSnapshot``.
"""

from __future__ import annotations

import dataclasses
from typing import FrozenSet, Iterator, Mapping, Optional, Sequence, Tuple

from natvision.transforms import config
from natvision.transforms import licenses
from natvision.transforms.snapshots.rows import ObservationRow, TaxonRow
from natvision.transforms.snapshots.tables import Snapshot
from natvision.transforms.snapshots.template import TemplateSources, UriTemplate

QUALITY_GRADES = ("research", "needs_id", "casual")


@dataclasses.dataclass(frozen=True)
class Filters:
  """Which observations a run takes, and which models see which.

  Attributes:
    quality_grades: grades kept; None keeps every observation.
    taxon_ids: roots of the taxonomy subtrees kept; empty keeps all taxa.
    routes: (model name, root taxon ids): the model sees only observations
      inside those subtrees.  Models without a route see all kept ones.
    licenses: the licences of the photos kept (``--license``, read from
      the photos table's ``license`` column); empty keeps every photo.
  """

  quality_grades: Optional[FrozenSet[str]] = frozenset({"research"})
  taxon_ids: Tuple[int, ...] = ()
  routes: Tuple[Tuple[str, Tuple[int, ...]], ...] = ()
  licenses: licenses.LicenseFilter = licenses.LicenseFilter()

  def __post_init__(self):
    if self.quality_grades is not None:
      if not self.quality_grades:
        raise config.ConfigError(
            "--quality_grade is empty; name a grade or 'any'")
      bad = sorted(set(self.quality_grades) - set(QUALITY_GRADES))
      if bad:
        raise config.ConfigError(
            f"--quality_grade {', '.join(bad)} is not one of "
            f"{', '.join(QUALITY_GRADES)} (or 'any')")
    names = [m for m, _ in self.routes]
    if len(set(names)) != len(names):
      raise config.ConfigError("--route names a model twice; give one --route "
                               "per model with comma-separated taxon ids")
    for model, roots in self.routes:
      if not roots:
        raise config.ConfigError(
            f"--route {model}= needs at least one taxon id")

  @property
  def roots(self) -> Tuple[int, ...]:
    """Every taxon whose subtree the run needs."""
    roots = list(self.taxon_ids)
    for _, ids in self.routes:
      roots.extend(ids)
    return tuple(sorted(set(roots)))

  @property
  def needs_taxa(self) -> bool:
    return bool(self.roots)

  def describe(self) -> dict:
    return {
        "quality_grade": (sorted(self.quality_grades)
                          if self.quality_grades is not None else "any"),
        "taxon_id": list(self.taxon_ids),
        "routes": {m: list(ids) for m, ids in self.routes},
        "license": sorted(self.licenses.keep),
    }


Subtrees = Mapping[int, FrozenSet[int]]


def in_subtrees(taxon_id: Optional[int], roots: Sequence[int],
                subtrees: Subtrees) -> bool:
  if taxon_id is None:
    return False
  return any(taxon_id in subtrees.get(root, ()) for root in roots)


def subtree_pairs(taxon: TaxonRow, roots: FrozenSet[int]
                  ) -> Iterator[Tuple[int, int]]:
  """(root, taxon_id) for each wanted root whose subtree holds the taxon."""
  for root in roots.intersection(taxon.ancestors + (taxon.taxon_id,)):
    yield root, taxon.taxon_id


@dataclasses.dataclass(frozen=True)
class SnapshotConfig:
  """What ReadSnapshot needs: the tables, the filters, the models."""

  snapshot: Snapshot
  template: UriTemplate
  sources: TemplateSources
  filters: Filters
  models: Tuple[str, ...]

  def __post_init__(self):
    if not self.models:
      raise config.ConfigError("SnapshotConfig needs at least one model")
    unknown = [m for m, _ in self.filters.routes if m not in self.models]
    if unknown:
      raise config.ConfigError(
          f"--route names {', '.join(unknown)}, which is not in --models "
          f"({', '.join(self.models)})")
    if self.filters.needs_taxa and self.snapshot.taxa is None:
      raise config.ConfigError("--taxon_id and --route need a taxa table in "
                               "the snapshot folder")

  def visible_models(self, taxon_id: Optional[int],
                     subtrees: Subtrees) -> Optional[Tuple[str, ...]]:
    """The models an observation of ``taxon_id`` goes to (None: all)."""
    if not self.filters.routes:
      return None
    routes = dict(self.filters.routes)
    return tuple(m for m in self.models
                 if m not in routes or in_subtrees(taxon_id, routes[m],
                                                   subtrees))

  def keeps(self, obs: ObservationRow, subtrees: Subtrees) -> bool:
    grades = self.filters.quality_grades
    if grades is not None and obs.quality_grade not in grades:
      return False
    if self.filters.taxon_ids and not in_subtrees(
        obs.taxon_id, self.filters.taxon_ids, subtrees):
      return False
    return True


@dataclasses.dataclass(frozen=True)
class RoutedObservation:
  """An observation that passed the filters, and the models it goes to."""

  observation: ObservationRow
  models: Optional[Tuple[str, ...]]
