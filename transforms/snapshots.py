"""Snapshots: find the photos of an iNaturalist open-data snapshot still to do.

iNaturalist publishes its open data as periodic snapshots of three tables
(``photos``, ``observations``, ``taxa``), tab-separated and unquoted,
optionally gzipped, or here also as Parquet with the same columns.  The
scheduled job (``pipelines.ingest_observations``) turns each snapshot into
the ``ImageRef`` values that still need work, entirely inside the pipeline:

1. ``ReadSnapshot`` reads the tables (only the columns it needs), keeps the
   observations that pass the filters (quality grade, a taxonomy subtree),
   routes each one to the models allowed to see it (``--route``), and joins
   photos to observations with a CoGroupByKey on ``observation_uuid``,
   leaving out the photos whose licence ``--license`` does not keep
   (counted as ``filtered_by_license``, never fetched).  The
   taxonomy subtrees are a side input: one set of taxon ids per root taxon
   (``taxa.ancestry`` is the '/'-separated list of ancestor ids; a taxon is in
   its own subtree).
2. ``ReadHistory`` reads, from the tables' earlier partitions, only the
   ``image_id`` column of each model's table and the ``image_id`` and
   ``model`` columns of the errors table.
3. ``SelectWork`` joins the two on ``image_id`` (a CoGroupByKey, so the
   launcher never holds the tens of millions of ids already processed) and
   decides, per photo, which models still have to see it: those it is routed
   to, minus those whose table already holds it, minus those for which it
   has failed ``max_attempts`` times.

Every count worth reporting (rows read, rows refused, observations and
photos that passed the filters, and per model the photos new, done before
and held back) is a Beam counter, for watching a running job, and is also
emitted as data: ``ReadSnapshot`` and ``NewPhotos`` with ``with_stats=True``
return a ``STATS`` PCollection of (name, count) pairs that ``SumStats`` turns
into one dict, so that the pipeline can write its own summary without the
launcher reading metrics (a Flex Template launch never does).

A photo's ``image_id`` is its ``photo_id`` as text: the key of the photo
store's paths, short, and stable across snapshots.  A photo attached to
several observations is processed once, with the observation whose uuid
sorts first among those that pass the filters.

Errors raised before any model ran (stages read, decode, prepare; the
errors table's ``model`` is null) count as an attempt for every model:
they depend on the photo, not on the model.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import gzip
import io
import string
from typing import (Any, Dict, FrozenSet, Iterable, Iterator, List, Mapping,
                    Optional, Sequence, Tuple)

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms import config
from transforms import licenses
from transforms import storage
from transforms import uris
from transforms.records import ImageRef

PHOTOS = "photos"
OBSERVATIONS = "observations"
TAXA = "taxa"
TABLES = (PHOTOS, OBSERVATIONS, TAXA)

TSV = "tsv"
PARQUET = "parquet"
# File names tried for each table, in order: name + suffix.
SUFFIXES = ((".csv", TSV), (".csv.gz", TSV), (".tsv", TSV), (".tsv.gz", TSV),
            (".parquet", PARQUET))

REQUIRED_COLUMNS = {
    PHOTOS: ("photo_id", "photo_uuid", "observation_uuid", "license"),
    OBSERVATIONS: ("observation_uuid", "taxon_id", "quality_grade",
                   "observed_on", "latitude", "longitude"),
    TAXA: ("taxon_id", "ancestry"),
}

QUALITY_GRADES = ("research", "needs_id", "casual")

PARTITION_KEY = "snapshot_date"
METRICS_NAMESPACE = "natvision"
COUNTER_PREFIX = "ingest_"
# The tagged output of (name, count) pairs; the names are the counters'
# without COUNTER_PREFIX.
STATS = "stats"

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


class SnapshotError(config.ConfigError):
  """A snapshot folder that cannot be used; the message says what to fix."""


def partition_name(date: datetime.date) -> str:
  """The Hive-style folder of one run: ``snapshot_date=YYYY-MM-DD``."""
  return f"{PARTITION_KEY}={date.isoformat()}"


def _counter(name: str):
  return beam.metrics.Metrics.counter(METRICS_NAMESPACE,
                                      COUNTER_PREFIX + name)


class _CountingDoFn(beam.DoFn):
  """A DoFn whose counts are Beam counters and also a ``STATS`` output.

  ``self._count(name, n)`` increments the counter; at the end of each bundle
  the bundle's counts go out as one (name, count) pair per name.  Outputs of
  a bundle that is retried are discarded with it, so the sums are exact,
  where a counter's attempted value may not be.  Apply with
  ``.with_outputs(STATS, main=...)``.
  """

  def start_bundle(self):
    self._tally = collections.Counter()
    self._counters = {}

  def _count(self, name: str, n: int = 1) -> None:
    if not n:
      return
    self._tally[name] += n
    counter = self._counters.get(name)
    if counter is None:
      counter = self._counters[name] = _counter(name)
    counter.inc(n)

  def finish_bundle(self):
    for name, n in sorted(self._tally.items()):
      yield beam.pvalue.TaggedOutput(
          STATS, beam.transforms.window.GlobalWindows.windowed_value(
              (name, n)))
    self._tally.clear()


class SumStats(beam.PTransform):
  """PCollection[(name, count)] -> one dict {name: total} ({} when empty)."""

  def expand(self, stats):
    return (stats
            | "SumPerName" >> beam.CombinePerKey(sum)
            | "ToDict" >> beam.combiners.ToDict())


def _flatten_stats(streams, label: str):
  streams = tuple(streams)
  return streams | label >> beam.Flatten()


# --------------------------------------------------------------------------
# Finding and checking the tables (at launch: headers only).


@dataclasses.dataclass(frozen=True)
class TableFiles:
  """One snapshot table: its files (all with the same columns) and format."""

  name: str
  fmt: str
  files: Tuple[str, ...]
  columns: Tuple[str, ...]

  def __post_init__(self):
    if self.fmt not in (TSV, PARQUET):
      raise ValueError(f"table {self.name}: format must be tsv or parquet")
    if not self.files:
      raise ValueError(f"table {self.name} has no files")


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """The tables of one snapshot folder."""

  root: str
  photos: TableFiles
  observations: TableFiles
  taxa: Optional[TableFiles] = None


def _open(path: str):
  raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
  if path.lower().endswith(".gz"):
    return gzip.GzipFile(fileobj=raw)
  return raw


def match_paths(pattern: str) -> List[str]:
  """Sorted paths matching a glob on any Beam filesystem; [] when none.

  Raises:
    storage.StorageError: the listing failed (an empty history would mean
      reprocessing everything, so a failure is never read as "none").
  """
  return storage.match(pattern)


def read_columns(path: str, fmt: str) -> Tuple[str, ...]:
  """The column names of one table file (the header line, or the schema).

  For Parquet only the footer is read: Beam's file handles are seekable.
  """
  if fmt == PARQUET:
    with _open(path) as f:
      return tuple(pq.ParquetFile(f).schema_arrow.names)
  with _open(path) as f:
    first = io.TextIOWrapper(f, encoding="utf-8-sig",
                             errors="replace").readline()
  return tuple(c.strip() for c in first.rstrip("\r\n").split("\t"))


def _candidates(root: str, name: str) -> List[Tuple[Tuple[str, ...], str]]:
  """(files, format) for each layout of ``name`` present under ``root``."""
  found = []
  for suffix, fmt in SUFFIXES:
    path = FileSystems.join(root, name + suffix)
    if storage.exists(path):
      found.append(((path,), fmt))
  if found:
    # A folder of parts is looked for only without a file: iNaturalist's
    # bucket holds photos.csv.gz next to photos/, its hundreds of millions
    # of photo files, which no one should list.
    return found
  folder = FileSystems.join(root, name)
  for suffix, fmt in SUFFIXES:
    parts = match_paths(FileSystems.join(folder, "*" + suffix))
    if parts:
      found.append((tuple(parts), fmt))
  return found


def find_table(root: str, name: str) -> Optional[TableFiles]:
  """Finds ``name.csv[.gz]``, ``name.tsv[.gz]``, ``name.parquet`` or a folder
  ``name/`` of such parts under ``root``; None when there is none.

  Raises:
    SnapshotError: several layouts of the same table, or parts whose
      columns differ.
  """
  found = _candidates(root, name)
  if not found:
    return None
  if len(found) > 1:
    raise SnapshotError(
        f"{root} holds the {name} table more than once "
        f"({', '.join(f[0][0] for f in found)}); keep one")
  files, fmt = found[0]
  try:
    headers = {path: read_columns(path, fmt) for path in files}
  except Exception as e:  # noqa: BLE001 - report any read failure
    raise SnapshotError(f"cannot read the {name} table in {root}: {e}") from e
  columns = headers[files[0]]
  for path, cols in headers.items():
    if cols != columns:
      raise SnapshotError(
          f"{path} has columns {', '.join(cols)} but {files[0]} has "
          f"{', '.join(columns)}; the parts of a table must agree")
  return TableFiles(name=name, fmt=fmt, files=files, columns=columns)


def open_snapshot(root: str, need_taxa: bool = False) -> Snapshot:
  """Finds the snapshot's tables and checks their columns.

  Args:
    root: the snapshot folder (local or gs://).
    need_taxa: whether a taxa table is required (taxonomy filters).

  Raises:
    SnapshotError: a table or a column missing, naming it.
  """
  tables = {}
  for name in TABLES:
    table = find_table(root, name)
    if table is None:
      if name == TAXA and not need_taxa:
        continue
      why = (" (--taxon_id and --route need it)" if name == TAXA else "")
      raise SnapshotError(
          f"{root} has no {name} table{why}: expected {name}.csv, "
          f"{name}.csv.gz or {name}.parquet (or a folder {name}/ of parts)")
    missing = [c for c in REQUIRED_COLUMNS[name] if c not in table.columns]
    if missing:
      hint = ("; the open-data tables are tab-separated, not comma-separated"
              if table.fmt == TSV and len(table.columns) == 1
              and "," in table.columns[0] else "")
      raise SnapshotError(
          f"the {name} table ({table.files[0]}) lacks column(s) "
          f"{', '.join(missing)} (it has: {', '.join(table.columns)}){hint}")
    tables[name] = table
  return Snapshot(root=root, photos=tables[PHOTOS],
                  observations=tables[OBSERVATIONS], taxa=tables.get(TAXA))


# --------------------------------------------------------------------------
# The photo URI template.


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
      raise config.ConfigError(f"--photo_uri_template {self.template!r}: {e}") from e
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


# --------------------------------------------------------------------------
# Filters and routes.


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
        raise config.ConfigError("--quality_grade is empty; name a grade or 'any'")
      bad = sorted(set(self.quality_grades) - set(QUALITY_GRADES))
      if bad:
        raise config.ConfigError(
            f"--quality_grade {', '.join(bad)} is not one of "
            f"{', '.join(QUALITY_GRADES)} (or 'any')")
    names = [m for m, _ in self.routes]
    if len(set(names)) != len(names):
      raise config.ConfigError("--route names a model twice; give one --route per "
                       "model with comma-separated taxon ids")
    for model, roots in self.routes:
      if not roots:
        raise config.ConfigError(f"--route {model}= needs at least one taxon id")

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


# --------------------------------------------------------------------------
# Typed rows.


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


# --------------------------------------------------------------------------
# Reading the tables inside the pipeline.


class _SplitLinesFn(_CountingDoFn):
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


class _ParseFn(_CountingDoFn):
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


def subtree_pairs(taxon: TaxonRow, roots: FrozenSet[int]
                  ) -> Iterator[Tuple[int, int]]:
  """(root, taxon_id) for each wanted root whose subtree holds the taxon."""
  for root in roots.intersection(taxon.ancestors + (taxon.taxon_id,)):
    yield root, taxon.taxon_id


def _count_subtrees(subtrees: Subtrees, roots: Sequence[int]) -> Subtrees:
  for root in roots:
    _counter(f"subtree_{root}").inc(len(subtrees.get(root, ())))
  return subtrees


def _subtree_stats(subtrees: Subtrees, roots: Sequence[int]
                   ) -> Iterator[Tuple[str, int]]:
  for root in roots:
    yield f"subtree_{root}", len(subtrees.get(root, ()))


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
      raise config.ConfigError("--taxon_id and --route need a taxa table in the "
                       "snapshot folder")

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


class _FilterObservationsFn(_CountingDoFn):

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


class _JoinFn(_CountingDoFn):
  """(observation_uuid, {photos, observation}) -> (image_id, ImageRef).

  A photo of a kept observation whose licence the filter does not keep is
  counted as ``filtered_by_license`` (once per photos row, as
  ``photos_filtered_out`` counts rows) and goes no further.
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
    routed = min(observations, key=repr)
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
            STATS: _flatten_stats(stats, "SnapshotStats")}


