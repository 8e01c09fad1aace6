"""The photo URI template: where a photo's bytes live, from its columns.

``--photo_uri_template`` names columns of the photos or observations table
(``gs://m/photos/{photo_id}/medium.{extension}``).  It is checked at launch
against the tables' columns, and split by table so that each table is read
with only the columns the template needs.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Mapping, Optional, Tuple

from natvision.transforms import config
from natvision.transforms.snapshots.tables import Snapshot, SnapshotError

@dataclasses.dataclass(frozen=True)
class UriTemplate:
  """Where a photo's bytes live: ``gs://m/photos/{photo_id}/medium.{extension}``.

  Fields name columns of the photos or the observations table; a column in
  both (``observer_id``) is taken from photos.  Values are substituted as
  text, without format specs.
  """

  template: str
  fields: Tuple[str, ...] = dataclasses.field(init=False)

  def __post_init__(self):
    fields = []
    try:
      parsed = list(string.Formatter().parse(self.template))
    except ValueError as e:
      raise config.ConfigError(
          f"--photo_uri_template {self.template!r}: {e}") from e
    for _, field, spec, conversion in parsed:
      if field is None:
        continue
      if not field.isidentifier():
        raise config.ConfigError(
            f"--photo_uri_template {self.template!r}: {{{field}}} is not a "
            f"column name; write fields such as {{photo_id}}")
      if spec or conversion:
        raise config.ConfigError(
            f"--photo_uri_template {self.template!r}: {{{field}}} may not "
            f"have a format spec or conversion")
      fields.append(field)
    if not fields:
      raise config.ConfigError(
          f"--photo_uri_template {self.template!r} names no column; every "
          f"photo would have the same path (use e.g. {{photo_id}})")
    object.__setattr__(self, "fields", tuple(dict.fromkeys(fields)))

  def format(self, values: Mapping[str, Optional[str]]) -> str:
    """The URI for one photo; empty when a field has no value."""
    if any(values.get(f) in (None, "") for f in self.fields):
      return ""
    return self.template.format(**{f: values[f] for f in self.fields})


@dataclasses.dataclass(frozen=True)
class TemplateSources:
  """Which table provides each template field (photos first)."""

  photos: Tuple[str, ...]
  observations: Tuple[str, ...]


def template_sources(template: UriTemplate, snapshot: Snapshot
                     ) -> TemplateSources:
  """Splits the template's fields by table.

  Raises:
    SnapshotError: a field that is a column of neither table.
  """
  photo_cols = set(snapshot.photos.columns)
  obs_cols = set(snapshot.observations.columns)
  unknown = [f for f in template.fields
             if f not in photo_cols and f not in obs_cols]
  if unknown:
    raise SnapshotError(
        f"--photo_uri_template names {', '.join(unknown)}, which is not a "
        f"column of photos ({', '.join(snapshot.photos.columns)}) or "
        f"observations ({', '.join(snapshot.observations.columns)})")
  return TemplateSources(
      photos=tuple(f for f in template.fields if f in photo_cols),
      observations=tuple(f for f in template.fields
                         if f not in photo_cols and f in obs_cols))
