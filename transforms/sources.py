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
whatever order the rows come in.  Ids and refs: ``transforms/refs.py``.

The names of ``refs``, ``manifests`` and ``globs`` that callers use are
re-exported here.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import uris
from natvision.transforms.globs import (COUNT_LIMIT, InputCount, check_listable,  # noqa: F401  pylint: disable=unused-import
                              count_pattern_matches, first_matches)
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
    "OnePerId", "ReadImageRefs",
]


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
    for metadata in FileSystems.match([text])[0].metadata_list:
      image_id = (image_id_relative_to(metadata.path, self._base)
                  if self._base else None)
      yield ref_for_uri(metadata.path, image_id)


def _first_of_duplicates(item: Tuple[str, Iterable[ImageRef]]) -> ImageRef:
  """(image_id, refs) -> the first ref by ``duplicate_order``; counts the
  others as ``duplicate_inputs``."""
  _, refs = item
  refs = list(refs)
  if len(refs) > 1:
    beam.metrics.Metrics.counter("natvision", "duplicate_inputs").inc(
        len(refs) - 1)
  return min(refs, key=duplicate_order)


class OnePerId(beam.PTransform):
  """ImageRefs -> one per ``image_id`` (the first by ``duplicate_order``:
  by URI, then carried values), for readers whose input may list a photo
  twice."""

  def expand(self, refs):
    return (refs
            | "KeyById" >> beam.Map(lambda r: (r.image_id, r))
            | "GroupById" >> beam.GroupByKey()
            | "OnePerId" >> beam.Map(_first_of_duplicates))


class ReadImageRefs(beam.PTransform):
  """Emits one ImageRef per distinct photo of the input.

  Args:
    patterns: glob patterns (used when ``manifest`` is None).
    manifest: a checked Manifest, from read_manifest_header.
    ids_relative_to: a folder whose photos get ids that hash their path
      relative to it (the demo's sample photos); None: ids hash the URI.
  """

  def __init__(self, patterns: Sequence[str] = (),
               manifest: Optional[Manifest] = None,
               ids_relative_to: Optional[str] = None):
    super().__init__()
    if not patterns and manifest is None:
      raise ValueError("ReadImageRefs needs patterns or a manifest")
    self._patterns = list(patterns)
    self._manifest = manifest
    self._ids_relative_to = ids_relative_to

  def expand(self, pbegin):
    if self._manifest is not None:
      refs = (pbegin
              | "ManifestPath" >> beam.Create(
                  [uris.readable(self._manifest.path)])
              | "ReadManifest" >> beam.ParDo(_ReadManifestFn(self._manifest)))
    else:
      # Patterns travel as bytes: Beam's str coder refuses a str that
      # names bytes that are not UTF-8.
      refs = (pbegin
              | "Patterns" >> beam.Create(
                  [uris.uri_bytes(p) for p in self._patterns])
              | "MatchFiles" >> beam.ParDo(_MatchFn(self._ids_relative_to)))
    return (refs
            | "KeyById" >> beam.Map(lambda r: (r.image_id, r))
            | "GroupById" >> beam.GroupByKey()
            | "OnePerId" >> beam.Map(_first_of_duplicates))
