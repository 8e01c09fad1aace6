"""Which cached int8 file a ``--precision int8`` job may reuse.

A quantized file is cached under a key that includes its calibration photos
(``int8_file.quantized_path``), so another job, with other photos, would
otherwise calibrate again: minutes for a full-size model.  What makes an
int8 file good enough for a job is not its calibration but its agreement
with fp32 on that job's held-out photos (``agreement.measure_agreement``),
so a job first tries the cached int8 files of the same model (same
fingerprint): the agreement of each on this job's held-out photos is read
from its record when that job's photos were measured before, else measured
and recorded; the first file whose figures pass the job's
``--min_agreement`` minimums is reused, and the model is calibrated and
quantized again only when none passes.

The record is a JSON file next to each int8 file (``<file>.agreement.json``,
written atomically): the model's fingerprint, and per held-out sample (a
digest of its pixels) the figures measured and the number of photos.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from natvision.transforms.runtimes import onnx_store as store

RECORD_SUFFIX = ".agreement.json"

# A held-out sample's figures: figure name -> value.
Figures = Dict[str, float]


def record_path(int8_path: str) -> str:
  return int8_path + RECORD_SUFFIX


def _read(int8_path: str) -> dict:
  try:
    with open(record_path(int8_path), encoding="utf-8") as f:
      record = json.load(f)
    return record if isinstance(record, dict) else {}
  except (OSError, ValueError):
    return {}


def recorded(int8_path: str, held_out_digest: str) -> Optional[Figures]:
  """The figures recorded for one held-out sample; None if never measured."""
  entry = _read(int8_path).get("samples", {}).get(held_out_digest)
  if not isinstance(entry, dict) or not isinstance(entry.get("figures"),
                                                    dict):
    return None
  return {k: float(v) for k, v in entry["figures"].items()}


def record(int8_path: str, fingerprint: str, held_out_digest: str,
           figures: Mapping[str, float], held_out: int) -> None:
  """Adds one held-out sample's figures to the file's record."""
  data = _read(int8_path)
  data["fingerprint"] = fingerprint
  data.setdefault("samples", {})[held_out_digest] = {
      "figures": dict(figures), "held_out": held_out}
  store.write_atomically(record_path(int8_path),
                         json.dumps(data, sort_keys=True).encode())


def candidates(name: str, fingerprint: str,
               folder: Optional[str] = None) -> List[str]:
  """The cached int8 files of this model (by its fingerprint), newest first.

  Only files with a record count: a file is recorded when it is first
  checked, so one without (a copy, a crash before the check) is left alone.
  """
  folder = folder or store.cache_dir()
  found = []
  for path in glob.glob(os.path.join(glob.escape(folder),
                                     f"{glob.escape(name)}-*.int8.onnx")):
    if _read(path).get("fingerprint") == fingerprint:
      found.append((os.path.getmtime(path), path))
  return [p for _, p in sorted(found, reverse=True)]


def passes(figures: Mapping[str, float],
           minimums: Mapping[str, float]) -> bool:
  return all(v >= minimums.get(k, 0.0) for k, v in figures.items())


def find_passing(name: str, fingerprint: str, held_out_digest: str,
                 minimums: Mapping[str, float], held_out: int,
                 measure: Callable[[str], Figures],
                 exclude: Optional[str] = None
                 ) -> Optional[Tuple[str, Figures]]:
  """The first cached int8 file whose agreement on this held-out sample
  passes the minimums, with its figures; None when none does.

  Args:
    name, fingerprint: the model.
    held_out_digest: identifies this job's held-out photos.
    minimums: the job's ``--min_agreement``.
    held_out: how many held-out photos (for the record).
    measure: int8 path -> figures on this job's held-out photos; called
      only for a file without a record of this sample (and recorded).
    exclude: a path not to consider (the job's own calibration key).
  """
  for path in candidates(name, fingerprint):
    if path == exclude:
      continue
    figures = recorded(path, held_out_digest)
    if figures is None:
      try:
        figures = measure(path)
      except Exception as e:  # noqa: BLE001 - a broken cache file is skipped
        logging.warning("skipping cached int8 file %s: %s", path, e)
        continue
      record(path, fingerprint, held_out_digest, figures, held_out)
    if passes(figures, minimums):
      return path, figures
  return None