# --------------------------------------------------------------------------
# What earlier runs did.


@dataclasses.dataclass(frozen=True)
class History:
  """The committed files of earlier partitions (listed, not read).

  Attributes:
    done: (model, Parquet files of that model's table outside the current
      partition).
    errors: Parquet files of the errors table outside the current partition.
    partitions: the partition dates seen in any of these tables.
  """

  done: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
  errors: Tuple[str, ...] = ()
  partitions: Tuple[str, ...] = ()

  def files_for(self, model: str) -> Tuple[str, ...]:
    return dict(self.done).get(model, ())


def partition_files(table_root: str, exclude: Optional[str] = None
                    ) -> Dict[str, List[str]]:
  """Parquet files of ``table_root/snapshot_date=*/``, by partition folder.

  Args:
    exclude: a partition folder name to leave out (the date being run).
  """
  found: Dict[str, List[str]] = {}
  for path in match_paths(FileSystems.join(table_root, PARTITION_KEY + "=*",
                                      "*.parquet")):
    parent, _ = FileSystems.split(path)
    folder = FileSystems.split(parent)[1]
    if not storage.same_folder(path, FileSystems.join(table_root, folder)):
      continue  # deeper than one partition level
    if not folder.startswith(PARTITION_KEY + "=") or folder == exclude:
      continue
    found.setdefault(folder, []).append(path)
  return found


