"""The geographic prior: a classifier's scores re-weighted by where a photo is.

``natvision-prior`` (pipelines/build_prior.py) counts research-grade
observations per taxon and H3 cell into a Parquet table (``PRIOR_SCHEMA``:
``taxon_id`` int64, ``h3_cell`` string, ``n`` int64; its metadata under key
``natvision_prior`` gives the ``resolution``, the ``source`` and the
counts).  ``--prior PATH`` on ``natvision-embed`` and ``natvision-ingest``
applies it to every classifier (which needs ``--taxa``: the labels' taxon
ids are what the table counts).  For photo ``i`` in cell ``c`` and the
classifier's ``T`` labels (docs/prior.md; Mac Aodha et al. 2019,
"Presence-Only Geographical Priors for Fine-Grained Image Classification",
ICCV, in its counting form):

    p(t | image, place) ∝ p(t | image) · p(t | c) / p(t)
    p(t | c) = (n(t, c) + α) / (N(c) + α·T)
    p(t)     = (n(t) + α)    / (N + α·T)

renormalised over the ``T`` labels, with ``α = --prior_smoothing``.
``n(t, c)`` is the count of label ``t``'s taxon in cell ``c``, ``n(t)`` its
count over all cells; ``N(c)`` and ``N`` sum those counts over the distinct
taxa of the labels (the table keeps every taxon it counted; the classifier's
taxa are picked when a worker loads it, so one table serves every
classifier).  An unmatched label has ``n = 0`` everywhere.  Photos without
coordinates, with coordinates outside [-90, 90] x [-180, 180], or in a cell
with ``N(c) < --prior_min_observations`` keep their image scores
(``prior_applied`` false, ``prior_reason`` says why).

Coordinates come from the photo's carried columns (``ImageRef.extra``):
``decimalLatitude``/``decimalLongitude`` (Darwin Core: manifests and
archives), else ``latitude``/``longitude`` (an iNaturalist snapshot's
observations, natvision-ingest), in decimal degrees (WGS84).

The table is read once per worker process, with the model
(``inference.load_shared``, shared by the process's threads), into a
``PriorLookup``; a batch is re-weighted in one vectorised step
(``PriorLookup.adjust``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from natvision.transforms import config

DEFAULT_RESOLUTION = 4
DEFAULT_SMOOTHING = 1.0
DEFAULT_MIN_OBSERVATIONS = 100
METADATA_KEY = b"natvision_prior"
COLUMNS = ("taxon_id", "h3_cell", "n")
# Carried columns read for a photo's place, in order of preference.
COORDINATE_COLUMNS = (("decimalLatitude", "decimalLongitude"),
                      ("latitude", "longitude"))

# prior_reason values (null when the prior was applied).
NO_COORDINATES = "no_coordinates"
INVALID_COORDINATES = "invalid_coordinates"
FEW_OBSERVATIONS = "few_observations"


class PriorError(config.ConfigError):
  """A --prior table that cannot be used, or flags that do not fit it."""


def prior_schema(metadata: Optional[dict] = None):
  """The prior table's Arrow schema, with its metadata (JSON) when given."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  meta = ({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()}
          if metadata is not None else None)
  return pa.schema([pa.field("taxon_id", pa.int64(), nullable=False),
                    pa.field("h3_cell", pa.string(), nullable=False),
                    pa.field("n", pa.int64(), nullable=False)],
                   metadata=meta)


# --------------------------------------------------------------------------
# Places.


def cell_of(latitude: float, longitude: float, resolution: int) -> str:
  """The H3 cell (hex string) holding a WGS84 point at ``resolution``."""
  import h3  # pylint: disable=import-outside-toplevel
  return h3.latlng_to_cell(float(latitude), float(longitude), resolution)


def _float(value) -> Optional[float]:
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  try:
    number = float(value)
  except (TypeError, ValueError):
    return None
  return None if math.isnan(number) else number


