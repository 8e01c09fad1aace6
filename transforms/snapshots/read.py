"""Reading the snapshot inside the pipeline and joining photos to observations.

``ReadSnapshot`` reads the tables (only the columns it needs), keeps the
observations that pass the filters, routes each one to the models allowed
to see it (``--route``), and joins photos to observations with a
CoGroupByKey on ``observation_uuid``, leaving out photos whose licence
``--license`` does not keep.  The taxonomy subtrees are a side input built
from the taxa table.  Each photo of a kept observation becomes an
``ImageRef`` keyed by ``image_id``, its ``photo_id`` as text (the key of the
photo store's paths, short, and stable across snapshots), carrying the
``CARRIED`` columns.
"""

from __future__ import annotations

import math
from typing import Any, Dict, FrozenSet, Iterator, Optional, Sequence, Tuple

import apache_beam as beam
import pyarrow as pa

from natvision.transforms import licenses
from natvision.transforms import uris
from natvision.transforms.records import ImageRef
from natvision.transforms.snapshots.filters import (RoutedObservation, SnapshotConfig,
                                          Subtrees, subtree_pairs)
from natvision.transforms.snapshots.rows import (BadRow, ObservationRow, PhotoRow,
                                       observation_from_row, photo_from_row,
                                       taxon_from_row)
from natvision.transforms.snapshots.stats import (STATS, CountingDoFn, flatten_stats,
                                        ingest_counter)
from natvision.transforms.snapshots.tables import (OBSERVATIONS, PARQUET, PHOTOS,
                                         REQUIRED_COLUMNS, TAXA, TableFiles)
from natvision.transforms.snapshots.template import UriTemplate

# Observation fields carried into every table, with their types.
CARRIED: Tuple[Tuple[str, pa.DataType], ...] = (
    ("photo_id", pa.int64()),
    ("photo_uuid", pa.string()),
    ("observation_uuid", pa.string()),
    ("taxon_id", pa.int64()),
    ("quality_grade", pa.string()),
    ("observed_on", pa.date32()),
    ("latitude", pa.float64()),
    ("longitude", pa.float64()),
    ("license", pa.string()),
)


class _SplitLinesFn(CountingDoFn):
  """TSV line -> dict of the wanted columns (the files are unquoted)."""

  def __init__(self, table: TableFiles, columns: Sequence[str]):
    super().__init__()
    self._width = len(table.columns)
    self._wanted = tuple((c, table.columns.index(c)) for c in columns)
    self._bad = f"bad_rows_{table.name}"

  def process(self, line: str) -> Iterator[dict]:
    line = line.rstrip("\r\n")
    if not line:
      return
    values = line.split("\t")
    if len(values) != self._width:
      self._count(self._bad)
      return
    yield {c: values[i] for c, i in self._wanted}


class LenientUtf8Coder(beam.coders.Coder):
  """Decodes lines as UTF-8, replacing invalid bytes instead of failing.

  One stray byte in a snapshot of millions of rows should cost that row's
  text, not the run.
  """

  def encode(self, value: str) -> bytes:
    return value.encode("utf-8")

  def decode(self, encoded: bytes) -> str:
    return encoded.decode("utf-8", errors="replace")

  def is_deterministic(self) -> bool:
    return True


def _table_rows(table: pa.Table) -> Iterator[dict]:
  yield from table.to_pylist()


class ReadTableRows(beam.PTransform):
  """Reads some columns of a snapshot table as dicts, inside the pipeline.

  Plain TSV files are read with Beam's splittable text reader (one line is
  one row: the open-data files are unquoted); Parquet with Beam's Parquet
  reader, which reads only the wanted columns.

  Returns the rows, or with ``with_stats`` {"rows": ..., STATS: (name,
  count) pairs} (lines of the wrong width, which are skipped).
  """

  def __init__(self, table: TableFiles, columns: Sequence[str],
               with_stats: bool = False):
    super().__init__()
    missing = [c for c in columns if c not in table.columns]
    if missing:
      raise ValueError(f"table {table.name} has no column(s) {missing}")
    self._table = table
    self._columns = tuple(dict.fromkeys(columns))
    self._with_stats = with_stats

  def expand(self, pbegin):
    table = self._table
    files = pbegin | "Files" >> beam.Create(list(table.files))
    if table.fmt == PARQUET:
      rows = (files
              | "ReadParquet" >> beam.io.ReadAllFromParquetBatched(
                  columns=list(self._columns))
              | "ToRows" >> beam.FlatMap(_table_rows))
      stats = pbegin | "NoStats" >> beam.Create([])
    else:
      split = (files
               | "ReadLines" >> beam.io.ReadAllFromText(
                   skip_header_lines=1, coder=LenientUtf8Coder())
               | "SplitColumns" >> beam.ParDo(
                   _SplitLinesFn(table, self._columns)).with_outputs(
                       STATS, main="rows"))
      rows, stats = split.rows, split[STATS]
    return {"rows": rows, STATS: stats} if self._with_stats else rows


