"""Where ONNX files lie: staged next to the model, cached on the machine.

Decides the places and names of natvision's ONNX files, and how they are
written and copied:

* staged: ``<model_dir>/natvision.onnx`` (``staged_onnx_path``), written by
  ``natvision-stage-onnx`` (tools/stage_onnx.py);
* cached: ``<cache>/<name>-<key>.onnx`` (``cached_onnx_path``) in
  ``cache_dir()``, where the key hashes what the file is made from, never
  where the model lies: the fingerprint of its files, tf2onnx's version,
  the opset and ``CACHE_FORMAT``.  A moved or copied model folder finds the
  file made for the original.  int8 files are cached in the same folder
  (``int8_file.quantized_path``);
* a remote staged or int8 file is copied alone into the cache
  (``local_copy``), the model itself is not downloaded;
* one file is made at a time per machine (``make_once``, under an flock),
  and every file is written whole or not at all (``write_atomically``).

Which file a model opens, in which order, is ``onnx.find_or_convert``'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from typing import Callable, Iterator

from apache_beam.io.filesystems import FileSystems

from natvision.transforms import models as models_lib
from natvision.transforms.runtimes.onnx_session import installed_version

STAGED_ONNX = "natvision.onnx"
ONNX_OPSET = 17
_CACHE_ENV = "NATVISION_ONNX_CACHE"
# Part of every cache key: files made before the check was recorded in them
# are not reused (they are converted again, once).
CACHE_FORMAT = "2"
_LOCK = ".convert.lock"


def cache_dir() -> str:
  """Where converted models are kept on this machine.

  ``$NATVISION_ONNX_CACHE``, else ``onnx/`` under ``$NATVISION_MODEL_CACHE``
  (where remote models are copied), else ``natvision-onnx`` in the temp dir.
  """
  explicit = os.environ.get(_CACHE_ENV)
  if explicit:
    return explicit
  models_cache = os.environ.get("NATVISION_MODEL_CACHE")
  if models_cache:
    return os.path.join(models_cache, "onnx")
  return os.path.join(tempfile.gettempdir(), "natvision-onnx")


def cached_onnx_path(resolved: models_lib.ResolvedModel,
                     fingerprint: str) -> str:
  """The cache file of a model, keyed by content only.

  The key is the fingerprint of the model files, tf2onnx's version, the
  opset and ``CACHE_FORMAT``; the model's path is left out on purpose, so
  that a model folder moved or copied (``cp -r``) reuses the file converted
  for the original (a conversion takes 20-50 s and several GB for a
  full-size model).
  """
  return cached_path(resolved.name, ".onnx", fingerprint,
                     installed_version("tf2onnx"), str(ONNX_OPSET),
                     CACHE_FORMAT)


def cached_path(name: str, suffix: str, *parts: str) -> str:
  """``<cache_dir>/<name>-<key><suffix>``, the key 16 hex digits of sha256
  over ``parts``: what a file is made from, never where it lies."""
  key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
  return os.path.join(cache_dir(), f"{name}-{key}{suffix}")


def file_digest(path: str) -> str:
  """sha256 of a local file's bytes (64 hex digits), read in 4 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def staged_onnx_path(resolved: models_lib.ResolvedModel) -> str:
  """Where ``natvision-stage-onnx`` puts a model's file: next to the model."""
  return FileSystems.join(resolved.path.rstrip("/"), STAGED_ONNX)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
  """An exclusive lock between the processes of one machine (flock)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a+b") as f:
    try:
      import fcntl  # pylint: disable=import-outside-toplevel
    except ImportError:  # Windows: no lock; the rename keeps files whole
      yield
      return
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def folder_lock(folder: str):
  """The lock under which one file of ``folder`` is made at a time."""
  return file_lock(os.path.join(folder, _LOCK))


def make_once(path: str, make: Callable[[str], object]) -> bool:
  """Makes the local file ``path`` with ``make(path)`` unless it exists.

  One file is made at a time per machine (under a lock in its folder): a
  conversion or quantization briefly takes several times the model's
  memory, and the processes that wait for the same file then find it.

  Returns:
    True when this call made the file, False when it was there.
  """
  if os.path.exists(path):
    return False
  with folder_lock(os.path.dirname(path)):
    if os.path.exists(path):
      return False
    make(path)
    return True


def write_atomically(path: str, data: bytes) -> None:
  """Writes ``data`` at ``path`` so that no reader sees half of it.

  A local file is written under a temporary name and renamed into place; a
  bucket object appears whole when its upload closes.
  """
  if "://" in path:
    with FileSystems.create(path) as f:
      f.write(data)
    return
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                             suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; other users' workers read it
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def copy_file(source: str, target: str, replace: bool = False) -> str:
  """Copies one file between any two Beam filesystems, written atomically.

  Args:
    source: a local path or a bucket path.
    target: likewise.
    replace: copy even when ``target`` exists; else an existing target is
      kept (files named by content are never rewritten).

  Returns:
    target.
  """
  if replace or not FileSystems.exists(target):
    with FileSystems.open(source) as f:
      write_atomically(target, f.read())
  return target


def local_copy(path: str, name: str) -> str:
  """``path`` when local; else its copy ``<cache_dir>/<name>``, made once.

  A missing remote file gives the local name with nothing there.
  """
  if "://" not in path:
    return path
  local = os.path.join(cache_dir(), name)
  if not os.path.exists(local) and FileSystems.exists(path):
    copy_file(path, local)
  return local
