"""ONNX Runtime: the same model, converted with tf2onnx and checked against TF.

This module decides which ONNX file a model opens (``find_or_convert``)
and whether it may run it (``OnnxRuntime.load``'s check against
TensorFlow, recorded or live).  The parts it builds on: ``onnx_session``
(opening a file, what its metadata records), ``onnx_store`` (where files
lie, cache keys, atomic writes and copies), ``onnx_convert`` (tf2onnx, in a
child process).

Why: on CPU workers, ONNX Runtime runs MobileNetV2 (the fungi classifier)
about 1.5x faster per core than TensorFlow, and the Inception models a few
percent faster (see benchmarks/RESULTS.md), so a job costs fewer
worker-hours.  TensorFlow stays the reference: ``OnnxRuntime.load`` compares
the ONNX outputs with TensorFlow's on the fixed probe batch and refuses
(``ModelError``) beyond the model kind's tolerance.

How a model gets its ONNX file, first found wins:

1. staged: ``<model_dir>/natvision.onnx``, written next to the model once by
   ``natvision-stage-onnx`` (tools/stage_onnx.py), so that no worker
   converts anything;
2. cached: ``<cache>/<name>-<key>.onnx`` on the machine's disk, where the
   key hashes what the file is made from, never where the model lies: the
   fingerprint of its files, the converter's version, the opset and the
   cache format.  A moved or copied model folder finds the file made for
   the original, so it is not converted again.  The first
   process of a machine converts (under a file lock) and the others of
   that machine wait and reuse the file.

A conversion runs in a child process (``onnx_convert.convert_in_child``,
multiprocessing ``spawn``): it imports TensorFlow and tf2onnx, loads the
model, converts it, checks the result on the probe batch, times both
runtimes on it and writes the file; its peak memory (several GB for the
Inceptions) leaves with it, and the job's process stays as small as ONNX
Runtime needs.  Before it decides the runtimes, the launcher converts
every model of the run that has no file in one child process
(``convert_missing``), so TensorFlow and tf2onnx start once per run.

What a file records (its ONNX metadata): the fingerprint of the model files
it was made from, and the check made when it was made: TensorFlow's
outputs on the probe batch, the difference found and the probe timings of
both runtimes (``RecordedCheck``).  Loading a file whose fingerprint
matches runs the probe batch through ONNX Runtime and compares it with the
recorded TensorFlow outputs: no TensorFlow is imported, so a worker that
runs ONNX only never loads it, and the launcher of ``--runtime auto``
decides from the recorded timings.  A file without a recorded check (staged
by an older natvision) is checked against TensorFlow loaded for the
purpose, as before.  A staged file that does not match the model next to
it is ignored with a warning (the model was replaced after staging).

Inside a process a model is loaded and checked once: the launcher
remembers the runtime it decided on (``base.remember``) and a worker of
the same process (the DirectRunner) takes it over; a worker elsewhere
opens the very file the launcher checked (``RuntimeDecision.onnx_path``,
matched by fingerprint), or the staged or cached copy of it on its
machine.

onnxruntime, tf2onnx and onnx are imported lazily: the TF runtime needs none
of them, and nothing here imports TensorFlow unless a conversion or a check
against TensorFlow runs in this process.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import models as models_lib
from natvision.transforms.runtimes import base
from natvision.transforms.runtimes import onnx_convert
from natvision.transforms.runtimes import onnx_store as store
from natvision.transforms.runtimes.onnx_session import (OnnxSession, RecordedCheck,
                                              process_cores, require_identity)
from natvision.transforms.runtimes.tf import TFRuntime

CHECKED_AGAINST_TF = "tf"
CHECKED_AGAINST_RECORDED = "recorded"


class OnnxRuntime:
  """A model run by ONNX Runtime after a check against TF; ``base.Runtime``.

  ``load()`` finds the model's ONNX file (the one its decision names,
  staged, cached, or converted in a child process), opens it and runs the
  probe batch through it, comparing the outputs with TensorFlow's: those
  recorded in the file when it was made, or, for a file that records none,
  TensorFlow's own, loaded here.  After ``load()``, and after a ``load()``
  that failed the check, ``path``, ``source``, ``fingerprint``,
  ``max_diff`` and ``checked_against`` say what was found and measured
  (None where it did not get that far); ``recorded`` is the file's
  recorded check, if any.

  A model whose decision says ``int8`` opens the quantized file the
  launcher checked (transforms/runtimes/quantize.py), refusing any other.
  A runtime this process loaded and remembered already (``base.recall``) is
  taken over, not loaded again.

  Args:
    resolved: the model, with or without a decision (the launcher's chooser
      loads undecided models; workers decided ones).
    reference: the TF runtime to compare with, loaded or not, used only for
      a file without a recorded check; by default one is made and loaded
      then, and dropped after the check.
    probe: uint8 batch for the check; ``base.probe_batch()`` by default
      (another batch is always checked against TensorFlow itself).
    intra_op_threads: ONNX Runtime threads; all cores of the process by
      default.
    timing_runs: timed probe runs per runtime recorded by a conversion made
      here; 0 records no timings.
  """

  name = base.RUNTIME_ONNX

  def __init__(self, resolved: models_lib.ResolvedModel,
               reference: Optional[TFRuntime] = None,
               probe: Optional[np.ndarray] = None,
               intra_op_threads: Optional[int] = None,
               timing_runs: int = base.DEFAULT_TIMING_RUNS):
    self.resolved = resolved
    self._reference = reference
    self._probe = probe
    self._threads = intra_op_threads or process_cores()
    self._timing_runs = timing_runs
    self._session: Optional[OnnxSession] = None
    decision = resolved.decision
    self.precision = decision.precision if decision else base.FP32
    self.tolerance = base.TOLERANCES[resolved.spec.kind]
    self.path: Optional[str] = None
    self.source: Optional[str] = None
    self.fingerprint: Optional[str] = None
    self.max_diff: Optional[float] = None
    self.checked_against: Optional[str] = None
    self.recorded: Optional[RecordedCheck] = None

  @classmethod
  def opened(cls, resolved: models_lib.ResolvedModel, session: OnnxSession,
             source: str, fingerprint: str, max_diff: float,
             precision: str, checked_against: Optional[str]
             ) -> "OnnxRuntime":
    """A runtime around a session opened and checked elsewhere (int8)."""
    runtime = cls(resolved, intra_op_threads=session.threads)
    runtime._session = session  # pylint: disable=protected-access
    runtime.path, runtime.source = session.path, source
    runtime.fingerprint, runtime.max_diff = fingerprint, max_diff
    runtime.precision, runtime.checked_against = precision, checked_against
    return runtime

  @property
  def key(self) -> tuple:
    """What identifies this file on ONNX Runtime in ``base.remember``."""
    return file_key(self.resolved.name, self.path, self.fingerprint,
                    self.precision, self._threads)

  def remember(self) -> None:
    """Keeps the loaded runtime for the workers of this process."""
    base.remember(self.key, self)

  def _take_over(self, held: "OnnxRuntime") -> None:
    for name in ("path", "source", "fingerprint", "max_diff",
                 "checked_against", "recorded", "precision"):
      setattr(self, name, getattr(held, name))
    self._session = held.session

  def load(self) -> None:
    """Finds or makes the ONNX file, opens it and checks it.

    Raises:
      ModelError: onnxruntime is missing, the file cannot be found, made or
        opened, or its outputs differ from TensorFlow's by more than the
        tolerance (the message names the model, the difference and the
        tolerance); for int8, the launcher's file is not here or is not
        the one it checked.
    """
    if self._session is not None:
      return
    decision = self.resolved.decision
    if decision is not None and decision.onnx_path and decision.fingerprint:
      held = base.recall(file_key(self.resolved.name, decision.onnx_path,
                                  decision.fingerprint, decision.precision,
                                  self._threads))
      if held is not None:
        self._take_over(held)
        return
    spec = self.resolved.spec
    if importlib.util.find_spec("onnxruntime") is None:
      raise models_lib.ModelError(
          f"model {spec.name}: the onnx runtime needs the onnxruntime "
          f"package; pip install onnxruntime tf2onnx, or pass --runtime tf")
    if self.precision == base.INT8:
      self._load_int8(decision)
      return
    session, self.source, self.fingerprint = find_or_convert(
        self.resolved, self._threads, self._timing_runs,
        fingerprint=decision.fingerprint if decision else None,
        decided_path=decision.onnx_path if decision else None,
        decided_source=decision.onnx_source if decision else None)
    self.path = session.path
    self._check(session)
    self._session = session
    self._reference = None  # a worker keeps ONNX Runtime alone in memory
    if decision is not None:
      self.remember()

  def _check(self, session: OnnxSession) -> None:
    spec = self.resolved.spec
    batch = self._probe
    recorded = None
    if batch is None:
      batch = base.probe_batch(spec.input_size)
      if session.fingerprint == self.fingerprint:
        recorded = RecordedCheck.from_metadata(session.metadata)
      if recorded is not None and recorded.reference.shape != (
          len(batch), spec.output_width):
        recorded = None
    self.recorded = recorded
    if recorded is not None:
      expected = recorded.reference
      self.checked_against = CHECKED_AGAINST_RECORDED
    else:
      if self._reference is None:
        self._reference = TFRuntime(self.resolved)
      self._reference.load()
      expected = self._reference.predict(batch)
      self.checked_against = CHECKED_AGAINST_TF
    got = session.predict_probe(batch)
    self.max_diff = base.output_difference(got, expected)
    if got.shape != expected.shape:
      raise models_lib.ModelError(
          f"model {spec.name}: ONNX output shape {list(got.shape)} differs "
          f"from TF's {list(expected.shape)} on the probe batch "
          f"({session.path})")
    if not self.max_diff <= self.tolerance:
      where = ("TensorFlow's outputs recorded in the file"
               if recorded is not None else "TensorFlow's")
      raise models_lib.ModelError(
          f"model {spec.name}: ONNX Runtime's outputs differ from "
          f"TensorFlow's by {self.max_diff:.3g} on the probe batch, more than "
          f"the {spec.kind} tolerance {self.tolerance:.0e} (max|onnx - tf| / "
          f"max(1, max|tf|), against {where}); ONNX file {session.path} "
          f"({self.source})")

  def _load_int8(self, decision) -> None:
    """Opens the quantized file the launcher checked, and only that one."""
    spec = self.resolved.spec
    path = decision.onnx_path
    if path:  # a bucket path: published by the launcher for this worker
      path = store.local_copy(path, os.path.basename(path))
    if not path or not os.path.exists(path):
      raise models_lib.ModelError(
          f"model {spec.name}: the int8 file the launcher checked "
          f"({decision.onnx_path}) cannot be found from this machine; with "
          f"--precision int8 the output must be on a bucket (the file is "
          f"published under it) or on the launcher's machine")
    session = OnnxSession(self.resolved, path, self._threads)
    require_identity(session, base.INT8, decision.fingerprint,
                     "the int8 file the launcher checked")
    self._session = session
    self.path, self.source = decision.onnx_path, decision.onnx_source
    self.fingerprint, self.max_diff = decision.fingerprint, decision.max_diff
    self.checked_against = decision.checked_against
    self.remember()

  @property
  def session(self) -> OnnxSession:
    if self._session is None:
      raise RuntimeError(
          f"model {self.resolved.name}: OnnxRuntime.predict before load()")
    return self._session

  @property
  def providers(self) -> list:
    """ONNX Runtime's execution providers in use; empty before load()."""
    return list(self._session.providers) if self._session else []

  def predict(self, batch: np.ndarray) -> np.ndarray:
    """uint8 or [0, 1] float ``[n, s, s, 3]`` -> float32 ``[n, width]``."""
    return self.session.predict(batch)

  def describe(self) -> dict:
    return {"runtime": self.name, "model": self.resolved.name,
            "precision": self.precision, "onnx_path": self.path,
            "onnx_source": self.source, "providers": self.providers,
            "max_diff": self.max_diff, "tolerance": self.tolerance,
            "checked_against": self.checked_against}