def unpartitioned_files(table_root: str) -> List[str]:
  """Parquet files directly in a table folder (an embed_images table)."""
  return match_paths(FileSystems.join(table_root, "*.parquet"))


def find_history(model_tables: Sequence[Tuple[str, str]], errors_root: str,
                 current: str) -> History:
  """Lists what earlier partitions hold, leaving out partition ``current``.

  Args:
    model_tables: (model name, table root such as DIR/embeddings/<model>).
    errors_root: DIR/errors.
    current: the partition folder of this run (``snapshot_date=...``).
  """
  done = []
  partitions = set()
  for model, root in model_tables:
    files = partition_files(root, exclude=current)
    partitions.update(files)
    done.append((model, tuple(p for f in sorted(files) for p in files[f])))
  errors = partition_files(errors_root, exclude=current)
  partitions.update(errors)
  return History(
      done=tuple(done),
      errors=tuple(p for f in sorted(errors) for p in errors[f]),
      partitions=tuple(sorted(f.split("=", 1)[1] for f in partitions)))


def _ids_with(table: pa.Table, model: str) -> Iterator[Tuple[str, str]]:
  for image_id in table.column("image_id").to_pylist():
    yield image_id, model


def _error_pairs(table: pa.Table) -> Iterator[Tuple[str, Optional[str]]]:
  yield from zip(table.column("image_id").to_pylist(),
                 table.column("model").to_pylist())


