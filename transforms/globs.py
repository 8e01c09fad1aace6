"""Glob inputs at launch: refusing what cannot be listed, and the bounded
count of the files the patterns match.

The launcher counts at most ``COUNT_LIMIT`` distinct files, streaming,
holding no paths (a local folder is walked lazily with ``os.scandir``;
another filesystem's listing is cut at the bound), so its memory is the same
whatever the number of files.  The files themselves are listed again in the
graph (``transforms/sources.py``), on the workers.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterator, Optional, Sequence

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystem import FileSystem
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.io.filesystems import FileSystems

from natvision.transforms.refs import InputError


def check_listable(patterns: Sequence[str]) -> None:
  """Refuses glob patterns on http(s), which cannot be listed.

  Raises:
    InputError: naming the pattern and what to give instead.
  """
  for pattern in patterns:
    if pattern.lower().startswith(("http://", "https://")):
      raise InputError(
          f"--input {pattern}: a web server cannot be listed like a folder; "
          f"list the photos' URLs in a manifest (a .csv with a uri column) "
          f"or give a Darwin Core archive")


# Files counted at launch, at most: the progress lines' total comes from
# this bounded count (transforms/progress.py); past it they show no total.
COUNT_LIMIT = 100_000


@dataclasses.dataclass(frozen=True)
class InputCount:
  """How many distinct files the glob patterns match, as far as counted.

  Attributes:
    files: distinct files counted.
    at_least: True when counting stopped at the bound: there are at least
      ``files`` files, perhaps many more.
  """

  files: int
  at_least: bool = False

  @property
  def expected_total(self) -> Optional[int]:
    """The progress total: the count when it is whole, else None."""
    return None if self.at_least else self.files


def _is_local(pattern: str) -> bool:
  return isinstance(FileSystems.get_filesystem(pattern), LocalFileSystem)


def _iter_local(pattern: str) -> Iterator[str]:
  """The local files ``pattern`` matches, as Beam's local filesystem matches
  them (``FileSystem.translate_pattern``, symlinked folders not entered),
  one at a time.

  Beam lists a local folder whole (``os.walk`` builds each folder's list of
  names) before matching; this walks ``os.scandir`` lazily, so memory holds
  the folders still to visit, never the files.
  """
  if pattern.endswith("/"):
    pattern += "*"
  prefix = re.match(r"^[^[*?]*", pattern).group(0)
  if prefix == pattern:  # no glob character: one path
    if os.path.exists(pattern):
      yield pattern
    return
  match = _matcher(pattern)
  folders = [os.path.dirname(prefix) or "."]
  while folders:
    folder = folders.pop()
    try:
      with os.scandir(folder) as entries:
        for entry in entries:
          if entry.is_dir():
            if not entry.is_symlink():
              folders.append(entry.path)
          elif match(entry.path):
            yield entry.path
    except FileNotFoundError:
      continue  # gone since it was listed, or never there


def iter_matches(pattern: str, limit: Optional[int]) -> Iterator[str]:
  """The paths ``pattern`` matches: all of them, one at a time, for a local
  pattern; at most ``limit`` (None: all) for another filesystem (Beam stops
  its listing there, so memory holds at most ``limit`` entries).

  Raises:
    InputError: a listing that failed, naming the pattern.
  """
  try:
    if _is_local(pattern):
      yield from _iter_local(pattern)
      return
    result = FileSystems.match([pattern], limits=[limit])[0]
  except (OSError, BeamIOError) as e:
    raise InputError(f"--input {pattern} cannot be listed: {e}") from e
  for metadata in result.metadata_list:
    yield metadata.path


def count_pattern_matches(patterns: Sequence[str],
                          limit: int = COUNT_LIMIT) -> InputCount:
  """Counts the distinct files the patterns match, up to ``limit``; fails
  on a pattern matching none.

  A file matched by several patterns (``photos/*.jpg`` and ``photos/a*``)
  counts once, as ``ReadImageRefs`` reads it once: it is counted under the
  first pattern that matches it (each path is tested against the earlier
  patterns), so no set of paths is kept.  The launcher's memory stays the
  same whatever the number of files; its time grows up to ``limit`` files.

  Raises:
    InputError: a pattern that matches nothing, naming it.
  """
  earlier = []
  files = 0
  for pattern in patterns:
    matched = False
    # Of the paths listed, at most ``files`` were counted before.
    for path in iter_matches(pattern, limit + 1 + files):
      matched = True
      if any(m(path) for m in earlier):
        continue
      files += 1
      if files > limit:
        return InputCount(files=limit, at_least=True)
    if not matched:
      raise InputError(
          f"--input {pattern} matches no files; check the path or quote the "
          f"pattern so the shell does not expand it")
    earlier.append(_matcher(pattern))
  return InputCount(files=files)


def _matcher(pattern: str):
  """Whether a path is one ``pattern`` matches (Beam's pattern syntax)."""
  if pattern.endswith("/"):
    pattern += "*"
  return re.compile(FileSystem.translate_pattern(pattern)).match


def first_matches(patterns: Sequence[str], limit: int) -> list:
  """The first ``limit`` distinct paths the patterns match, sorted.

  For a sample of the input at launch (``transforms/runtimes/sample.py``):
  memory holds at most ``limit`` paths whatever the number of files.

  Raises:
    InputError: a listing that failed, naming the pattern.
  """
  found = set()
  for pattern in patterns:
    for path in iter_matches(pattern, limit):
      found.add(path)
      if len(found) >= limit:
        return sorted(found)
  return sorted(found)
