"""The errors table, aggregated for the report in bounded memory.

The counts come from the run summary where it has them (``errors`` of
run.json or runs/<date>.json: rows by stage, model and reason, and photos,
counted in the graph by transforms/summary.py over the same rows the table
holds, reused ones included).  The table itself is then scanned only for a
few example URIs per reason shown, and the scan stops once every reason
has its examples.  Without a summary the whole table is scanned to count
rows by stage, model and reason; distinct photos are not counted then
(that would hold every id), and the report says so.

Either way the table is read one record batch at a time
(``pyarrow.parquet.ParquetFile.iter_batches`` on files opened through Beam's
``FileSystems``, so a table in a bucket reads like a local one), at most
``BATCH_ROWS`` rows of four columns as Python objects at once; what is kept
across batches is bounded by the number of stages and models, at most
``MAX_REASONS`` reasons and ``EXAMPLES_PER_REASON`` examples each, never
by the table's rows.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc

from natvision.transforms import run_summary
from natvision.transforms import summary as summary_lib
from natvision.tools import tables as tables_lib

BATCH_ROWS = tables_lib.BATCH_ROWS
EXAMPLES_PER_REASON = 3
REASONS_SHOWN = 12
# Distinct reasons counted by a scan without a summary; rows of further
# reasons are counted together as ``other_rows``.
MAX_REASONS = 1000
COLUMNS = ("uri", "model", "stage", "error")


@dataclasses.dataclass(frozen=True)
class Reason:
  """One reason of error rows.

  Attributes:
    stage: the stage that failed (``read``, ``decode``, ``prepare``,
      ``inference``, ...).
    reason: the message with the photo's URI replaced by ``<uri>``.
    rows: error rows with this reason.
    examples: up to ``EXAMPLES_PER_REASON`` ``"<uri>"`` or
      ``"<uri> (<model>)"``, in table order.
  """

  stage: str
  reason: str
  rows: int
  examples: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ErrorAggregate:
  """The errors section's figures.

  Attributes:
    total: error rows.
    photos: distinct photos with an error row; None without a summary.
    by_stage: stage -> rows, most first.
    by_model: model (or ``(before any model)``) -> rows, most first.
    reasons: the ``REASONS_SHOWN`` most frequent reasons, most first.
    more_reasons: further distinct reasons known (from the summary's top
      ``summary.TOP_REASONS``, or the scan's first ``MAX_REASONS``).
    other_rows: rows of reasons past ``MAX_REASONS`` (a scan only).
    from_summary: the counts are the summary's (else the scan's).
    rows_scanned: rows read from the table for this aggregate.
  """

  total: int
  photos: Optional[int]
  by_stage: Dict[str, int]
  by_model: Dict[str, int]
  reasons: Tuple[Reason, ...]
  more_reasons: int
  other_rows: int
  from_summary: bool
  rows_scanned: int


def iter_batches(files: Sequence[tables_lib.TableFile],
                 columns: Sequence[str] = COLUMNS,
                 batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
  """Record batches of at most ``batch_rows`` rows of ``files``, in order
  (``tables.iter_batches``).

  Raises:
    OSError: a file cannot be opened or read.
  """
  return tables_lib.iter_batches(files, columns, batch_rows)


def _split(key: str) -> Tuple[str, str]:
  stage, _, reason = key.partition(": ")
  return stage, reason


def _example(uri: str, model: Optional[str]) -> str:
  return uri + (f" ({model})" if model else "")


def _most_first(counts: Dict[str, int]) -> Dict[str, int]:
  return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _rows(batch: pa.RecordBatch) -> Iterator[Tuple[str, str, str, str]]:
  """(key, uri, model, stage) of each row of one batch."""
  columns = {n: batch.column(n).to_pylist() for n in batch.schema.names}
  n = batch.num_rows
  uris = columns.get("uri", [""] * n)
  models = columns.get("model", [None] * n)
  stages, errors = columns["stage"], columns["error"]
  for uri, model, stage, error in zip(uris, models, stages, errors):
    yield summary_lib.reason_of(stage, error, uri), uri, model, stage


def _with_examples(files, keys: List[str], batch_rows: int
                   ) -> Tuple[Dict[str, List[str]], int]:
  """Up to ``EXAMPLES_PER_REASON`` examples of each of ``keys``; stops
  reading once every key has them.  Returns (examples, rows read)."""
  examples: Dict[str, List[str]] = {k: [] for k in keys}
  missing, scanned = set(keys), 0
  if not missing:
    return examples, 0
  for batch in iter_batches(files, batch_rows=batch_rows):
    scanned += batch.num_rows
    for key, uri, model, _ in _rows(batch):
      if key in missing:
        examples[key].append(_example(uri, model))
        if len(examples[key]) == EXAMPLES_PER_REASON:
          missing.discard(key)
    if not missing:
      break
  return examples, scanned


def _scan(files, batch_rows: int):
  """Counts of the whole table, a batch at a time."""
  by_stage: Dict[str, int] = collections.Counter()
  by_model: Dict[str, int] = collections.Counter()
  by_reason: Dict[str, int] = collections.Counter()
  examples: Dict[str, List[str]] = {}
  other = scanned = 0
  for batch in iter_batches(files, batch_rows=batch_rows):
    scanned += batch.num_rows
    for entry in pc.value_counts(batch.column("stage")).to_pylist():
      by_stage[entry["values"]] += entry["counts"]
    for key, uri, model, _ in _rows(batch):
      by_model[model or summary_lib.BEFORE_ANY_MODEL] += 1
      if key not in by_reason and len(by_reason) >= MAX_REASONS:
        other += 1
        continue
      by_reason[key] += 1
      kept = examples.setdefault(key, [])
      if len(kept) < EXAMPLES_PER_REASON:
        kept.append(_example(uri, model))
  return by_stage, by_model, by_reason, examples, other, scanned


def aggregate_errors(files: Sequence[tables_lib.TableFile],
                     counts: Optional[run_summary.ErrorCounts],
                     shown: int = REASONS_SHOWN,
                     batch_rows: int = BATCH_ROWS) -> ErrorAggregate:
  """The errors section's figures for the error table's ``files``.

  Args:
    files: the errors table's files of the run (or partition).
    counts: the run summary's ``errors``; None scans the whole table.
    shown: reasons given with their examples.
    batch_rows: rows per record batch read.

  Returns:
    The aggregate; ``total`` 0 when there are no error rows.

  Raises:
    OSError: a file cannot be read.
  """
  if counts is not None:
    ranked = sorted(counts.by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
    keys = [k for k, _ in ranked[:shown]]
    examples, scanned = (_with_examples(files, keys, batch_rows)
                         if files and counts.total else ({}, 0))
    return ErrorAggregate(
        total=counts.total, photos=counts.photos,
        by_stage=_most_first(counts.by_stage),
        by_model=_most_first(counts.by_model),
        reasons=tuple(Reason(*_split(k), rows=n,
                             examples=tuple(examples.get(k, ())))
                      for k, n in ranked[:shown]),
        more_reasons=max(len(ranked) - shown, 0), other_rows=0,
        from_summary=True, rows_scanned=scanned)
  by_stage, by_model, by_reason, examples, other, scanned = _scan(
      files, batch_rows)
  ranked = sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
  return ErrorAggregate(
      total=sum(by_stage.values()), photos=None,
      by_stage=_most_first(by_stage), by_model=_most_first(by_model),
      reasons=tuple(Reason(*_split(k), rows=n, examples=tuple(examples[k]))
                    for k, n in ranked[:shown]),
      more_reasons=max(len(ranked) - shown, 0), other_rows=other,
      from_summary=False, rows_scanned=scanned)
