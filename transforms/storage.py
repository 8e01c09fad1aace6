"""Storage calls that never read a failure as "nothing there".

Every listing, existence check and small read of run state (staged files,
committed tables, earlier partitions, commit plans, caches) goes through
here.  Beam's ``FileSystems`` already answers "no such file" without raising:
matching a folder that does not exist gives an empty list, and ``exists``
gives False.  Anything it raises is therefore a real storage failure (a 403,
a 5xx the client gave up on, a reset), and turning it into an empty result
would let a commit take an empty listing for an empty table and delete the
previous run's rows.  So these functions let every error propagate, after the
storage client's own retries, as a ``StorageError`` that names the path.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

from apache_beam.io.filesystems import FileSystems


class StorageError(IOError):
  """A storage call failed; the message names the operation and the path."""


def match(pattern: str) -> List[str]:
  """Sorted paths matching a glob on any Beam filesystem.

  Returns:
    The matching paths; an empty list only when storage answered that
    nothing matches (for example a folder that does not exist yet).

  Raises:
    StorageError: the listing failed.
  """
  try:
    result = FileSystems.match([pattern])[0]
  except Exception as e:  # noqa: BLE001 - every client raises its own kinds
    raise StorageError(f"listing {pattern} failed: {_reason(e)}") from e
  return sorted(m.path for m in result.metadata_list)


def match_metadata(pattern: str) -> List[Tuple[str, int, float]]:
  """(path, size in bytes, last modified in seconds) of each match, sorted.

  Raises:
    StorageError: the listing failed.
  """
  try:
    result = FileSystems.match([pattern])[0]
  except Exception as e:  # noqa: BLE001
    raise StorageError(f"listing {pattern} failed: {_reason(e)}") from e
  return sorted((m.path, m.size_in_bytes, m.last_updated_in_seconds or 0.0)
                for m in result.metadata_list)


def exists(path: str) -> bool:
  """Whether a file (or, locally, a folder) exists.

  Raises:
    StorageError: storage could not say (as opposed to saying "no").
  """
  try:
    return FileSystems.exists(path)
  except Exception as e:  # noqa: BLE001
    raise StorageError(f"checking whether {path} exists failed: "
                       f"{_reason(e)}") from e


def read_bytes(path: str) -> bytes:
  """The whole content of a small file (a plan, a marker, a summary).

  Raises:
    StorageError: the read failed, the file missing included.
  """
  try:
    with FileSystems.open(path) as f:
      return f.read()
  except Exception as e:  # noqa: BLE001
    raise StorageError(f"reading {path} failed: {_reason(e)}") from e


def write_bytes(path: str, data: bytes) -> None:
  """Writes a small file (a plan, a marker, a summary) in one go.

  Raises:
    StorageError: the write failed.
  """
  with failing_as("writing", path):
    f = FileSystems.create(path)
  with failing_as("writing", path, abandon=f):
    f.write(data)
    f.close()


@contextlib.contextmanager
def failing_as(action: str, path: str, abandon=None) -> Iterator[None]:
  """Raises any failure in the block as a StorageError naming the path.

  For reads and writes that stream (a Parquet footer, a table file): the
  storage client's own errors often name no path, or only a URL-encoded one.

  Args:
    action: e.g. "reading", "writing".
    path: the file.
    abandon: a file being written, given up on failure (`abandon_write`).

  Raises:
    StorageError: "<action> <path> failed: <reason>".
  """
  try:
    yield
  except Exception as e:  # noqa: BLE001
    if abandon is not None:
      abandon_write(abandon)
    if isinstance(e, StorageError):
      raise
    raise StorageError(f"{action} {path} failed: {_reason(e)}") from e


def abandon_write(f) -> None:
  """Gives up a file being written whose write or close failed.

  A GCS writer whose close failed stays open, and closing it again, as
  garbage collection does at any later moment, uploads the object after
  all: long after its step failed, or, once storage is out of reach,
  retrying for minutes.  This cancels the upload instead (best effort: the
  failure itself is what gets reported).
  """
  try:
    terminate = getattr(f, "terminate", None)
    if terminate is not None:
      terminate()
    else:
      f.close()
  except Exception:  # noqa: BLE001 - the write already failed, and says so
    pass


def same_folder(path: str, folder: str) -> bool:
  """Whether ``path`` lies directly in ``folder`` (relative or absolute).

  Beam's local ``FileSystems.split`` makes paths absolute while ``join``
  keeps them as given, so both sides are normalised the same way.
  """
  return (FileSystems.split(path)[0].rstrip("/") ==
          FileSystems.split(FileSystems.join(folder, "_"))[0].rstrip("/"))


def _reason(e: BaseException) -> str:
  text = str(e) or type(e).__name__
  # Beam wraps per-path failures in BeamIOError(exception_details={...}).
  details = getattr(e, "exception_details", None)
  if isinstance(details, dict) and details:
    inner = next(iter(details.values()))
    text = f"{type(inner).__name__}: {inner}"
  return text[:500]