def file_key(name: str, path: Optional[str], fingerprint: Optional[str],
             precision: str, threads: int) -> tuple:
  """The ``base.remember`` key of one model's ONNX file opened with
  ``threads``."""
  real = os.path.realpath(path) if path and "://" not in path else path
  return (base.RUNTIME_ONNX, name, real, fingerprint, precision, threads)


# --------------------------------------------------------------------------
# Finding the file: the decided one, staged, cached, or converted here.


def _local_staged(resolved: models_lib.ResolvedModel,
                  fingerprint: Optional[str]) -> Tuple[Optional[str], str]:
  """The staged file as a local path (None if none), and the fingerprint.

  Without a fingerprint (the launcher) the model is staged locally and
  fingerprinted.  With one (a worker, from its decision) only the staged
  file is looked at: a remote one is copied alone into the cache, the model
  is not downloaded.
  """
  if fingerprint is None:
    local = models_lib.stage_locally(resolved.path)
    fingerprint = base.model_fingerprint(local)
    staged = os.path.join(local, store.STAGED_ONNX)
    return (staged if os.path.exists(staged) else None), fingerprint
  staged = store.staged_onnx_path(resolved)
  if "://" in staged and not FileSystems.exists(staged):
    return None, fingerprint
  local = store.local_copy(staged,
                           f"{resolved.name}-staged-{fingerprint[:16]}.onnx")
  return (local if os.path.exists(local) else None), fingerprint


