"""Counting inside the graph: Beam counters that are also data.

Every count worth reporting (rows read, rows refused, observations and photos
that passed the filters, per model the photos new, done before and held back)
is a Beam counter, for watching a running job, and is also emitted as data:
the transforms that take ``with_stats=True`` return a ``STATS`` PCollection of
(name, count) pairs that ``SumStats`` turns into one dict, so that the
pipeline can write its own summary without the launcher reading metrics (a
Flex Template launch never does).
"""

from __future__ import annotations

import collections

import apache_beam as beam

METRICS_NAMESPACE = "natvision"
COUNTER_PREFIX = "ingest_"
# The tagged output of (name, count) pairs; the names are the counters'
# without COUNTER_PREFIX.
STATS = "stats"


def ingest_counter(name: str):
  """The Beam counter ``natvision/ingest_<name>``."""
  return beam.metrics.Metrics.counter(METRICS_NAMESPACE,
                                      COUNTER_PREFIX + name)


class CountingDoFn(beam.DoFn):
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
      counter = self._counters[name] = ingest_counter(name)
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


def flatten_stats(streams, label: str):
  """Flattens several ``STATS`` PCollections into one, as step ``label``."""
  streams = tuple(streams)
  return streams | label >> beam.Flatten()
