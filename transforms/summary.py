"""The run summary's figures, counted inside the pipeline.

Both jobs write their summary (``run.json``, ``runs/<date>.json``) once, in
the pipeline's last step, from figures the graph computes itself: counts of
inputs and skipped rows, model loads per worker process, and the errors by
stage, model and reason.  Nothing is read from Beam's metrics in the
launcher (a template launch has no launcher waiting), and no step reads
the whole errors table into one worker: error rows are counted where they
are made, in partial sums that Beam merges.
"""

from __future__ import annotations

import collections
from typing import Dict, Iterable, Tuple

import apache_beam as beam
import pyarrow as pa

TOP_REASONS = 20
EXAMPLES = 10
BEFORE_ANY_MODEL = "(before any model)"


def reason_of(stage: str, error: str, uri: str) -> str:
  """An error row's reason: ``"<stage>: <error>"``, the photo's URI in the
  message replaced by ``<uri>`` (the keys of ``by_reason``; tools/report
  counts the errors table's rows by the same key)."""
  text = error.replace(uri, "<uri>") if uri else error
  return f"{stage}: {text}"


class ErrorBreakdownFn(beam.CombineFn):
  """pa.Table of error rows -> counts by stage, by model and by reason.

  The output is the ``errors`` object of run.json without ``photos``
  (photos with any error are counted apart, see ``Summarize``).  Reasons
  are counted with the photo's URI taken out of the message; only the
  ``TOP_REASONS`` most frequent are kept in the output.
  """

  def create_accumulator(self):
    return (collections.Counter(), collections.Counter(),
            collections.Counter())

  def add_input(self, acc, table: pa.Table):
    by_stage, by_model, by_reason = acc
    columns = table.select(["uri", "stage", "model", "error"]).to_pydict()
    for uri, stage, model, error in zip(columns["uri"], columns["stage"],
                                        columns["model"], columns["error"]):
      by_stage[stage] += 1
      by_model[model or BEFORE_ANY_MODEL] += 1
      by_reason[reason_of(stage, error, uri)] += 1
    return acc

  def merge_accumulators(self, accs):
    merged = self.create_accumulator()
    for acc in accs:
      for total, part in zip(merged, acc):
        total.update(part)
    return merged

  def extract_output(self, acc) -> dict:
    by_stage, by_model, by_reason = acc
    return {"by_stage": dict(by_stage), "by_model": dict(by_model),
            "by_reason": dict(by_reason.most_common(TOP_REASONS)),
            "total": sum(by_stage.values())}


def _ids(table: pa.Table) -> Iterable[str]:
  return table.column("image_id").to_pylist()


def _sum_loads(pairs: Iterable[Tuple[str, int]]) -> Dict[str, int]:
  loads: Dict[str, int] = collections.Counter()
  for name, n in pairs:
    loads[name] += n
  return dict(loads)


def _assemble(breakdown: dict, photos: int, loads: Dict[str, int],
              counts: Dict[str, int], examples: Dict[str, list]) -> dict:
  return {"errors": dict(breakdown, photos=photos), "model_loads": loads,
          "counts": counts, "examples": examples}


class Summarize(beam.PTransform):
  """Counts the run's figures; a singleton dict for the commit step.

  Input: a dict with ``error_tables`` (pa.Table of error rows), ``loads``
  ((model, n) pairs) and ``tallies`` ((name, n) pairs such as ``inputs``),
  and optionally ``examples`` ((name, item) pairs, e.g. the bad lines of
  an archive as (file, line, why)).

  Output: one ``{"errors": {...}, "model_loads": {model: n},
  "counts": {name: n}, "examples": {name: [item, ...]}}``, the examples
  being the ``EXAMPLES`` smallest items per name, sorted.
  """

  def expand(self, streams):
    tables = streams["error_tables"]
    breakdown = tables | "ErrorBreakdown" >> beam.CombineGlobally(
        ErrorBreakdownFn())
    photos = (tables
              | "ErrorPhotoIds" >> beam.FlatMap(_ids)
              | "DistinctPhotos" >> beam.Distinct()
              | "CountPhotos" >> beam.combiners.Count.Globally())
    loads = (streams["loads"]
             | "LoadsToList" >> beam.combiners.ToList()
             | "SumLoads" >> beam.Map(_sum_loads))
    counts = (streams["tallies"]
              | "SumTallies" >> beam.CombinePerKey(sum)
              | "Counts" >> beam.combiners.ToDict())
    if "examples" in streams:
      examples = streams["examples"]
    else:
      examples = tables.pipeline | "NoExamples" >> beam.Create([])
    examples = (examples
                | "FirstExamples" >> beam.combiners.Top.SmallestPerKey(
                    EXAMPLES)
                | "Examples" >> beam.combiners.ToDict())
    return (breakdown
            | "Assemble" >> beam.Map(
                _assemble, beam.pvalue.AsSingleton(photos),
                beam.pvalue.AsSingleton(loads),
                beam.pvalue.AsSingleton(counts),
                beam.pvalue.AsSingleton(examples)))
