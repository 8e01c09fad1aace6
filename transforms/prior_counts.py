"""Counting observations per taxon and H3 cell: the prior table's rows.

Two sources of observations (``find_observations``, at launch):

* an iNaturalist open-data snapshot folder: its ``observations`` table
  (found as transforms/snapshots/tables.py finds it: tab-separated,
  optionally gzipped, or Parquet; columns ``taxon_id``, ``quality_grade``,
  ``latitude``, ``longitude``), kept when ``quality_grade`` is one of
  ``--quality_grade`` (default ``research``);
* a GBIF download's occurrences (``occurrence.txt`` of a Darwin Core
  download, zipped as GBIF sends it or unzipped, a simple download's zipped
  ``<key>.csv``, or any tab-separated occurrence file or folder holding
  one): Darwin Core ``decimalLatitude``, ``decimalLongitude`` and
  ``taxonKey``; rows whose ``occurrenceStatus`` is ``ABSENT`` are left out
  (absence records say nothing of presence).

Each kept row becomes one ``(taxon_id, h3_cell)`` key at the chosen H3
resolution; ``Count.PerElement`` then gives ``n(taxon, cell)``.  A row that
is not counted is counted by reason (``SKIP_REASONS``), so
observations read = counted + skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import zipfile
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import config
from natvision.transforms import prior as prior_lib
from natvision.transforms import sources
from natvision.transforms import storage
from natvision.transforms.snapshots import tables

INATURALIST = "inaturalist"
GBIF = "gbif"
GBIF_FILE = "occurrence.txt"
# A zipped download: its occurrences are read from the member in place.
ZIP = "zip"
# (latitude, longitude, taxon) columns of each source.
COLUMNS = {INATURALIST: ("latitude", "longitude", "taxon_id"),
           GBIF: ("decimalLatitude", "decimalLongitude", "taxonKey")}
DEFAULT_QUALITY_GRADES = ("research",)

NO_COORDINATES = "no_coordinates"
INVALID_COORDINATES = "invalid_coordinates"
NO_TAXON = "no_taxon"
QUALITY_GRADE = "quality_grade"
ABSENT = "absent"
SKIP_REASONS = (NO_COORDINATES, INVALID_COORDINATES, NO_TAXON, QUALITY_GRADE,
                ABSENT)

# Tags of CountKeysFn's outputs.
SKIPPED_TAG = "skipped"


@dataclasses.dataclass(frozen=True)
class Observations:
  """Where the observations are and how to read them.

  Attributes:
    source: ``inaturalist`` or ``gbif``.
    files: the table's files, all with ``columns``.
    fmt: ``tsv``, ``parquet`` or ``zip`` (one zipped download per file).
    columns: the files' columns (header order).
    taxon_column: the column read as the taxon id.
    quality_grades: iNaturalist grades kept (ignored for GBIF).
  """

  source: str
  files: Tuple[str, ...]
  fmt: str
  columns: Tuple[str, ...]
  taxon_column: str
  quality_grades: Tuple[str, ...] = DEFAULT_QUALITY_GRADES

  @property
  def latitude(self) -> str:
    return COLUMNS[self.source][0]

  @property
  def longitude(self) -> str:
    return COLUMNS[self.source][1]

  @property
  def used_columns(self) -> Tuple[str, ...]:
    """The columns read, in this order, from each row."""
    extra = (("quality_grade",) if self.source == INATURALIST else
             (("occurrenceStatus",) if "occurrenceStatus" in self.columns
              else ()))
    return (self.latitude, self.longitude, self.taxon_column) + extra


def find_observations(path: str, taxon_column: Optional[str] = None,
                      quality_grades: Sequence[str] = DEFAULT_QUALITY_GRADES
                      ) -> Observations:
  """Finds the observations under ``path`` and checks their columns.

  Args:
    path: a snapshot folder, a GBIF download's zip, its ``occurrence.txt``
      (or a folder holding one), or a glob of tab-separated occurrence
      files.
    taxon_column: the taxon id column; default ``taxon_id`` (iNaturalist),
      ``taxonKey`` (GBIF).  GBIF's ``speciesKey`` counts subspecies under
      their species.
    quality_grades: iNaturalist grades kept.

  Raises:
    config.ConfigError: nothing found, or a column missing.
  """
  zipped = path.lower().endswith(".zip")
  table = None if zipped else tables.find_table(path, tables.OBSERVATIONS)
  if zipped:
    if not storage.exists(path):
      raise config.ConfigError(f"--observations {path}: no such file")
    source, files, fmt = GBIF, (path,), ZIP
    columns = zip_columns(path)
  elif table is not None:
    source, files, fmt, columns = (INATURALIST, table.files, table.fmt,
                                   table.columns)
  else:
    folder_file = storage.exists(path.rstrip("/") + "/" + GBIF_FILE)
    pattern = path.rstrip("/") + "/" + GBIF_FILE if folder_file else path
    files = tuple(storage.match(pattern))
    if not files:
      raise config.ConfigError(
          f"--observations {path}: no iNaturalist observations table "
          f"(observations.csv[.gz] or .parquet) and no GBIF {GBIF_FILE}; "
          f"give a snapshot folder or a GBIF download's occurrences")
    source, fmt = GBIF, (tables.PARQUET if files[0].endswith(".parquet")
                         else tables.TSV)
    columns = tables.read_columns(files[0], fmt)
  taxon_column = taxon_column or COLUMNS[source][2]
  needed = COLUMNS[source][:2] + (taxon_column,) + (
      ("quality_grade",) if source == INATURALIST else ())
  missing = [c for c in needed if c not in columns]
  if missing:
    raise config.ConfigError(
        f"--observations {files[0]} ({source}) lacks column(s) "
        f"{', '.join(missing)} (it has: {', '.join(columns)})")
  return Observations(source=source, files=tuple(files), fmt=fmt,
                      columns=tuple(columns), taxon_column=taxon_column,
                      quality_grades=tuple(quality_grades))


def _taxon(value) -> Optional[int]:
  try:
    return int(str(value).strip()) if value not in (None, "") else None
  except ValueError:
    return None


def key_of(values: Sequence, observations: Observations, resolution: int
           ) -> Tuple[Optional[Tuple[int, str]], Optional[str]]:
  """One row's ``(taxon_id, h3_cell)`` key, or why it is not counted.

  Args:
    values: the row's ``observations.used_columns``, in that order.

  Returns:
    (key, None) or (None, one of ``SKIP_REASONS``).
  """
  lat, lon, taxon = values[0], values[1], values[2]
  if observations.source == INATURALIST:
    if (values[3] or "").strip() not in observations.quality_grades:
      return None, QUALITY_GRADE
  elif len(values) > 3 and (values[3] or "").strip().upper() == "ABSENT":
    return None, ABSENT
  taxon = _taxon(taxon)
  if taxon is None:
    return None, NO_TAXON
  cell, reason = prior_lib.place_of(
      (("latitude", lat), ("longitude", lon)), resolution)
  if cell is None:
    return None, (INVALID_COORDINATES if reason == prior_lib.INVALID_COORDINATES
                  else NO_COORDINATES)
  return (taxon, cell), None


class CountKeysFn(beam.DoFn):
  """A row (a TSV line or a Parquet dict) -> its ``(taxon, cell)`` key;
  skipped rows' reasons on ``skipped``."""

  def __init__(self, observations: Observations, resolution: int):
    self._obs = observations
    self._resolution = resolution
    self._index = [observations.columns.index(c)
                   for c in observations.used_columns]

  def process(self, row) -> Iterable:
    if isinstance(row, dict):
      values = [row.get(c) for c in self._obs.used_columns]
    else:
      fields = row.rstrip("\r\n").split("\t")
      values = [fields[i] if i < len(fields) else None for i in self._index]
    key, reason = key_of(values, self._obs, self._resolution)
    if key is None:
      yield beam.pvalue.TaggedOutput(SKIPPED_TAG, reason)
    else:
      yield key


