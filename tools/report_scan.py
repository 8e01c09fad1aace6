"""Bounded aggregates of a model table's columns, for the report.

The size and model sections read a table one record batch at a time
(``tables.iter_batches``: one file open, at most ``tables.BATCH_ROWS``
rows of the named columns in memory) and keep, across batches, only
figures whose size does not grow with the table's rows:

* counts, minimum and maximum, exact over every row;
* histograms with fixed bins (``MEGAPIXEL_EDGES``, ``SCORE_EDGES``), exact
  counts per bin over every row;
* top-1 label counts, bounded by the classifier's classes;
* a uniform random sample of at most ``k`` rows (``Reservoir``, Vitter's
  algorithm R), for the scatter plots, the PCA projection and the
  quantiles (median, quartiles).  With at most ``k`` rows the sample is
  the whole table in table order, so every figure equals the one computed
  on the whole column; with more, the quantiles are the sample's, and the
  section says so.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from natvision.tools import tables as tables_lib

# Rows kept for the size quantiles and the width-height scatter.
SIZE_SAMPLE_ROWS = 20000
# Rows kept for the score quantiles (and the dots when few).
SCORE_SAMPLE_ROWS = 20000
# Megapixel histogram: 0.25 MP bins up to 100 MP; larger photos count in
# the last bin.
MEGAPIXEL_EDGES = np.linspace(0.0, 100.0, 401)
# Top-1 score histogram: 20 bins over [0, 1].
SCORE_EDGES = np.linspace(0.0, 1.0, 21)


class Reservoir:
  """A uniform sample of at most ``k`` rows of a stream of record batches.

  Algorithm R, drawn a batch at a time with NumPy: row ``i`` (0-based, over
  the whole stream) enters when ``i < k``, else with probability
  ``k / (i + 1)``, replacing a slot drawn uniformly.  Rows that entered are
  kept as taken copies (``RecordBatch.take``), never the batch they came
  from, and are compacted to the ``k`` live rows once more than
  ``4 * k`` are held, so memory stays within ``5 * k`` rows of the columns
  read.  Deterministic for a given ``seed``.

  Attributes:
    k: the most rows kept.
    seen: rows offered so far.
  """

  def __init__(self, k: int, seed: int = 0):
    if k < 1:
      raise ValueError(f"a reservoir keeps at least one row, not {k}")
    self.k = k
    self.seen = 0
    self._rng = np.random.default_rng(seed)
    self._parts: List[pa.Table] = []
    self._held = 0  # rows in self._parts
    self._slots = np.full(k, -1, np.int64)  # slot -> index into the parts

  def add(self, batch: pa.RecordBatch) -> None:
    """Offers every row of ``batch``."""
    n = batch.num_rows
    if n == 0:
      return
    position = np.arange(self.seen, self.seen + n)
    self.seen += n
    slot = position.copy()
    late = position >= self.k
    slot[late] = self._rng.integers(0, position[late] + 1)
    enter = slot < self.k
    rows = np.flatnonzero(enter)
    if not len(rows):
      return
    slot = slot[enter]
    # A slot drawn twice in one batch keeps the later row (as one row at a
    # time would); the earlier one is never taken.
    last = np.sort(len(slot) - 1 - np.unique(slot[::-1],
                                             return_index=True)[1])
    rows, slot = rows[last], slot[last]  # in stream order
    self._parts.append(pa.Table.from_batches([batch.take(pa.array(rows))]))
    self._slots[slot] = self._held + np.arange(len(rows))
    self._held += len(rows)
    if self._held > 4 * self.k:
      self._compact()

  def _live(self) -> np.ndarray:
    return np.sort(self._slots[self._slots >= 0])

  def _compact(self) -> None:
    live = self._live()
    table = pa.concat_tables(self._parts, promote_options="default")
    kept = table.take(pa.array(live))
    used = self._slots >= 0
    self._slots[used] = np.searchsorted(live, self._slots[used])
    self._parts, self._held = [kept], len(live)

  def table(self) -> Optional[pa.Table]:
    """The sample, rows in stream order; None when no row was offered."""
    if not self._parts:
      return None
    table = pa.concat_tables(self._parts, promote_options="default")
    return table.take(pa.array(self._live()))

  @property
  def complete(self) -> bool:
    """The sample holds every row offered."""
    return self.seen <= self.k


def sample_rows(files: Sequence[tables_lib.TableFile], columns: Sequence[str],
                k: int, batch_rows: int = tables_lib.BATCH_ROWS,
                seed: int = 0) -> Reservoir:
  """A ``Reservoir`` of ``k`` rows of ``files``, read batch by batch."""
  reservoir = Reservoir(k, seed)
  for batch in tables_lib.iter_batches(files, columns, batch_rows):
    reservoir.add(batch)
  return reservoir


def _numbers(batch: pa.RecordBatch, name: str) -> np.ndarray:
  return batch.column(name).to_numpy(zero_copy_only=False).astype(float)


@dataclasses.dataclass(frozen=True)
class Spread:
  """min, median and max of one figure (median from the sample)."""

  low: float
  median: float
  high: float


@dataclasses.dataclass(frozen=True)
class SizeFigures:
  """Source sizes of one table's photos (rows with both sizes).

  Attributes:
    photos: rows with a width and a height.
    width, height: pixels; megapixels: width * height / 1e6.
    megapixel_counts: photos per bin of ``MEGAPIXEL_EDGES`` (every row).
    sample: ``uri``, width, height of up to ``SIZE_SAMPLE_ROWS`` rows
      (numpy arrays and a list, stream order).
    complete: the sample is every row (the medians are exact).
  """

  photos: int
  width: Spread
  height: Spread
  megapixels: Spread
  megapixel_counts: np.ndarray
  sample_w: np.ndarray
  sample_h: np.ndarray
  sample_uris: Tuple[str, ...]
  complete: bool


SIZE_COLUMNS = ("uri", "source_width", "source_height")


def size_figures(files: Sequence[tables_lib.TableFile],
                 sample_rows_kept: int = SIZE_SAMPLE_ROWS,
                 batch_rows: int = tables_lib.BATCH_ROWS
                 ) -> Optional[SizeFigures]:
  """Sizes from ``source_width``/``source_height`` of ``files``, read a
  batch at a time; None when no row has both.

  A model's table holds one row per photo (per partition), so rows are
  photos.
  """
  return size_figures_of_batches(
      tables_lib.iter_batches(files, SIZE_COLUMNS, batch_rows),
      sample_rows_kept)


def size_figures_of_batches(batches: Iterable[pa.RecordBatch],
                            sample_rows_kept: int = SIZE_SAMPLE_ROWS
                            ) -> Optional[SizeFigures]:
  """``size_figures`` of record batches with the ``SIZE_COLUMNS``."""
  reservoir = Reservoir(sample_rows_kept)
  counts = np.zeros(len(MEGAPIXEL_EDGES) - 1, np.int64)
  low = np.full(3, np.inf)
  high = np.full(3, -np.inf)
  for batch in batches:
    if "source_width" not in batch.schema.names or (
        "source_height" not in batch.schema.names):
      continue
    w = np.nan_to_num(_numbers(batch, "source_width"))
    h = np.nan_to_num(_numbers(batch, "source_height"))
    keep = (w > 0) & (h > 0)
    if not keep.any():
      continue
    batch = batch.filter(pa.array(keep))
    w, h = w[keep], h[keep]
    mp = w * h / 1e6
    counts += np.histogram(np.minimum(mp, MEGAPIXEL_EDGES[-1]),
                           MEGAPIXEL_EDGES)[0]
    for i, v in enumerate((w, h, mp)):
      low[i], high[i] = min(low[i], v.min()), max(high[i], v.max())
    reservoir.add(batch)
  sample = reservoir.table()
  if sample is None:
    return None
  sw = sample.column("source_width").to_numpy().astype(float)
  sh = sample.column("source_height").to_numpy().astype(float)
  uris = (sample.column("uri").to_pylist() if "uri" in sample.column_names
          else [""] * sample.num_rows)
  spreads = [Spread(float(low[i]), float(np.median(v)), float(high[i]))
             for i, v in enumerate((sw, sh, sw * sh / 1e6))]
  return SizeFigures(photos=reservoir.seen, width=spreads[0],
                     height=spreads[1], megapixels=spreads[2],
                     megapixel_counts=counts, sample_w=sw, sample_h=sh,
                     sample_uris=tuple(uris), complete=reservoir.complete)


@dataclasses.dataclass(frozen=True)
class ClassifierFigures:
  """A classifier table's top-1 labels and scores.

  Attributes:
    photos: rows.
    labels: top-1 label -> photos, every row, in first-seen order.
    score_counts: photos per bin of ``SCORE_EDGES`` (every row).
    low, high: the lowest and highest top-1 score (every row).
    sample_scores, sample_labels, sample_uris: up to
      ``SCORE_SAMPLE_ROWS`` rows, stream order.
    complete: the sample is every row (the quartiles are exact).
  """

  photos: int
  labels: Dict[str, int]
  score_counts: np.ndarray
  low: float
  high: float
  sample_scores: np.ndarray
  sample_labels: Tuple[object, ...]
  sample_uris: Tuple[str, ...]
  complete: bool

  def quantiles(self, qs: Iterable[float]) -> List[float]:
    """Score quantiles, the 0 and 1 ends exact, the others the sample's."""
    qs = list(qs)
    got = list(np.quantile(self.sample_scores, qs))
    return [self.low if q == 0 else self.high if q == 1 else v
            for q, v in zip(qs, got)]