class ReadHistory(beam.PTransform):
  """PBegin -> {"done": (image_id, model), "failed": (image_id, model|None)}.

  Reads only the id column of each model's earlier partitions, and the id
  and model columns of the errors table's.
  """

  def __init__(self, history: History, models: Sequence[str]):
    super().__init__()
    self._history = history
    self._models = tuple(models)

  def expand(self, pbegin):
    done = []
    for model in self._models:
      done.append(
          pbegin
          | f"DoneFiles[{model}]" >> beam.Create(
              list(self._history.files_for(model)))
          | f"ReadDone[{model}]" >> beam.io.ReadAllFromParquetBatched(
              columns=["image_id"])
          | f"DoneIds[{model}]" >> beam.FlatMap(_ids_with, model))
    failed = (pbegin
              | "ErrorFiles" >> beam.Create(list(self._history.errors))
              | "ReadErrors" >> beam.io.ReadAllFromParquetBatched(
                  columns=["image_id", "model"])
              | "FailedIds" >> beam.FlatMap(_error_pairs))
    return {"done": tuple(done) | "AllDone" >> beam.Flatten(),
            "failed": failed}


# --------------------------------------------------------------------------
# Deciding the work.


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


class _SelectWorkFn(_CountingDoFn):

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
            STATS: _flatten_stats((read[STATS], selected[STATS]),
                                  "AllStats")}