def _occurrence_member(z: zipfile.ZipFile, path: str) -> str:
  """The occurrences in a GBIF download's zip: ``occurrence.txt`` (a Darwin
  Core download) or the one ``.csv`` (a simple download, tab-separated)."""
  files = [m.filename for m in z.infolist() if not m.is_dir()]
  by_name = {os.path.basename(f): f for f in files}
  if GBIF_FILE in by_name:
    return by_name[GBIF_FILE]
  csvs = [f for f in files if f.lower().endswith(".csv")]
  if len(csvs) == 1:
    return csvs[0]
  raise config.ConfigError(
      f"--observations {path}: the zip holds no {GBIF_FILE} and not one "
      f".csv (it holds: {', '.join(sorted(by_name)[:10])})")


def _zip_lines(path: str) -> Iterator[str]:
  """The occurrence lines of a zipped download, header first, streamed from
  the member (a remote zip is read through Beam's seekable file)."""
  with FileSystems.open(path, compression_type="uncompressed") as f:
    with zipfile.ZipFile(f) as z:
      member = _occurrence_member(z, path)
      with z.open(member) as raw:
        yield from io.TextIOWrapper(raw, encoding="utf-8-sig",
                                    errors="replace")


def zip_columns(path: str) -> Tuple[str, ...]:
  """The header of a zipped download's occurrences.

  Raises:
    config.ConfigError: not a zip, or no occurrences in it.
  """
  try:
    with contextlib.closing(_zip_lines(path)) as lines:
      first = next(lines, "")
  except zipfile.BadZipFile as e:
    raise config.ConfigError(f"--observations {path}: not a zip file ({e})"
                             ) from e
  return tuple(c.strip() for c in first.rstrip("\r\n").split("\t"))


