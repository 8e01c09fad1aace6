"""The --license filter: keep only photos under the licences asked for.

Licence values come in many spellings: creativecommons.org URLs (http or
https, any version, with or without a trailing slash or ``legalcode``),
``CC-BY-NC``, ``CC BY-NC 4.0``, ``cc_by_nc``, GBIF's ``CC_BY_NC_4_0``,
``© all rights reserved``, empty.  ``normalise`` maps each to one name of
``NAMES``; each name means exactly that licence (``cc-by`` is not
``cc-by-sa``).  Free text that names no licence, and an empty value, count
as ``none``.

The filter runs on photo references, before any byte is fetched; photos it
leaves out are counted as ``filtered_by_license`` in run.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import FrozenSet, Iterator, Optional, Sequence

import apache_beam as beam

from natvision.transforms import config
from natvision.transforms.records import ImageRef

CC = ("cc-by", "cc-by-sa", "cc-by-nd", "cc-by-nc", "cc-by-nc-sa",
      "cc-by-nc-nd")
NAMES = ("cc0", "pdm") + CC + ("all-rights-reserved", "none")
FILTERED_BY_LICENSE = "filtered_by_license"
SKIPPED_TAG = "skipped"
# Carried columns read for a photo's licence, in order of preference.
LICENSE_COLUMNS = ("license", "licence", "usageterms", "rights")

_CC_TEXT = re.compile(
    r"^(?:creative-?commons-?)?cc-?(0|by(?:-nc)?(?:-sa|-nd)?)"
    r"(?:-?v?[0-9][-.0-9]*)?(?:-(?:international|generic|unported|"
    r"legalcode|deed|igo))*$")


def normalise(value: Optional[str]) -> str:
  """The name (one of ``NAMES``) of a licence written any common way."""
  if value is None:
    return "none"
  text = str(value).strip().lower()
  if not text:
    return "none"
  url = re.search(r"creativecommons\.org/(licenses|publicdomain)/([a-z-]+)",
                  text)
  if url:
    kind, code = url.groups()
    if kind == "publicdomain":
      return {"zero": "cc0", "mark": "pdm"}.get(code, "none")
    name = f"cc-{code}"
    return name if name in CC else "none"
  flat = re.sub(r"[\s_/]+", "-", text).strip("-")
  match = _CC_TEXT.match(flat)
  if match:
    code = match.group(1)
    return "cc0" if code == "0" else f"cc-{code}"
  if "all rights reserved" in text or text in ("©", "(c)", "copyright"):
    return "all-rights-reserved"
  if flat in ("pdm", "public-domain", "public-domain-mark"):
    return "pdm"
  return "none"


def license_column(columns: Sequence[str]) -> Optional[str]:
  """The carried column that holds the licence, if any (any letter case)."""
  by_lower = {c.lower(): c for c in columns}
  return next((by_lower[c] for c in LICENSE_COLUMNS if c in by_lower), None)


@dataclasses.dataclass(frozen=True)
class LicenseFilter:
  """Which licences to keep; empty keeps every photo.

  Attributes:
    keep: names from ``NAMES``.
  """

  keep: FrozenSet[str] = frozenset()

  def __post_init__(self):
    unknown = sorted(set(self.keep) - set(NAMES))
    if unknown:
      raise config.ConfigError(
          f"--license: unknown licence name(s) {', '.join(unknown)}; use "
          f"names from {', '.join(NAMES)} (e.g. cc0,cc-by,cc-by-nc)")

  @property
  def active(self) -> bool:
    return bool(self.keep)

  def allows(self, value: Optional[str]) -> bool:
    return not self.keep or normalise(value) in self.keep

  @staticmethod
  def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--license", default="",
        help="keep only photos under these licences, comma-separated, from "
        f"{', '.join(NAMES)} (e.g. cc0,cc-by,cc-by-nc); read from the "
        "input's license column; the others are never fetched (default: "
        "every licence)")

  @classmethod
  def from_args(cls, args: argparse.Namespace) -> "LicenseFilter":
    """Raises ValueError on an unknown name."""
    names = [n.strip().lower() for n in args.license.split(",") if n.strip()]
    return cls(keep=frozenset(names))


def _split(ref: ImageRef, column: str, keep: FrozenSet[str]) -> Iterator:
  if normalise(ref.extra_dict().get(column)) in keep:
    yield ref
  else:
    yield beam.pvalue.TaggedOutput(SKIPPED_TAG, FILTERED_BY_LICENSE)


class FilterByLicense(beam.PTransform):
  """ImageRefs -> those under a kept licence (main) and ``skipped`` reasons.

  Args:
    license_filter: the licences to keep.
    column: the carried column holding each photo's licence.
  """

  def __init__(self, license_filter: LicenseFilter, column: str):
    super().__init__()
    self._keep = license_filter.keep
    self._column = column

  def expand(self, refs):
    return refs | "SplitByLicense" >> beam.FlatMap(
        _split, self._column, self._keep).with_outputs(SKIPPED_TAG,
                                                       main="kept")
