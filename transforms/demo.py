"""The demo's tiny stand-in models: written once per machine, with ONNX files.

``natvision-embed --demo`` without ``--model_root`` runs on the tiny
stand-ins (transforms/standins.py) kept in a folder of the machine's model
cache, ``<cache>/standins/tiny-<key>/`` (the cache is
``$NATVISION_MODEL_CACHE``, else ``natvision-models`` in the temp dir).  The
key is content-addressed: a hash of what decides the stand-ins' bytes (the
writer's source, the seed, and the installed TensorFlow, tf-keras, tf2onnx
and onnx), so another output folder, or another demo, reuses the same
folder, and a changed writer or TensorFlow gets a new one.

Each stand-in is written with its ONNX file staged next to it
(``natvision.onnx``, as ``natvision-stage-onnx`` stages it), converted with
the check against TensorFlow recorded in it (transforms/runtimes/onnx.py),
so that later demos need no conversion and, with ``--runtime auto``, no
TensorFlow at all.  All of it happens in one child process (a fresh
interpreter): the launcher does not import TensorFlow to write them, and
the child's memory leaves with it.  The folder is written under a
temporary name and renamed into place, under a file lock, so concurrent
demos never see half a model.

Measured on a 2-core machine (README, "Quickstart"): about 12 s to write
and convert the three tiny stand-ins, most of it the child importing
TensorFlow.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.metadata
import logging
import multiprocessing
import os
import shutil
import time
from typing import Dict, Sequence

from natvision.transforms import models as models_lib
from natvision.transforms import standins

DEMO_SEED = 0
# Part of the key: raise it when what a demo folder holds changes.
FORMAT = "1"
# The distributions whose version changes the files written.
_VERSIONED = ("tensorflow", "tf-keras", "tf2onnx", "onnx")

_LOG = logging.getLogger("natvision")


def _version(dist: str) -> str:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "-"


def key() -> str:
  """16 hex digits naming the demo's stand-ins on this machine; no import
  of TensorFlow (versions are read from the installed metadata)."""
  digest = hashlib.sha256()
  with open(standins.__file__, "rb") as f:
    digest.update(f.read())
  digest.update(f"\0{FORMAT}\0{DEMO_SEED}".encode())
  for dist in _VERSIONED:
    digest.update(f"\0{dist}={_version(dist)}".encode())
  return digest.hexdigest()[:16]


def standins_root() -> str:
  """The machine's folder of demo stand-ins (``--model_root`` of a demo)."""
  return os.path.join(models_lib.local_cache_root(), "standins",
                      f"tiny-{key()}")


def _ready(path: str) -> bool:
  return os.path.exists(os.path.join(path, "saved_model.pb"))


def _lock(root: str):
  # The ONNX store's flock; imported here so that a demo whose stand-ins
  # are there already does not import the runtimes for it.
  from natvision.transforms.runtimes import onnx_store  # pylint: disable=import-outside-toplevel
  return onnx_store.file_lock(root.rstrip("/") + ".lock")


def ensure(root: str, names: Sequence[str], stage_onnx: bool = True) -> bool:
  """Writes the stand-ins of ``names`` missing under ``root``.

  Args:
    root: local folder that holds (or will hold) ``<name>/``.
    names: registry names.
    stage_onnx: also convert each one to ONNX, staged next to it.

  Returns:
    True if anything was written.

  Raises:
    ModelError: the child process failed or died.
  """
  missing = [n for n in names if not _ready(os.path.join(root, n))]
  if not missing:
    return False
  with _lock(root):
    missing = [n for n in names if not _ready(os.path.join(root, n))]
    if not missing:
      return False
    _LOG.info("writing tiny stand-in models %s%s to %s, once per machine "
              "(about %d s: TensorFlow starts in a child process)",
              ", ".join(missing),
              " and their ONNX files" if stage_onnx else "", root,
              5 + 3 * len(missing))
    start = time.perf_counter()
    write_in_child(root, missing, stage_onnx)
    _LOG.info("wrote the stand-ins in %.1f s", time.perf_counter() - start)
  return True


def _write_job(root: str, names: Sequence[str], stage_onnx: bool) -> Dict:
  """The child: writes into ``root.tmp<pid>/`` and renames each into place."""
  # pylint: disable=import-outside-toplevel
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.basicConfig(level=logging.WARNING)
  # TensorFlow's deprecation notices concern its API, not the demo (as on
  # the launcher's console, transforms/console.py).
  logging.getLogger("tensorflow").setLevel(logging.ERROR)
  from natvision.transforms.runtimes import onnx_convert
  from natvision.transforms.runtimes import onnx_store
  tmp = f"{root.rstrip('/')}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  seconds = {}
  try:
    standins.write_standins(tmp, tiny=True, models=names, seed=DEMO_SEED)
    if stage_onnx:
      for resolved in models_lib.resolve_models(list(names), tmp,
                                                requested_runtime="onnx"):
        start = time.perf_counter()
        onnx_convert.convert_to_onnx(resolved,
                                     onnx_store.staged_onnx_path(resolved))
        seconds[resolved.name] = time.perf_counter() - start
    os.makedirs(root, exist_ok=True)
    for name in names:
      target = os.path.join(root, name)
      shutil.rmtree(target, ignore_errors=True)  # a half-written leftover
      os.rename(os.path.join(tmp, name), target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return seconds


def write_in_child(root: str, names: Sequence[str],
                   stage_onnx: bool = True) -> Dict:
  """``_write_job`` in a spawned child (in-process when this process is a
  daemon, which may not start children).  Returns conversion seconds per
  model.

  Raises:
    ModelError: the child died.
  """
  if multiprocessing.current_process().daemon:
    return _write_job(root, names, stage_onnx)
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    future = pool.submit(_write_job, root, list(names), stage_onnx)
    try:
      return future.result()
    except concurrent.futures.process.BrokenProcessPool as e:
      raise models_lib.ModelError(
          f"the process writing the demo's stand-in models died ({e})"
      ) from e