def place_of(extra: Sequence[Tuple[str, Any]], resolution: int
             ) -> Tuple[Optional[str], Optional[str]]:
  """A photo's H3 cell from its carried columns (``COORDINATE_COLUMNS``).

  Returns:
    (cell, None), or (None, ``NO_COORDINATES`` | ``INVALID_COORDINATES``).
    Text values are parsed as decimal degrees; empty, unparseable and NaN
    values count as missing.
  """
  values = dict(extra)
  for lat_name, lon_name in COORDINATE_COLUMNS:
    if lat_name in values or lon_name in values:
      lat, lon = _float(values.get(lat_name)), _float(values.get(lon_name))
      if lat is None or lon is None:
        continue
      if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        return None, INVALID_COORDINATES
      return cell_of(lat, lon, resolution), None
  return None, NO_COORDINATES


# --------------------------------------------------------------------------
# The table.


@dataclasses.dataclass(frozen=True)
class PriorSettings:
  """What a classifier's workers need to apply the prior; travels with the
  model (``ResolvedModel.prior``).

  Attributes:
    path: the prior table (a Parquet file on any Beam filesystem).
    fingerprint: 32 hex digits of the file's bytes.
    resolution: the table's H3 resolution (photos are placed at it).
    smoothing: α, ``--prior_smoothing`` (pseudo-observations per taxon and
      cell).
    min_observations: ``--prior_min_observations``: cells with fewer
      observations of the labels' taxa keep the image scores.
    source: the table's ``source`` metadata (for run.json).
  """

  path: str
  fingerprint: str
  resolution: int
  smoothing: float = DEFAULT_SMOOTHING
  min_observations: int = DEFAULT_MIN_OBSERVATIONS
  source: str = ""

  def report(self) -> dict:
    """run.json's ``prior`` entry."""
    return dataclasses.asdict(self)


def _read_bytes(path: str) -> bytes:
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  with FileSystems.open(path) as f:
    return f.read()


def read_table(path: str, data: Optional[bytes] = None):
  """The prior table and its metadata.

  Returns:
    (pyarrow Table of ``COLUMNS``, metadata dict).

  Raises:
    PriorError: unreadable, a column missing, or no resolution recorded.
  """
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  fix = "--prior takes a table written by natvision-prior"
  try:
    data = _read_bytes(path) if data is None else data
    table = pq.read_table(io.BytesIO(data))
  except Exception as e:  # noqa: BLE001 - storage and parse errors alike
    raise PriorError(f"--prior {path} cannot be read: {e}; {fix}") from e
  missing = [c for c in COLUMNS if c not in table.column_names]
  raw = (table.schema.metadata or {}).get(METADATA_KEY)
  try:
    meta = json.loads(raw) if raw else {}
  except ValueError:
    meta = {}
  if missing or not isinstance(meta.get("resolution"), int):
    why = (f"lacks column(s) {', '.join(missing)}" if missing
           else "records no H3 resolution")
    raise PriorError(f"--prior {path} {why}; {fix}")
  return table.select(list(COLUMNS)), meta


def settings_for(path: str, smoothing: float = DEFAULT_SMOOTHING,
                 min_observations: int = DEFAULT_MIN_OBSERVATIONS,
                 label_taxon: Sequence[Optional[int]] = ()
                 ) -> PriorSettings:
  """Reads the table once at launch: its fingerprint and resolution.

  Args:
    label_taxon: a classifier's labels' taxa; when given, at least one must
      be in the table (else the table counts another taxonomy's ids).

  Raises:
    PriorError: unreadable, or none of the labels' taxa in it.
  """
  try:
    data = _read_bytes(path)
  except Exception as e:  # noqa: BLE001
    raise PriorError(f"--prior {path} cannot be read: {e}") from e
  table, meta = read_table(path, data)
  taxa = {t for t in label_taxon if t is not None}
  if taxa:
    present = set(table.column("taxon_id").to_pylist())
    if not taxa & present:
      raise PriorError(
          f"--prior {path} counts none of the {len(taxa)} taxa of the "
          f"classifier's labels; build it from observations whose taxon ids "
          f"are those of --taxa (iNaturalist ids with an iNaturalist taxa "
          f"table, GBIF taxonKeys with GBIF's backbone)")
  return PriorSettings(path=path,
                       fingerprint=hashlib.sha256(data).hexdigest()[:32],
                       resolution=int(meta["resolution"]),
                       smoothing=float(smoothing),
                       min_observations=int(min_observations),
                       source=str(meta.get("source", "")))