def find_or_convert(resolved: models_lib.ResolvedModel,
                    intra_op_threads: Optional[int] = None,
                    timing_runs: int = base.DEFAULT_TIMING_RUNS,
                    fingerprint: Optional[str] = None,
                    decided_path: Optional[str] = None,
                    decided_source: Optional[str] = None
                    ) -> Tuple[OnnxSession, str, str]:
  """Finds the model's ONNX file, or makes it, and opens it.

  Looks for, in order: the file a decision names (when it is on this
  machine and records ``fingerprint``), the staged file, the cached file;
  else converts the model in a child process (one conversion per machine
  at a time, under a file lock).

  Args:
    resolved: the model.
    intra_op_threads: ONNX Runtime threads.
    timing_runs: timed probe runs per runtime a conversion records.
    fingerprint: the fingerprint of the model files, when known (from the
      launcher's decision); computed from the model files otherwise.
    decided_path, decided_source: the file the launcher checked and where
      it came from.

  Returns:
    The open session; where its file came from (``staged``, ``cached`` or
    ``converted``, or the decision's source for the decided file); the
    fingerprint of the model files.

  Raises:
    ModelError: the conversion failed or the file cannot be opened.
  """
  if (decided_path and fingerprint and "://" not in decided_path
      and os.path.exists(decided_path)):
    session = OnnxSession(resolved, decided_path, intra_op_threads)
    if session.fingerprint == fingerprint:
      return session, decided_source or "cached", fingerprint
    del session
  staged, fingerprint = _local_staged(resolved, fingerprint)
  if staged is not None:
    session = OnnxSession(resolved, staged, intra_op_threads)
    if session.fingerprint == fingerprint:
      return session, "staged", fingerprint
    logging.warning(
        "model %s: ignoring %s, which was made from other model files than "
        "the ones next to it (fingerprint %s, model %s); restage it with "
        "natvision-stage-onnx", resolved.name, store.staged_onnx_path(resolved),
        session.fingerprint, fingerprint)
    del session
  path = store.cached_onnx_path(resolved, fingerprint)

  def convert(target: str) -> None:
    if importlib.util.find_spec("tf2onnx") is None:
      raise models_lib.ModelError(
          f"model {resolved.name}: no ONNX file staged or cached, and "
          f"converting one needs the tf2onnx package; pip install tf2onnx, "
          f"stage the file with natvision-stage-onnx, or pass --runtime tf")
    onnx_convert.convert_in_child(resolved, target, timing_runs)

  source = "converted" if store.make_once(path, convert) else "cached"
  return OnnxSession(resolved, path, intra_op_threads), source, fingerprint


