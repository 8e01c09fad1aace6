"""transforms/snapshots/stats.py: counts that are Beam counters and data.

A ``CountingDoFn`` emits its bundle's counts on the ``STATS`` output, and
``SumStats`` sums them into one dict, under TestPipeline: the sums must be
exact, since the run's summary is written from them.
"""

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from natvision.transforms import snapshots
from natvision.transforms.snapshots import stats


class _CountEvens(stats.CountingDoFn):
  """Passes every number on; counts the numbers seen and the even ones."""

  def process(self, n):
    self._count("seen")
    self._count("even", int(n % 2 == 0))
    self._count("never", 0)  # a zero count is no pair at all
    yield n


def test_counts_come_out_as_data_and_sum_to_one_dict():
  with TestPipeline() as p:
    outputs = (p
               | beam.Create(range(7))
               | beam.ParDo(_CountEvens()).with_outputs(snapshots.STATS,
                                                        main="numbers"))
    assert_that(outputs.numbers, equal_to(list(range(7))), label="Main")
    totals = outputs[snapshots.STATS] | snapshots.SumStats()
    assert_that(totals, equal_to([{"seen": 7, "even": 4}]), label="Totals")


def test_no_counts_sum_to_an_empty_dict_and_streams_flatten():
  with TestPipeline() as p:
    empty = p | "None" >> beam.Create([])
    assert_that(empty | "SumNone" >> snapshots.SumStats(), equal_to([{}]),
                label="Empty")
    a = p | "A" >> beam.Create([("rows", 2), ("bad", 1)])
    b = p | "B" >> beam.Create([("rows", 3)])
    both = stats.flatten_stats([a, b], "Both") | "SumBoth" >> (
        snapshots.SumStats())
    assert_that(both, equal_to([{"rows": 5, "bad": 1}]), label="Flattened")


def test_counter_names_carry_the_namespace_and_prefix():
  counter = stats.ingest_counter("photos_kept")
  assert counter.metric_name.namespace == "natvision"
  assert counter.metric_name.name == "ingest_photos_kept"