class _ParseFn(CountingDoFn):
  """dict -> typed row, counting the rows read and the rows refused."""

  def __init__(self, table: str, parse, *args):
    super().__init__()
    self._parse = parse
    self._args = args
    self._rows = f"snapshot_{table}"
    self._bad = f"bad_rows_{table}"

  def process(self, row: dict) -> Iterator:
    self._count(self._rows)
    try:
      yield self._parse(row, *self._args)
    except BadRow:
      self._count(self._bad)


class _SubtreesFn(beam.CombineFn):
  """(root, taxon_id) pairs -> {root: frozenset of taxon ids}."""

  def create_accumulator(self) -> Dict[int, set]:
    return {}

  def add_input(self, acc, pair):
    acc.setdefault(pair[0], set()).add(pair[1])
    return acc

  def merge_accumulators(self, accs):
    merged: Dict[int, set] = {}
    for acc in accs:
      for root, ids in acc.items():
        merged.setdefault(root, set()).update(ids)
    return merged

  def extract_output(self, acc) -> Dict[int, FrozenSet[int]]:
    return {root: frozenset(ids) for root, ids in acc.items()}


def _count_subtrees(subtrees: Subtrees, roots: Sequence[int]) -> Subtrees:
  for root in roots:
    ingest_counter(f"subtree_{root}").inc(len(subtrees.get(root, ())))
  return subtrees


def _subtree_stats(subtrees: Subtrees, roots: Sequence[int]
                   ) -> Iterator[Tuple[str, int]]:
  for root in roots:
    yield f"subtree_{root}", len(subtrees.get(root, ()))


class _FilterObservationsFn(CountingDoFn):

  def __init__(self, config: SnapshotConfig):
    super().__init__()
    self._config = config

  def process(self, obs: ObservationRow, subtrees: Optional[Subtrees] = None
              ) -> Iterator[Tuple[str, RoutedObservation]]:
    subtrees = subtrees or {}
    if not self._config.keeps(obs, subtrees):
      return
    self._count("observations_passed")
    yield obs.observation_uuid, RoutedObservation(
        observation=obs,
        models=self._config.visible_models(obs.taxon_id, subtrees))


def image_ref(photo: PhotoRow, routed: RoutedObservation,
              template: UriTemplate) -> ImageRef:
  """The ImageRef of one photo of a kept observation."""
  obs = routed.observation
  values = dict(obs.fields)
  values.update(photo.fields)
  carried = {
      "photo_id": photo.photo_id,
      "photo_uuid": photo.photo_uuid,
      "observation_uuid": obs.observation_uuid,
      "taxon_id": obs.taxon_id,
      "quality_grade": obs.quality_grade,
      "observed_on": obs.observed_on,
      "latitude": obs.latitude,
      "longitude": obs.longitude,
      "license": photo.license,
  }
  # A template given on a command line may hold bytes that are not UTF-8
  # (surrogate escapes): the tables get a readable uri, the read the path.
  location = template.format(values)
  shown = uris.readable(location)
  return ImageRef(image_id=str(photo.photo_id), uri=shown,
                  extra=tuple((name, carried[name]) for name, _ in CARRIED),
                  models=routed.models,
                  path=None if shown == location else location)


def _missing_first(value: Any) -> tuple:
  """Orders one column's values with None first, then NaN, then the rest."""
  if value is None:
    return (0,)
  if isinstance(value, float) and math.isnan(value):
    return (1,)
  return (2, value)


def observation_order(routed: RoutedObservation) -> tuple:
  """The sort key that picks one row among observations sharing a uuid.

  The observations table may hold an ``observation_uuid`` more than once;
  its photos take the row that sorts first by, in order: ``taxon_id``,
  ``quality_grade``, ``observed_on``, ``latitude``, ``longitude`` (each a
  missing value first, then in its own type's order), the template's fields
  (as text, a missing value first), then the models the row is routed to
  (None, all of them, first).  Only values decide, never the order in which
  the rows arrive.
  """
  obs = routed.observation
  return (tuple(_missing_first(v) for v in (
              obs.taxon_id, obs.quality_grade, obs.observed_on,
              obs.latitude, obs.longitude)),
          tuple((name, _missing_first(v)) for name, v in obs.fields),
          (routed.models is not None, routed.models or ()))