def _data_lines(path: str) -> Iterator[str]:
  lines = _zip_lines(path)
  next(lines, None)  # the header
  yield from lines


class ReadObservations(beam.PTransform):
  """PBegin -> rows of every file (TSV lines without header, or dicts).

  A zip cannot be split: one worker streams each zipped download's lines,
  and a Reshuffle spreads them for counting where that lets more than one
  worker count (``sources.spreads_work``: not on the one-worker
  DirectRunner, where it would only hold every line in memory).
  """

  def __init__(self, observations: Observations):
    super().__init__()
    self._obs = observations

  def expand(self, pbegin):
    reads = []
    for i, path in enumerate(self._obs.files):
      if self._obs.fmt == ZIP:
        read = (f"Zip[{i}]" >> beam.Create([path])
                | f"Unzip[{i}]" >> beam.FlatMap(_data_lines))
        if sources.spreads_work(pbegin.pipeline.options):
          read = read | f"Spread[{i}]" >> beam.Reshuffle()
      elif self._obs.fmt == tables.PARQUET:
        read = beam.io.ReadFromParquet(
            path, columns=list(self._obs.used_columns))
      else:
        read = beam.io.ReadFromText(path, skip_header_lines=1)
      reads.append(pbegin | f"Read[{i}]" >> read)
    return tuple(reads) | "AllRows" >> beam.Flatten()


def table_bytes(counts: Iterable[Tuple[Tuple[int, str], int]],
                skipped: Iterable[Tuple[str, int]], metadata: dict) -> bytes:
  """The prior table as Parquet bytes, rows sorted by (taxon, cell).

  Args:
    counts: ``((taxon_id, h3_cell), n)`` pairs.
    skipped: ``(reason, count)`` pairs.
    metadata: recorded beside the counts (resolution, source, input).
  """
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  rows = sorted(counts)
  skips: Dict[str, int] = {r: 0 for r in SKIP_REASONS}
  for reason, n in skipped:
    skips[reason] = skips.get(reason, 0) + n
  counted = sum(n for _, n in rows)
  meta = dict(metadata, observations=counted, skipped=skips,
              read=counted + sum(skips.values()), rows=len(rows),
              taxa=len({t for (t, _), _ in rows}),
              cells=len({c for (_, c), _ in rows}))
  table = pa.Table.from_pydict(
      {"taxon_id": [t for (t, _), _ in rows],
       "h3_cell": [c for (_, c), _ in rows],
       "n": [n for _, n in rows]}, schema=prior_lib.prior_schema(meta))
  sink = io.BytesIO()
  pq.write_table(table, sink, compression="zstd")
  return sink.getvalue()