# --------------------------------------------------------------------------
# Applying it.


@dataclasses.dataclass(frozen=True)
class Adjusted:
  """A batch re-weighted by the prior.

  Attributes:
    probabilities: float64 ``[n, T]``: prior-adjusted where ``applied``,
      else the image scores as given.
    applied: bool ``[n]``.
    reasons: per photo None (applied) or why not.
    cells: per photo its H3 cell, None without coordinates.
    cell_observations: int64 ``[n]``: ``N(c)`` of the photo's cell (0 for
      an unseen cell; -1 without a cell).
  """

  probabilities: np.ndarray
  applied: np.ndarray
  reasons: List[Optional[str]]
  cells: List[Optional[str]]
  cell_observations: np.ndarray


class PriorLookup:
  """A prior table restricted to one classifier's labels; build once per
  worker process.

  Args:
    settings: the table and α, min observations.
    label_taxon: per label id, its taxon id (None: unmatched).
    table: the prior table (pyarrow); read from ``settings.path`` when None.
  """

  def __init__(self, settings: PriorSettings,
               label_taxon: Sequence[Optional[int]], table=None):
    self.settings = settings
    if table is None:
      table, _ = read_table(settings.path)
    self.labels = len(label_taxon)
    self.label_taxon = tuple(label_taxon)
    labels_of: Dict[int, List[int]] = {}
    for label, taxon in enumerate(label_taxon):
      if taxon is not None:
        labels_of.setdefault(int(taxon), []).append(label)
    taxa = np.asarray(table.column("taxon_id").to_numpy(), np.int64)
    keep = np.isin(taxa, np.fromiter(labels_of, np.int64, len(labels_of)))
    taxa = taxa[keep]
    cells = np.asarray(table.column("h3_cell").to_numpy(
        zero_copy_only=False), object)[keep]
    counts = np.asarray(table.column("n").to_numpy(), np.float64)[keep]
    per_taxon: Dict[int, float] = {}
    per_cell: Dict[str, Dict[int, float]] = {}
    for taxon, cell, n in zip(taxa.tolist(), cells.tolist(), counts.tolist()):
      per_taxon[taxon] = per_taxon.get(taxon, 0.0) + n
      row = per_cell.setdefault(cell, {})
      row[taxon] = row.get(taxon, 0.0) + n
    self.taxon_totals = np.zeros(self.labels)  # n(t), per label
    for taxon, n in per_taxon.items():
      self.taxon_totals[labels_of[taxon]] = n
    self.total = float(sum(per_taxon.values()))  # N
    # Per cell: (label ids, their counts, N(c)), label ids ascending.
    self._cells: Dict[str, Tuple[np.ndarray, np.ndarray, float]] = {}
    for cell, row in per_cell.items():
      pairs = sorted((label, n) for taxon, n in row.items()
                     for label in labels_of[taxon])
      self._cells[cell] = (np.asarray([l for l, _ in pairs], np.int64),
                           np.asarray([n for _, n in pairs], np.float64),
                           float(sum(row.values())))

  def cell_observations(self, cell: str) -> int:
    """``N(c)``: observations of the labels' taxa in the cell."""
    entry = self._cells.get(cell)
    return int(entry[2]) if entry else 0

  def observed_near(self, cell: str, label: int) -> bool:
    """Whether label's taxon was observed in the cell or a neighbour
    (``h3.grid_disk(cell, 1)``: the cell and its 6 neighbours)."""
    import h3  # pylint: disable=import-outside-toplevel
    for near in h3.grid_disk(cell, 1):
      entry = self._cells.get(near)
      if entry is not None:
        i = np.searchsorted(entry[0], label)
        if i < len(entry[0]) and entry[0][i] == label:
          return True
    return False

  def adjust(self, probabilities: np.ndarray,
             extras: Sequence[Sequence[Tuple[str, Any]]]) -> Adjusted:
    """Re-weights a batch (module docstring), vectorised over the batch.

    Args:
      probabilities: the image scores, ``[n, T]``.
      extras: per photo its carried columns (``ImageRef.extra``).
    """
    p = np.asarray(probabilities, np.float64)
    n, labels = p.shape
    if labels != self.labels:
      raise ValueError(f"scores have {labels} classes, the prior's labels "
                       f"{self.labels}")
    alpha, resolution = self.settings.smoothing, self.settings.resolution
    places = [place_of(e, resolution) for e in extras]
    cells, reasons = [c for c, _ in places], [r for _, r in places]
    observed = np.array([self.cell_observations(c) if c else -1
                         for c in cells], np.int64)
    for i, cell in enumerate(cells):
      if cell is not None and observed[i] < self.settings.min_observations:
        reasons[i] = FEW_OBSERVATIONS
    applied = np.array([r is None for r in reasons], bool)
    out = p.copy()
    rows = np.flatnonzero(applied)
    if rows.size:
      counts = np.zeros((rows.size, labels))  # n(t, c)
      for j, i in enumerate(rows):
        entry = self._cells.get(cells[i])  # None: a cell never observed
        if entry is not None:
          counts[j, entry[0]] = entry[1]
      in_cell = (counts + alpha) / (observed[rows, None] + alpha * labels)
      overall = (self.taxon_totals + alpha) / (self.total + alpha * labels)
      weighted = p[rows] * in_cell / overall[None, :]
      sums = weighted.sum(axis=1, keepdims=True)
      out[rows] = np.divide(weighted, sums, out=p[rows].copy(),
                            where=sums > 0)
    return Adjusted(probabilities=out, applied=applied, reasons=reasons,
                    cells=cells, cell_observations=observed)