class _JoinFn(CountingDoFn):
  """(observation_uuid, {photos, observation}) -> (image_id, ImageRef).

  An observation listed more than once takes its first row by
  ``observation_order``.  A photo of a kept observation whose licence the
  filter does not keep is counted as ``filtered_by_license`` (once per
  photos row, as ``photos_filtered_out`` counts rows) and goes no further.
  """

  def __init__(self, template: UriTemplate,
               license_filter: licenses.LicenseFilter = (
                   licenses.LicenseFilter())):
    super().__init__()
    self._template = template
    self._licenses = license_filter

  def process(self, item) -> Iterator[Tuple[str, ImageRef]]:
    _, grouped = item
    photos = list(grouped[PHOTOS])
    observations = list(grouped[OBSERVATIONS])
    if not photos:
      return
    if not observations:
      self._count("photos_filtered_out", len(photos))
      return
    routed = min(observations, key=observation_order)
    for photo in photos:
      if not self._licenses.allows(photo.license):
        self._count(licenses.FILTERED_BY_LICENSE)
        continue
      ref = image_ref(photo, routed, self._template)
      yield ref.image_id, ref


def _read_and_parse(pbegin, table: TableFiles, columns: Sequence[str],
                    parse, label: str, stats: list, *args):
  """Reads a table's rows and parses them; appends its STATS streams."""
  read = pbegin | f"Read{label}" >> ReadTableRows(table, columns,
                                                  with_stats=True)
  parsed = read["rows"] | f"Parse{label}" >> beam.ParDo(
      _ParseFn(table.name, parse, *args)).with_outputs(STATS, main="rows")
  stats.extend([read[STATS], parsed[STATS]])
  return parsed.rows


class ReadSnapshot(beam.PTransform):
  """PBegin -> (image_id, ImageRef) for every photo of a kept observation.

  ``ImageRef.models`` carries the routing; a photo id may appear more than
  once (a photo in several observations); SelectWork keeps one.  With
  ``with_stats``, returns {"refs": ..., STATS: (name, count) pairs}.
  """

  def __init__(self, config: SnapshotConfig, with_stats: bool = False):
    super().__init__()
    self._config = config
    self._with_stats = with_stats

  def expand(self, pbegin):
    config = self._config
    snapshot, sources = config.snapshot, config.sources
    stats = []
    photos = (_read_and_parse(pbegin, snapshot.photos,
                              REQUIRED_COLUMNS[PHOTOS] + sources.photos,
                              photo_from_row, "Photos", stats, sources.photos)
              | "PhotosByObservation" >> beam.Map(
                  lambda p: (p.observation_uuid, p)))
    observations = _read_and_parse(
        pbegin, snapshot.observations,
        REQUIRED_COLUMNS[OBSERVATIONS] + sources.observations,
        observation_from_row, "Observations", stats, sources.observations)
    filter_fn = _FilterObservationsFn(config)
    if config.filters.needs_taxa:
      roots = frozenset(config.filters.roots)
      subtrees = (_read_and_parse(pbegin, snapshot.taxa,
                                  REQUIRED_COLUMNS[TAXA], taxon_from_row,
                                  "Taxa", stats)
                  | "InSubtrees" >> beam.FlatMap(subtree_pairs, roots)
                  | "Subtrees" >> beam.CombineGlobally(_SubtreesFn())
                  | "CountSubtrees" >> beam.Map(_count_subtrees,
                                                sorted(roots)))
      stats.append(subtrees | "SubtreeStats" >> beam.FlatMap(
          _subtree_stats, sorted(roots)))
      kept = observations | "FilterAndRoute" >> beam.ParDo(
          filter_fn, subtrees=beam.pvalue.AsSingleton(subtrees)).with_outputs(
              STATS, main="kept")
    else:
      kept = observations | "FilterAndRoute" >> beam.ParDo(
          filter_fn).with_outputs(STATS, main="kept")
    joined = ({PHOTOS: photos, OBSERVATIONS: kept.kept}
              | "JoinOnObservation" >> beam.CoGroupByKey()
              | "PhotoRefs" >> beam.ParDo(_JoinFn(
                  config.template, config.filters.licenses)).with_outputs(
                      STATS, main="refs"))
    stats.extend([kept[STATS], joined[STATS]])
    if not self._with_stats:
      return joined.refs
    return {"refs": joined.refs,
            STATS: flatten_stats(stats, "SnapshotStats")}
