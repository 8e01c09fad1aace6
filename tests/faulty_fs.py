"""An in-process Beam filesystem that fails chosen calls: ``faulty://``.

``faulty:///tmp/x`` is the local path ``/tmp/x``; every call goes to Beam's
``LocalFileSystem`` unless a rule fails it first.  Being a ``FileSystem``
subclass registers the scheme with Beam, so ``FileSystems`` (and everything
in transforms/storage.py and transforms/commit.py) reaches it as it reaches
gs:// or s3://, with no server and in milliseconds.  The storage-fault tests
on the loopback GCS server (tests/test_storage_faults.py) are the proof on a
real API; this one lets a test fail every call of a commit in turn.

Each call is logged as ``(operation, local path)``; a rule fails the k-th
call of an operation (counting from 1 since the rule was set), once or for
good, with an ``OSError`` as a 403 would give.
"""

from __future__ import annotations

import os
import threading
from typing import List, Optional, Tuple

from apache_beam.io.filesystem import FileMetadata, FileSystem, MatchResult
from apache_beam.io.localfilesystem import LocalFileSystem

SCHEME = "faulty"
PREFIX = SCHEME + "://"
OPERATIONS = ("match", "exists", "open", "create", "rename", "delete",
              "copy", "mkdirs", "metadata")


class Faults:
  """The rules and the log, shared by every instance Beam makes."""

  def __init__(self):
    self._lock = threading.Lock()
    self.clear()

  def clear(self) -> None:
    with self._lock:
      self.log: List[Tuple[str, str]] = []
      self.rule: Optional[Tuple[str, int, bool]] = None
      self.fired = 0

  def fail(self, operation: str, k: int, for_good: bool = False) -> None:
    """Fails the k-th call of ``operation`` from now on: once, or, with
    ``for_good``, that call and every later one of its kind (the log
    starts again)."""
    if operation not in OPERATIONS:
      raise ValueError(f"operation must be one of {OPERATIONS}")
    with self._lock:
      self.log = []
      self.rule = (operation, k, for_good)
      self.fired = 0

  def call(self, operation: str, path: str) -> None:
    with self._lock:
      self.log.append((operation, path))
      if self.rule is None or self.rule[0] != operation:
        return
      n = sum(1 for op, _ in self.log if op == operation)
      if n < self.rule[1] or (n > self.rule[1] and not self.rule[2]):
        return
      self.fired += 1
    raise OSError(f"403 Forbidden (injected): {operation} {path}")


FAULTS = Faults()


def local(path: str) -> str:
  return path[len(PREFIX):] if path.startswith(PREFIX) else path


def remote(path: str) -> str:
  return PREFIX + path


class FaultyFileSystem(FileSystem):
  """Local files under the ``faulty://`` scheme, failing as FAULTS says."""

  def __init__(self, pipeline_options=None):
    super().__init__(pipeline_options)
    self._local = LocalFileSystem(pipeline_options)

  @classmethod
  def scheme(cls):
    return SCHEME

  def join(self, basepath, *paths):
    return "/".join([basepath.rstrip("/")] + [p.strip("/") for p in paths])

  def split(self, path):
    head, _, tail = path.rstrip("/").rpartition("/")
    return head, tail

  def has_dirs(self):
    return False

  def _list(self, dir_or_prefix):
    raise NotImplementedError  # match() is implemented directly

  def match(self, patterns, limits=None):
    results = []
    for pattern in patterns:
      FAULTS.call("match", local(pattern))
      # Object-store semantics: "x/" lists everything under x, as gs:// does.
      wanted = local(pattern)
      if wanted.endswith("/"):
        wanted += "**"
      (found,) = self._local.match([wanted])
      results.append(MatchResult(pattern, [
          FileMetadata(remote(m.path), m.size_in_bytes,
                       m.last_updated_in_seconds)
          for m in found.metadata_list]))
    return results

  def create(self, path, *args, **kwargs):
    FAULTS.call("create", local(path))
    parent = local(path).rsplit("/", 1)[0]
    os.makedirs(parent, exist_ok=True)
    return self._local.create(local(path), *args, **kwargs)

  def open(self, path, *args, **kwargs):
    FAULTS.call("open", local(path))
    return self._local.open(local(path), *args, **kwargs)

  def copy(self, sources, destinations):
    for s in sources:
      FAULTS.call("copy", local(s))
    self._local.copy([local(s) for s in sources],
                     [local(d) for d in destinations])

  def rename(self, sources, destinations):
    # One call per file, as an object store copies and deletes each.
    for s, d in zip(sources, destinations):
      FAULTS.call("rename", local(s))
      os.makedirs(local(d).rsplit("/", 1)[0], exist_ok=True)
      self._local.rename([local(s)], [local(d)])

  def exists(self, path):
    FAULTS.call("exists", local(path))
    return self._local.exists(local(path).rstrip("/"))

  def size(self, path):
    return self.metadata(path).size_in_bytes

  def last_updated(self, path):
    return self.metadata(path).last_updated_in_seconds

  def checksum(self, path):
    return self._local.checksum(local(path))

  def metadata(self, path):
    FAULTS.call("metadata", local(path))
    m = self._local.metadata(local(path))
    return FileMetadata(path, m.size_in_bytes, m.last_updated_in_seconds)

  def delete(self, paths):
    for p in paths:
      FAULTS.call("delete", local(p))
    self._local.delete([local(p).rstrip("/") for p in paths])

  def mkdirs(self, path):
    FAULTS.call("mkdirs", local(path))
    os.makedirs(local(path), exist_ok=True)
