"""--precision int8: whether a model runs quantized, decided on job photos.

Why: on CPUs with 8-bit dot-product instructions (AVX-512 VNNI, AMX),
ONNX Runtime runs a statically quantized CNN about twice as fast as in
float32 (benchmarks/RESULTS.md), so a job costs half the worker-hours.
Quantized outputs differ from float32 ones by much more than the runtime
tolerances, so int8 is opt-in (``--precision int8``; fp32 stays the exact
default) and is checked on the job's own photos before anything runs.

This module owns the flags (``QuantizationConfig``) and the decision
(``decide_int8``, called by the launcher after the fp32 decision):

1. the model's fp32 ONNX file (checked against TensorFlow as usual) is
   quantized on ``--calibration_photos`` of the job's own prepared photos
   (``int8_file``: how, and the cache keyed by content), unless a cached
   int8 file of the same model, calibrated on another job's photos, passes
   the minimums on this job's held-out photos (``int8_cache``), which is
   then reused;
2. ``--agreement_photos`` other photos of the job (held out from the
   calibration) go through the fp32 and the int8 model, and the agreement
   is measured (``agreement``: the figures per kind of model, and the
   default minimums with their reasons);
3. below any ``--min_agreement`` the job is refused (``ModelError``, exit
   status 2) naming the model and the figure; else the decision says
   ``int8`` with the figures (``Agreement``), which go to the tables'
   metadata and run.json, and workers open exactly that file
   (``OnnxRuntime`` checks its precision and fingerprint).  For workers on
   other machines the file is published under the output
   (``published_dir``).

The tiny stand-ins of the tests and the full-size stand-ins of the
benchmarks have random weights: how well they quantize says nothing about
the agreement the real models reach.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import config as config_lib
from natvision.transforms import models as models_lib
from natvision.transforms.runtimes import base
from natvision.transforms.runtimes import int8_cache
from natvision.transforms.runtimes import int8_file
from natvision.transforms.runtimes import onnx_store as store
from natvision.transforms.runtimes.agreement import (DEFAULT_MINIMUMS, Agreement,
                                           measure_agreement, split_sample)
from natvision.transforms.runtimes.onnx import OnnxRuntime
from natvision.transforms.runtimes.onnx_session import OnnxSession, require_identity
from natvision.transforms.runtimes.tf import TFRuntime

DEFAULT_CALIBRATION_PHOTOS = 32
DEFAULT_AGREEMENT_PHOTOS = 64
AGREEMENT_BATCH = 16
QUANTIZED_SOURCE = "quantized"
PUBLISHED_DIR = "_models"
CHECKED_AGAINST_FP32 = "fp32 on the job's photos"



@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
  """``--precision`` and what int8 is calibrated and checked on.

  Attributes:
    precision: ``fp32`` (the default) or ``int8``.
    min_agreement: (figure, minimum) pairs, every figure of
      ``agreement.FIGURES``.
    calibration_photos: photos of the job the ranges are calibrated on.
    agreement_photos: other photos of the job int8 is checked on.

  Raises:
    config.ConfigError: an unknown precision or figure, a minimum outside
      [0, 1], or a count below 1.
  """

  precision: str = base.FP32
  min_agreement: Tuple[Tuple[str, float], ...] = tuple(
      DEFAULT_MINIMUMS.items())
  calibration_photos: int = DEFAULT_CALIBRATION_PHOTOS
  agreement_photos: int = DEFAULT_AGREEMENT_PHOTOS

  def __post_init__(self):
    if self.precision not in base.PRECISIONS:
      raise config_lib.ConfigError(
          f"--precision must be one of {', '.join(base.PRECISIONS)}, not "
          f"{self.precision!r}")
    for figure, minimum in self.min_agreement:
      if figure not in DEFAULT_MINIMUMS:
        raise config_lib.ConfigError(
            f"--min_agreement names {figure!r}; the figures are "
            f"{', '.join(DEFAULT_MINIMUMS)}")
      if not 0.0 <= minimum <= 1.0:
        raise config_lib.ConfigError(
            f"--min_agreement {figure}={minimum} must be between 0 and 1")
    if self.calibration_photos < 1:
      raise config_lib.ConfigError("--calibration_photos must be at least 1")
    if self.agreement_photos < 2:
      raise config_lib.ConfigError("--agreement_photos must be at least 2")

  @property
  def int8(self) -> bool:
    return self.precision == base.INT8

  @property
  def minimums(self) -> Dict[str, float]:
    return dict(self.min_agreement)

  @property
  def sample_size(self) -> int:
    """Photos the launcher reads: calibration and held-out together."""
    return self.calibration_photos + self.agreement_photos

  @staticmethod
  def add_flags(parser) -> None:
    """Adds --precision, --min_agreement, --calibration_photos and
    --agreement_photos."""
    parser.add_argument(
        "--precision", choices=base.PRECISIONS, default=base.FP32,
        help="fp32: the models' own arithmetic; int8: ONNX "
        "Runtime's static quantization, calibrated on the job's photos and "
        "checked against fp32 on others before the job runs")
    parser.add_argument(
        "--min_agreement", default="",
        help="with --precision int8, the least agreement with fp32 to run: "
        "one number for every figure, or FIGURE=VALUE pairs, comma-"
        "separated, from " + ", ".join(
            f"{k}={v}" for k, v in DEFAULT_MINIMUMS.items()) + " (default: "
        "those values)")
    parser.add_argument(
        "--calibration_photos", type=int, default=DEFAULT_CALIBRATION_PHOTOS,
        help="with --precision int8, photos of the job that calibrate the "
        "quantization")
    parser.add_argument(
        "--agreement_photos", type=int, default=DEFAULT_AGREEMENT_PHOTOS,
        help="with --precision int8, other photos of the job on which int8 "
        "is checked against fp32")

  @classmethod
  def from_args(cls, args) -> "QuantizationConfig":
    """Builds the config from parsed flags; no I/O.

    Raises:
      config.ConfigError: naming the flag.
    """
    return cls(precision=args.precision,
               min_agreement=parse_minimums(args.min_agreement),
               calibration_photos=args.calibration_photos,
               agreement_photos=args.agreement_photos)


def parse_minimums(text: str) -> Tuple[Tuple[str, float], ...]:
  """``--min_agreement``: ``""``, ``"0.99"`` or ``"top1_agreement=0.99,..."``.

  Returns:
    (figure, minimum) for every figure: the defaults, overridden by the
    text (one number overrides them all).

  Raises:
    config.ConfigError: a value that is not a number, or an unknown figure.
  """
  minimums = dict(DEFAULT_MINIMUMS)
  text = (text or "").strip()
  if not text:
    return tuple(minimums.items())
  try:
    if "=" not in text:
      value = float(text)
      return tuple((k, value) for k in minimums)
    for part in text.split(","):
      figure, sep, value = part.partition("=")
      if not sep:
        raise ValueError(part)
      figure = figure.strip()
      if figure not in minimums:
        raise config_lib.ConfigError(
            f"--min_agreement names {figure!r}; the figures are "
            f"{', '.join(DEFAULT_MINIMUMS)}")
      minimums[figure] = float(value)
  except ValueError as e:
    if isinstance(e, config_lib.ConfigError):
      raise
    raise config_lib.ConfigError(
        f"--min_agreement takes a number or FIGURE=VALUE pairs, e.g. "
        f"top1_agreement=0.98,mean_cosine=0.995; got {text!r}") from None
  return tuple(minimums.items())


def _predict_all(runtime, photos: np.ndarray) -> np.ndarray:
  return np.concatenate([runtime.predict(photos[i:i + AGREEMENT_BATCH])
                         for i in range(0, len(photos), AGREEMENT_BATCH)])


def published_dir(output_dir: Optional[str]) -> Optional[str]:
  """Where the launcher puts int8 files for workers on other machines.

  ``<output_dir>/_models/`` when the output is on a bucket (the job runs on
  workers that share nothing else with the launcher); None for a local
  output (the workers are on the launcher's machine, which has the file in
  its cache).
  """
  if output_dir and "://" in output_dir:
    return FileSystems.join(output_dir, PUBLISHED_DIR)
  return None


def decide_int8(resolved: models_lib.ResolvedModel,
                photos: Sequence[np.ndarray],
                quantization: QuantizationConfig,
                intra_op_threads: Optional[int] = None,
                publish_dir: Optional[str] = None
                ) -> base.RuntimeDecision:
  """Quantizes a model decided on fp32 ONNX and checks it on the photos.

  Args:
    resolved: the model with its fp32 decision (``chooser.choose``).
    photos: prepared uint8 ``[size, size, 3]`` photos of the job, for the
      model's preparation; split by ``split_sample``.
    quantization: the minimums and the sample sizes.
    intra_op_threads: ONNX Runtime threads; all cores by default.
    publish_dir: a folder (a bucket) the checked file is copied to, and
      that the decision then names, for workers on other machines
      (``published_dir``); None keeps the cached file's local path.

  Returns:
    The int8 decision (``precision`` int8, the quantized file, the
    agreement); the int8 runtime stays loaded in this process for its
    workers, the fp32 one is let go.

  Raises:
    ModelError: the model was not decided on ONNX Runtime, too few photos,
      the quantization failed, or an agreement figure is below its minimum
      (the message names the model and the figure).
  """
  name = resolved.name
  decision = resolved.require_decision()
  passed = (decision.onnx_path is not None
            and decision.onnx_max_diff is not None
            and decision.tolerance is not None
            and decision.onnx_max_diff <= decision.tolerance)
  if not passed:
    raise models_lib.ModelError(
        f"model {name}: --precision int8 quantizes the fp32 ONNX model, and "
        f"{name} has none that passed its check ({decision.note}); run in "
        f"fp32, or pass --runtime onnx to see why")
  if decision.runtime != base.RUNTIME_ONNX:
    # auto preferred TensorFlow's fp32 speed; int8 runs on ONNX Runtime.
    base.forget(TFRuntime(resolved).key)
    decision = dataclasses.replace(
        decision, runtime=base.RUNTIME_ONNX, max_diff=decision.onnx_max_diff,
        fallback=None)
    resolved = resolved.with_decision(decision)
  calibration, held_out = split_sample(photos, quantization.calibration_photos,
                                       quantization.agreement_photos)
  fp32 = OnnxRuntime(resolved, intra_op_threads=intra_op_threads)
  fp32.load()  # the launcher's, taken over
  path = int8_file.quantized_path(resolved, fp32.path, decision.fingerprint,
                                  int8_file.array_digest(calibration))
  held_out_digest = int8_file.array_digest(held_out)
  figures = None
  if not os.path.exists(path):
    # Another job's int8 file, if it agrees well enough on this job's
    # held-out photos (transforms/runtimes/int8_cache.py).
    reused = _reuse_cached_int8(resolved, fp32, held_out, quantization,
                                intra_op_threads)
    if reused is not None:
      path, figures = reused
  made = store.make_once(path, lambda target: int8_file.quantize_in_child(
      resolved, fp32.path, target, calibration, decision.fingerprint))
  source = QUANTIZED_SOURCE if made else "cached"
  session = OnnxSession(resolved, path, intra_op_threads)
  require_identity(session, base.INT8, decision.fingerprint,
                   "an int8 file of this model")
  if figures is None:
    figures = int8_cache.recorded(path, held_out_digest)
  if figures is None:
    figures = measure_agreement(resolved.spec.kind,
                                _predict_all(fp32, held_out),
                                _predict_all(session, held_out))
    int8_cache.record(path, decision.fingerprint, held_out_digest, figures,
                      len(held_out))
  minimums = quantization.minimums
  agreement = Agreement(
      figures=figures,
      minimums={k: minimums[k] for k in figures},
      held_out=len(held_out), calibration=len(calibration))
  below = agreement.below()
  if below:
    figure = below[0]
    raise models_lib.ModelError(
        f"model {name}: int8 {figure} {figures[figure]:.4f} against fp32 on "
        f"{len(held_out)} held-out photos of this job is below "
        f"--min_agreement {figure}={minimums[figure]} ("
        f"{agreement.summary()}); run in fp32 (drop --precision int8) or "
        f"lower the minimum")
  probe = base.probe_batch(resolved.spec.input_size)
  max_diff = base.output_difference(session.predict(probe),
                                    fp32.predict(probe))
  int8 = OnnxRuntime.opened(resolved, session, source=source,
                            fingerprint=decision.fingerprint,
                            max_diff=max_diff, precision=base.INT8,
                            checked_against=CHECKED_AGAINST_FP32)
  if publish_dir:
    path = int8.path = store.copy_file(
        path, FileSystems.join(publish_dir, os.path.basename(path)))
  base.forget(fp32.key)
  int8.remember()
  logging.info("model %s runs on ONNX Runtime in int8 (%s file %s): %s",
               name, source, path, agreement.summary())
  return dataclasses.replace(
      decision,
      note=(f"ONNX Runtime, int8 (static, QDQ, per-channel, calibrated on "
            f"{agreement.calibration} photos of the job); agreement with "
            f"fp32: {agreement.summary()}"),
      max_diff=max_diff, onnx_path=path, onnx_source=source,
      checked_against=CHECKED_AGAINST_FP32, precision=base.INT8,
      agreement=agreement)


def _reuse_cached_int8(resolved: models_lib.ResolvedModel,
                       fp32: OnnxRuntime, held_out: np.ndarray,
                       quantization: QuantizationConfig,
                       intra_op_threads: Optional[int]
                       ) -> Optional[Tuple[str, Dict[str, float]]]:
  """A cached int8 file of this model that passes the minimums on this
  job's held-out photos, and its figures; None when none does."""
  fp32_out: List[np.ndarray] = []

  def measure(path: str) -> Dict[str, float]:
    if not fp32_out:
      fp32_out.append(_predict_all(fp32, held_out))
    session = OnnxSession(resolved, path, intra_op_threads)
    return measure_agreement(resolved.spec.kind, fp32_out[0],
                             _predict_all(session, held_out))

  found = int8_cache.find_passing(
      resolved.name, resolved.require_decision().fingerprint,
      int8_file.array_digest(held_out), quantization.minimums, len(held_out),
      measure)
  if found is not None:
    logging.getLogger("natvision").info(
        "model %s: reusing the cached int8 file %s, whose agreement with "
        "fp32 on this job's %d held-out photos passes the minimums (%s)",
        resolved.name, found[0], len(held_out),
        ", ".join(f"{k} {v:.4f}" for k, v in found[1].items()))
  return found


