"""transforms/summary.py: the run summary's figures, counted in the graph.

``Summarize`` under TestPipeline on a few hand-made error rows, loads and
tallies: errors by stage, model and reason (the photo's URI taken out of
the message), distinct photos with an error, loads and counts summed, and
the smallest examples per name.  One pipeline only: each costs seconds.
"""

import apache_beam as beam
import pyarrow as pa
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from natvision.transforms import summary


def _errors(rows):
  """A pa.Table of error rows from (image_id, uri, stage, model, error)."""
  names = ("image_id", "uri", "stage", "model", "error")
  return pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)})


def test_summarize_counts_errors_photos_loads_and_tallies():
  first = _errors([
      ("1", "/p/1.jpg", "decode", None, "cannot decode /p/1.jpg"),
      ("2", "/p/2.jpg", "decode", None, "cannot decode /p/2.jpg"),
  ])
  second = _errors([
      ("2", "/p/2.jpg", "inference", "fungi_mobile_v1", "out of memory"),
  ])
  with TestPipeline() as p:
    streams = {
        "error_tables": p | "Errors" >> beam.Create([first, second]),
        "loads": p | "Loads" >> beam.Create([("fungi_mobile_v1", 1),
                                             ("fungi_mobile_v1", 2),
                                             ("inaturalist_v2", 1)]),
        "tallies": p | "Tallies" >> beam.Create([("inputs", 3),
                                                 ("inputs", 4),
                                                 ("skipped", 1)]),
        "examples": p | "Examples" >> beam.Create(
            [("bad_lines", ("f.txt", i, "why")) for i in range(12, 0, -1)]),
    }
    assert_that(streams | summary.Summarize(), equal_to([{
        "errors": {
            "by_stage": {"decode": 2, "inference": 1},
            "by_model": {summary.BEFORE_ANY_MODEL: 2, "fungi_mobile_v1": 1},
            "by_reason": {"decode: cannot decode <uri>": 2,
                          "inference: out of memory": 1},
            "total": 3, "photos": 2},
        "model_loads": {"fungi_mobile_v1": 3, "inaturalist_v2": 1},
        "counts": {"inputs": 7, "skipped": 1},
        "examples": {"bad_lines": [("f.txt", i, "why")
                                   for i in range(1, summary.EXAMPLES + 1)]},
    }]))


def test_only_the_most_frequent_reasons_are_kept():
  fn = summary.ErrorBreakdownFn()
  rows = [(str(i), f"/p/{i}", "read", None, f"reason {i % 25}")
          for i in range(25 + summary.TOP_REASONS)]
  acc = fn.add_input(fn.create_accumulator(), _errors(rows))
  out = fn.extract_output(fn.merge_accumulators([acc,
                                                 fn.create_accumulator()]))
  assert out["total"] == len(rows)
  assert len(out["by_reason"]) == summary.TOP_REASONS
  # Reasons 0..19 occur twice, 20..24 once: the twice-seen ones are kept.
  assert out["by_reason"] == {f"read: reason {i}": 2
                              for i in range(summary.TOP_REASONS)}