def classifier_figures(files: Sequence[tables_lib.TableFile],
                       sample_rows_kept: int = SCORE_SAMPLE_ROWS,
                       batch_rows: int = tables_lib.BATCH_ROWS
                       ) -> ClassifierFigures:
  """Top-1 label counts and score figures of a classifier's ``files``."""
  labels: Dict[str, int] = collections.Counter()
  counts = np.zeros(len(SCORE_EDGES) - 1, np.int64)
  low, high = np.inf, -np.inf
  reservoir = Reservoir(sample_rows_kept)
  for batch in tables_lib.iter_batches(files, ["uri", "label", "score"],
                                       batch_rows):
    labels.update(batch.column("label").to_pylist())
    scores = np.nan_to_num(_numbers(batch, "score"))
    if len(scores):
      counts += np.histogram(np.clip(scores, 0.0, 1.0), SCORE_EDGES)[0]
      low, high = min(low, scores.min()), max(high, scores.max())
    reservoir.add(batch)
  sample = reservoir.table()
  if sample is None:
    return ClassifierFigures(0, {}, counts, 0.0, 0.0, np.zeros(0), (), (),
                             True)
  return ClassifierFigures(
      photos=reservoir.seen, labels=dict(labels), score_counts=counts,
      low=float(low), high=float(high),
      sample_scores=np.nan_to_num(
          sample.column("score").to_numpy(zero_copy_only=False).astype(
              float)),
      sample_labels=tuple(sample.column("label").to_pylist()),
      sample_uris=tuple(sample.column("uri").to_pylist()
                        if "uri" in sample.column_names
                        else [""] * sample.num_rows),
      complete=reservoir.complete)