# --------------------------------------------------------------------------
# Flags.


@dataclasses.dataclass(frozen=True)
class PriorConfig:
  """``--prior``, ``--prior_smoothing`` and ``--prior_min_observations``.

  Raises:
    PriorError: α not above 0, or a negative minimum.
  """

  prior: Optional[str] = None
  smoothing: float = DEFAULT_SMOOTHING
  min_observations: int = DEFAULT_MIN_OBSERVATIONS

  def __post_init__(self):
    if not (self.smoothing > 0 and math.isfinite(self.smoothing)):
      raise PriorError(f"--prior_smoothing must be above 0, not "
                       f"{self.smoothing}")
    if self.min_observations < 0:
      raise PriorError(f"--prior_min_observations must be 0 or more, not "
                       f"{self.min_observations}")

  @staticmethod
  def add_flags(parser) -> None:
    parser.add_argument(
        "--prior", metavar="PATH",
        help="geographic prior (a table written by natvision-prior; needs "
        "--taxa): adds prior-adjusted prior_top_k_* columns, prior_applied, "
        "prior_reason and expected_nearby to the predictions "
        "(docs/prior.md)")
    parser.add_argument(
        "--prior_smoothing", type=float, default=DEFAULT_SMOOTHING,
        help="with --prior: α, pseudo-observations added to every taxon's "
        "count in every cell")
    parser.add_argument(
        "--prior_min_observations", type=int,
        default=DEFAULT_MIN_OBSERVATIONS,
        help="with --prior: photos in cells with fewer observations of the "
        "labels' taxa keep their image scores")

  @classmethod
  def from_args(cls, args) -> "PriorConfig":
    return cls(prior=args.prior, smoothing=args.prior_smoothing,
               min_observations=args.prior_min_observations)


def attach(models, prior: PriorConfig) -> tuple:
  """Each classifier with the prior's settings (``ResolvedModel.prior``).

  Call after ``taxonomy.attach``: the labels' taxa must be there.

  Raises:
    PriorError: ``--prior`` without ``--taxa``, an unreadable table, or one
      that counts none of a classifier's taxa.
  """
  if not prior.prior:
    return tuple(models)
  classifiers = [m for m in models if m.spec.kind == "classifier"]
  if not classifiers:
    raise PriorError("--prior re-weights classifiers' scores, and --models "
                     "names none")
  out = []
  for model in models:
    if model.spec.kind != "classifier":
      out.append(model)
      continue
    if model.label_taxa is None:
      raise PriorError("--prior needs --taxa: the prior counts taxa, and "
                       "the labels are matched to taxa by --taxa")
    settings = settings_for(prior.prior, prior.smoothing,
                            prior.min_observations,
                            model.label_taxa.label_taxon)
    out.append(dataclasses.replace(model, prior=settings))
  return tuple(out)
