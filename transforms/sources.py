"""Sources: turn ``--input`` into one ``ImageRef`` per distinct photo, in
the graph.

Input is either glob patterns on any Beam filesystem (local, gs://, s3://)
or one manifest (``transforms/manifests.py``: its formats, checks and
rows).  The files a glob matches and the rows of a manifest are read inside
the pipeline, on the workers, so millions of photos never enter the job
graph or the launcher; the launcher only counts globs, bounded
(``transforms/globs.py``), and checks a manifest's first rows.  A manifest
the launcher did not check whole is checked whole on the worker that reads
it, before its first row, with the launcher's messages.

Photos listed twice (same id) are processed once, as the row that sorts
first by ``duplicate_order`` (URI, then the carried values as text),
whatever order the rows come in: a manifest's refs, and those of several
glob patterns (which may overlap), are grouped by id (``OnePerId``, a
GroupByKey).  One glob pattern lists each file once, so its refs are not
grouped: they go on as they are listed (a local folder walked lazily,
``globs.iter_matches``), through a ``Reshuffle`` that spreads them over the
workers, except on the DirectRunner with one worker
(``spreads_work``), where a shuffle would only hold every ref in memory
before the first photo is read.  Ids and refs: ``transforms/refs.py``.

The names of ``refs``, ``manifests`` and ``globs`` that callers use are
re-exported here.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions
from apache_beam.options.pipeline_options import StandardOptions

from natvision.transforms import uris
from natvision.transforms.globs import (COUNT_LIMIT, InputCount, check_listable,  # noqa: F401  pylint: disable=unused-import
                              count_pattern_matches, first_matches,
                              iter_matches)
from natvision.transforms.manifests import (CHECK_ROWS, DEFAULT_ENCODING,  # noqa: F401  pylint: disable=unused-import
                                  ID_COLUMN, MANIFEST_FORMATS,
                                  RESERVED_COLUMNS, URI_COLUMN, Manifest,
                                  check_all_rows, check_encoding,
                                  iter_manifest_rows, manifest_format,
                                  read_manifest_header, ref_from_row,
                                  sample_uris)
from natvision.transforms.records import ImageRef
from natvision.transforms.refs import (InputError, duplicate_order,  # noqa: F401  pylint: disable=unused-import
                             image_id_for_uri, image_id_relative_to,
                             ref_for_uri)

__all__ = [
    # transforms/refs.py
    "InputError", "duplicate_order", "image_id_for_uri",
    "image_id_relative_to", "ref_for_uri",
    # transforms/manifests.py
    "CHECK_ROWS", "DEFAULT_ENCODING", "ID_COLUMN", "MANIFEST_FORMATS",
    "RESERVED_COLUMNS", "URI_COLUMN", "Manifest", "check_all_rows",
    "check_encoding", "iter_manifest_rows", "manifest_format",
    "read_manifest_header", "ref_from_row", "sample_uris",
    # transforms/globs.py
    "COUNT_LIMIT", "InputCount", "check_listable", "count_pattern_matches",
    "first_matches",
    # here
    "OnePerId", "ReadImageRefs", "spreads_work",
]

# What Beam's DirectRunner is called, as a --runner value or a class.
_DIRECT_RUNNERS = frozenset({"DirectRunner", "direct", "SwitchingDirectRunner",
                             "FnApiRunner", "BundleBasedDirectRunner"})


class _ReadManifestFn(beam.DoFn):

  def __init__(self, manifest: Manifest):
    self._manifest = manifest

  def process(self, path: str) -> Iterator[ImageRef]:
    del path
    if not self._manifest.checked_whole:
      # The launcher checked the first CHECK_ROWS rows; the rest fail
      # here, before any row is emitted, with the same messages.
      check_all_rows(self._manifest)
    rows = beam.metrics.Metrics.counter("natvision", "manifest_rows")
    for row in iter_manifest_rows(self._manifest):
      rows.inc()
      yield ref_from_row(row, self._manifest)


class _MatchFn(beam.DoFn):
  """A glob pattern (as bytes) -> the ImageRef of every file it matches.

  With ``ids_relative_to`` (a folder), ids hash the path relative to it
  (``image_id_relative_to``); else the whole URI.
  """

  def __init__(self, ids_relative_to: Optional[str] = None):
    self._base = ids_relative_to

  def process(self, pattern: bytes) -> Iterator[ImageRef]:
    text = pattern.decode("utf-8", "surrogateescape")
    # One path at a time: a local folder of a million photos is never
    # listed whole (another filesystem's listing is Beam's, whole).
    for path in iter_matches(text, None):
      image_id = image_id_relative_to(path, self._base) if self._base else None
      yield ref_for_uri(path, image_id)


def _first_of_duplicates(item: Tuple[str, Iterable[ImageRef]]) -> ImageRef:
  """(image_id, refs) -> the first ref by ``duplicate_order``; counts the
  others as ``duplicate_inputs``."""
  _, refs = item
  refs = list(refs)
  if len(refs) > 1:
    beam.metrics.Metrics.counter("natvision", "duplicate_inputs").inc(
        len(refs) - 1)
  return min(refs, key=duplicate_order)


def _one_per_id(refs):
  return (refs
          | "KeyById" >> beam.Map(lambda r: (r.image_id, r))
          | "GroupById" >> beam.GroupByKey()
          | "OnePerId" >> beam.Map(_first_of_duplicates))


class OnePerId(beam.PTransform):
  """ImageRefs -> one per ``image_id`` (the first by ``duplicate_order``:
  by URI, then carried values), for readers whose input may list a photo
  twice.  A GroupByKey: on Dataflow a shuffle of the refs; on the
  DirectRunner every ref is held in memory (about 0.85 KiB each) until the
  last one is read."""

  def expand(self, refs):
    return _one_per_id(refs)


def spreads_work(options) -> bool:
  """Whether a shuffle of the refs lets more than one worker read photos.

  False only on Beam's DirectRunner with one worker (``--direct_num_workers
  1``, the default; 0 means one per core): it runs a job's stages one after
  another in one process, holding a shuffle's whole input in memory, so a
  shuffle there costs memory per photo and buys nothing.  True on any other
  runner (Dataflow: without a shuffle one worker would read every photo a
  glob lists) and on the DirectRunner with several workers.

  Args:
    options: the pipeline's ``PipelineOptions``.
  """
  runner = options.view_as(StandardOptions).runner
  if runner is not None and not isinstance(runner, str):
    runner = type(runner).__name__
  if runner not in _DIRECT_RUNNERS and runner is not None:
    return True
  workers = options.view_as(DirectOptions).direct_num_workers
  if workers == 0:
    import multiprocessing  # pylint: disable=import-outside-toplevel
    workers = multiprocessing.cpu_count()
  return (workers or 1) > 1


class ReadImageRefs(beam.PTransform):
  """Emits one ImageRef per distinct photo of the input.

  Args:
    patterns: glob patterns (used when ``manifest`` is None).
    manifest: a checked Manifest, from read_manifest_header.
    ids_relative_to: a folder whose photos get ids that hash their path
      relative to it (the demo's sample photos); None: ids hash the URI.
    spread: for one glob pattern, whether its refs go through a
      ``Reshuffle`` (see the module docstring); None: ``spreads_work`` of
      the pipeline's options.
  """

  def __init__(self, patterns: Sequence[str] = (),
               manifest: Optional[Manifest] = None,
               ids_relative_to: Optional[str] = None,
               spread: Optional[bool] = None):
    super().__init__()
    if not patterns and manifest is None:
      raise ValueError("ReadImageRefs needs patterns or a manifest")
    self._patterns = list(patterns)
    self._manifest = manifest
    self._ids_relative_to = ids_relative_to
    self._spread = spread

  def expand(self, pbegin):
    if self._manifest is not None:
      refs = (pbegin
              | "ManifestPath" >> beam.Create(
                  [uris.readable(self._manifest.path)])
              | "ReadManifest" >> beam.ParDo(_ReadManifestFn(self._manifest)))
      return _one_per_id(refs)
    # Patterns travel as bytes: Beam's str coder refuses a str that
    # names bytes that are not UTF-8.
    refs = (pbegin
            | "Patterns" >> beam.Create(
                [uris.uri_bytes(p) for p in self._patterns])
            | "MatchFiles" >> beam.ParDo(_MatchFn(self._ids_relative_to)))
    if len(self._patterns) > 1:  # patterns may overlap
      return _one_per_id(refs)
    # One pattern lists each file once, and ids are the file's (its URI
    # or its path under ids_relative_to): no photo comes twice.
    spread = self._spread
    if spread is None:
      spread = spreads_work(pbegin.pipeline.options)
    if spread:
      return refs | "Spread" >> beam.Reshuffle()
    return refs