# The job's photos for a sample size: preparation policy -> uint8 arrays
# (``transforms.runtimes.sample``).
PhotoSample = Callable[[int], Dict[str, List[np.ndarray]]]


def fp32_request(resolved: models_lib.ResolvedModel,
                 quantization: QuantizationConfig
                 ) -> models_lib.ResolvedModel:
  """The model as the fp32 chooser should see it.

  int8 is quantized from the fp32 ONNX model: with ``--precision int8``,
  ``--runtime auto`` asks for ONNX Runtime (no timing against TensorFlow,
  which int8 would not use).
  """
  if quantization.int8 and resolved.requested_runtime == base.RUNTIME_AUTO:
    return dataclasses.replace(resolved, requested_runtime=base.RUNTIME_ONNX)
  return resolved


def with_int8(models: Sequence[models_lib.ResolvedModel],
              quantization: QuantizationConfig, read_photos: PhotoSample,
              output_dir: Optional[str] = None,
              intra_op_threads: Optional[int] = None
              ) -> Tuple[models_lib.ResolvedModel, ...]:
  """The models with int8 decisions, when ``--precision int8`` asks for it.

  Args:
    models: models with their fp32 decisions.
    quantization: ``--precision`` and the rest.
    read_photos: reads ``n`` of the job's photos, prepared for every policy
      the models need; called once, only for int8.
    output_dir: the job's ``--output_dir``; on a bucket, the int8 files are
      published under it for remote workers (``published_dir``).
    intra_op_threads: ONNX Runtime threads.

  Returns:
    The models, each with its int8 decision (unchanged for fp32).

  Raises:
    ModelError: see ``decide_int8``; the first model refused stops the job.
  """
  if not quantization.int8:
    return tuple(models)
  photos = read_photos(quantization.sample_size)
  return tuple(
      m.with_decision(decide_int8(m, photos.get(m.resize, []), quantization,
                                  intra_op_threads,
                                  published_dir(output_dir)))
      for m in models)
