"""Typed rows of the snapshot tables, parsed leniently.

The tables come as text (TSV) or typed values (Parquet); both become the
same frozen rows.  A row without what identifies it (a ``photo_id``, an
``observation_uuid``, a ``taxon_id``) raises ``BadRow`` and is counted and
skipped by the reader; an optional value that does not parse becomes None,
so one bad cell in millions of rows costs that cell, not the run.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Mapping, Optional, Sequence, Tuple

class BadRow(ValueError):
  """A snapshot row that cannot be used (counted, then skipped)."""


def _text(value: Any) -> Optional[str]:
  if value is None:
    return None
  text = str(value).strip()
  return text or None


def _int(value: Any, column: str, required: bool = False) -> Optional[int]:
  if isinstance(value, bool):
    raise BadRow(f"{column}: not an integer: {value!r}")
  if isinstance(value, int):
    return value
  text = _text(value)
  if text is None:
    if required:
      raise BadRow(f"{column} is empty")
    return None
  try:
    return int(text)
  except ValueError:
    try:
      number = float(text)
    except ValueError:
      number = None
    if number is not None and number.is_integer():
      return int(number)
    if required:
      raise BadRow(f"{column}: not an integer: {text!r}") from None
    return None


def _float(value: Any) -> Optional[float]:
  if value is None:
    return None
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  text = _text(value)
  if text is None:
    return None
  try:
    return float(text)
  except ValueError:
    return None


def _date(value: Any) -> Optional[datetime.date]:
  if isinstance(value, datetime.datetime):
    return value.date()
  if isinstance(value, datetime.date):
    return value
  text = _text(value)
  if text is None:
    return None
  try:
    return datetime.date.fromisoformat(text[:10])
  except ValueError:
    return None


def _fields(row: Mapping[str, Any], names: Sequence[str]
            ) -> Tuple[Tuple[str, Optional[str]], ...]:
  return tuple((n, _text(row.get(n))) for n in names)


@dataclasses.dataclass(frozen=True)
class PhotoRow:
  """One row of the photos table (one photo of one observation)."""

  photo_id: int
  photo_uuid: Optional[str]
  observation_uuid: str
  license: Optional[str]
  fields: Tuple[Tuple[str, Optional[str]], ...] = ()


@dataclasses.dataclass(frozen=True)
class ObservationRow:
  """One row of the observations table."""

  observation_uuid: str
  taxon_id: Optional[int]
  quality_grade: Optional[str]
  observed_on: Optional[datetime.date]
  latitude: Optional[float]
  longitude: Optional[float]
  fields: Tuple[Tuple[str, Optional[str]], ...] = ()


@dataclasses.dataclass(frozen=True)
class TaxonRow:
  """One row of the taxa table: the taxon and its ancestors, root first."""

  taxon_id: int
  ancestors: Tuple[int, ...]


def photo_from_row(row: Mapping[str, Any],
                   template_fields: Sequence[str] = ()) -> PhotoRow:
  """Builds a PhotoRow from a dict of text (TSV) or typed (Parquet) values.

  Raises:
    BadRow: no usable photo_id or observation_uuid.
  """
  observation_uuid = _text(row.get("observation_uuid"))
  if observation_uuid is None:
    raise BadRow("observation_uuid is empty")
  return PhotoRow(
      photo_id=_int(row.get("photo_id"), "photo_id", required=True),
      photo_uuid=_text(row.get("photo_uuid")),
      observation_uuid=observation_uuid,
      license=_text(row.get("license")),
      fields=_fields(row, template_fields))


def observation_from_row(row: Mapping[str, Any],
                         template_fields: Sequence[str] = ()
                         ) -> ObservationRow:
  """Builds an ObservationRow; unparsable optional values become None.

  Raises:
    BadRow: no observation_uuid.
  """
  observation_uuid = _text(row.get("observation_uuid"))
  if observation_uuid is None:
    raise BadRow("observation_uuid is empty")
  return ObservationRow(
      observation_uuid=observation_uuid,
      taxon_id=_int(row.get("taxon_id"), "taxon_id"),
      quality_grade=_text(row.get("quality_grade")),
      observed_on=_date(row.get("observed_on")),
      latitude=_float(row.get("latitude")),
      longitude=_float(row.get("longitude")),
      fields=_fields(row, template_fields))


def taxon_from_row(row: Mapping[str, Any]) -> TaxonRow:
  """Builds a TaxonRow; ``ancestry`` is '/'-separated ancestor ids.

  Raises:
    BadRow: no taxon_id, or an ancestry that is not a list of ids.
  """
  ancestry = _text(row.get("ancestry")) or ""
  try:
    ancestors = tuple(int(a) for a in ancestry.split("/") if a.strip())
  except ValueError:
    raise BadRow(f"ancestry is not '/'-separated ids: {ancestry!r}") from None
  return TaxonRow(taxon_id=_int(row.get("taxon_id"), "taxon_id",
                                required=True),
                  ancestors=ancestors)