def convert_missing(models: Sequence[models_lib.ResolvedModel],
                    timing_runs: int = base.DEFAULT_TIMING_RUNS) -> List[str]:
  """Converts, in one child process, every model that has no ONNX file.

  The launcher calls this before it decides the runtimes, so that a run
  whose models all need converting starts TensorFlow and tf2onnx once
  rather than once per model (``onnx_convert.convert_many``).  Models
  asking for ``--runtime tf``, with a staged file, or with a cached one are
  left alone (``find_or_convert`` opens theirs); so is everything when
  tf2onnx is missing (the chooser then says so, per model).  One console
  line says what is converted and about how long it takes.

  Returns:
    The names of the models converted.

  Raises:
    ModelError: the child failed or died.
  """
  if importlib.util.find_spec("tf2onnx") is None:
    return []
  pairs, seconds = [], 0.0
  for resolved in models:
    if resolved.requested_runtime == base.RUNTIME_TF:
      continue
    staged, fingerprint = _local_staged(resolved, None)
    path = store.cached_onnx_path(resolved, fingerprint)
    if staged is None and not os.path.exists(path):
      pairs.append((resolved, path))
      seconds += onnx_convert.conversion_seconds(
          models_lib.stage_locally(resolved.path))
  if not pairs:
    return []
  names = [r.name for r, _ in pairs]
  folder = os.path.dirname(pairs[0][1])
  base.announce(
      f"converting {len(pairs)} model(s) to ONNX in one child process, once "
      f"per machine (cached in {folder}): {', '.join(names)}",
      seconds - onnx_convert.CONVERSION_START_SECONDS * (len(pairs) - 1))
  with store.folder_lock(folder):
    pairs = [(r, p) for r, p in pairs if not os.path.exists(p)]
    if not pairs:
      return []
    done = onnx_convert.convert_many(pairs, timing_runs)
  logging.info("converted %s to ONNX in one child process: %s",
               ", ".join(done), ", ".join(f"{s:.1f} s" for s in done.values()))
  return list(done)
