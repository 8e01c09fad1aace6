"""--precision int8: static quantization with ONNX Runtime, checked on photos.

Why: on CPUs with 8-bit dot-product instructions (AVX-512 VNNI, AMX),
ONNX Runtime runs a statically quantized CNN about twice as fast as in
float32 (benchmarks/RESULTS.md), so a job costs half the worker-hours.
Quantized outputs differ from float32 ones by much more than the runtime
tolerances, so int8 is opt-in (``--precision int8``; fp32 stays the exact
default) and is checked on the job's own photos before anything runs.

How (``decide_int8``, called by the launcher after the fp32 decision):

1. the model's fp32 ONNX file (checked against TensorFlow as usual) is
   quantized with ``onnxruntime.quantization``: ``quant_pre_process``
   (shape inference and graph optimisation, without which the QDQ graph
   runs barely faster than fp32 here), then ``quantize_static`` in the QDQ
   format, weights int8 per output channel, activations uint8 (ONNX
   Runtime's advice for x86 CPUs with VNNI), ranges by MinMax calibration
   on ``--calibration_photos`` of the job's own prepared photos; the head
   (global pooling, dense layer, softmax) stays float32 (``head_nodes``).
   It runs
   in a child process, like a conversion, and the result is cached like a
   converted file, keyed by content (the fp32 file's bytes, the
   calibration photos and the settings), never by a path;
2. ``--agreement_photos`` other photos of the job (held out from the
   calibration) go through the fp32 and the int8 model, and the agreement
   is measured (``measure_agreement``): for a classifier the share of
   photos whose top-1 label is the same (``top1_agreement``) and the mean
   share of fp32's top-5 labels among int8's top-5 (``top5_overlap``);
   for an embedder the mean and the 1st percentile of the cosine
   similarity between the two embeddings of a photo (``mean_cosine``,
   ``p1_cosine``) and the share of photos whose nearest neighbour among
   the other held-out photos (by cosine) is the same photo in both
   (``nn_agreement``);
3. below any ``--min_agreement`` the job is refused (``ModelError``, exit
   status 2) naming the model and the figure; else the decision says
   ``int8`` with the figures (``Agreement``), which go to the tables'
   metadata and run.json, and workers open exactly that file
   (``OnnxRuntime`` checks its precision and fingerprint).

Default minimums (``DEFAULT_MINIMUMS``): published post-training int8
results for ImageNet CNNs lose 0.1 to 2 points of top-1 accuracy
(per-channel MobileNetV2 the most), which is a few percent of labels
changing; a table that people read as "the species" should change at most
about one label in fifty, hence 0.98 top-1 agreement (one disagreement in
the 64 held-out photos passes, two fail) and 0.95 top-5 overlap.  For
embeddings a mean cosine of 0.995 keeps a photo's embedding within about
0.1 radians of its fp32 one on average, 0.98 at the 1st percentile bounds
the worst photos, and 0.9 nearest-neighbour agreement lets near-ties among
unrelated photos swap while catching a quantization that reorders the
space.  The held-out sample is small: each figure moves in steps of about
1/64; ``--agreement_photos`` buys precision with start-up time.

The tiny stand-ins of the tests and the full-size stand-ins of the
benchmarks have random weights: how well they quantize says nothing about
the agreement the real models reach.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import config as config_lib
from natvision.transforms import models as models_lib
from natvision.transforms.runtimes import base
from natvision.transforms.runtimes import int8_cache
from natvision.transforms.runtimes import onnx as onnx_lib
from natvision.transforms.runtimes.onnx import OnnxRuntime, OnnxSession
from natvision.transforms.runtimes.tf import TFRuntime

TOP1_AGREEMENT = "top1_agreement"
TOP5_OVERLAP = "top5_overlap"
MEAN_COSINE = "mean_cosine"
P1_COSINE = "p1_cosine"
NN_AGREEMENT = "nn_agreement"

# The figures measured per kind of model, in the order they are reported.
FIGURES: Dict[str, Tuple[str, ...]] = {
    models_lib.CLASSIFIER: (TOP1_AGREEMENT, TOP5_OVERLAP),
    models_lib.EMBEDDER: (MEAN_COSINE, P1_COSINE, NN_AGREEMENT),
}
DEFAULT_MINIMUMS: Dict[str, float] = {
    TOP1_AGREEMENT: 0.98,
    TOP5_OVERLAP: 0.95,
    MEAN_COSINE: 0.995,
    P1_COSINE: 0.98,
    NN_AGREEMENT: 0.9,
}
DEFAULT_CALIBRATION_PHOTOS = 32
DEFAULT_AGREEMENT_PHOTOS = 64
CALIBRATION_BATCH = 8
AGREEMENT_BATCH = 16
# What the quantization does; part of the cache key and the file's metadata.
SETTINGS = {"format": "QDQ", "per_channel": True, "weights": "QInt8",
            "activations": "QUInt8", "calibration": "MinMax",
            "pre_process": True, "reduce_range": False}
METADATA_CALIBRATION = "natvision_calibration"
QUANTIZED_SOURCE = "quantized"
PUBLISHED_DIR = "_models"
CHECKED_AGAINST_FP32 = "fp32 on the job's photos"


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
  """``--precision`` and what int8 is calibrated and checked on.

  Attributes:
    precision: ``fp32`` (the default) or ``int8``.
    min_agreement: (figure, minimum) pairs, every figure of ``FIGURES``.
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


@dataclasses.dataclass(frozen=True)
class Agreement:
  """How int8 agreed with fp32 on the job's held-out photos.

  Attributes:
    figures: figure name -> value (see ``measure_agreement``).
    minimums: the ``--min_agreement`` of each figure.
    held_out: photos the figures were measured on.
    calibration: photos the quantization was calibrated on.
  """

  figures: Mapping[str, float]
  minimums: Mapping[str, float]
  held_out: int
  calibration: int

  def below(self) -> List[str]:
    """The figures below their minimum, in reporting order."""
    return [k for k, v in self.figures.items()
            if not v >= self.minimums.get(k, 0.0)]

  def summary(self) -> str:
    values = ", ".join(f"{k} {v:.4f}" for k, v in self.figures.items())
    return (f"{values} on {self.held_out} held-out photos (calibrated on "
            f"{self.calibration})")

  def as_dict(self) -> dict:
    return {"figures": dict(self.figures), "minimums": dict(self.minimums),
            "held_out": self.held_out, "calibration": self.calibration}


def classifier_figures(fp32: np.ndarray, int8: np.ndarray,
                       k: int = 5) -> Dict[str, float]:
  """Top-1 agreement and top-k overlap of two ``[n, classes]`` score arrays.

  Returns:
    ``top1_agreement``: share of rows whose highest-scoring class is the
    same; ``top5_overlap``: mean over rows of |top-k of fp32 ∩ top-k of
    int8| / k (k at most the number of classes).
  """
  fp32 = np.asarray(fp32, np.float64)
  int8 = np.asarray(int8, np.float64)
  k = min(k, fp32.shape[1])
  top1 = float(np.mean(np.argmax(fp32, axis=1) == np.argmax(int8, axis=1)))
  best_fp32 = np.argsort(-fp32, axis=1, kind="stable")[:, :k]
  best_int8 = np.argsort(-int8, axis=1, kind="stable")[:, :k]
  overlap = [len(set(a) & set(b)) / k for a, b in zip(best_fp32, best_int8)]
  return {TOP1_AGREEMENT: top1, TOP5_OVERLAP: float(np.mean(overlap))}


def embedder_figures(fp32: np.ndarray, int8: np.ndarray) -> Dict[str, float]:
  """Cosine agreement of two ``[n, width]`` embedding arrays, n >= 2.

  Returns:
    ``mean_cosine`` and ``p1_cosine`` (numpy's linear 1st percentile) of
    the cosine similarity between row i of each; ``nn_agreement``: share
    of rows whose nearest other row by cosine is the same in both.
  """
  fp32 = np.asarray(fp32, np.float64)
  int8 = np.asarray(int8, np.float64)
  unit_fp32 = fp32 / np.maximum(np.linalg.norm(fp32, axis=1, keepdims=True),
                                1e-12)
  unit_int8 = int8 / np.maximum(np.linalg.norm(int8, axis=1, keepdims=True),
                                1e-12)
  cosines = np.sum(unit_fp32 * unit_int8, axis=1)

  def nearest(unit):
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argmax(similarity, axis=1)

  same_neighbour = nearest(unit_fp32) == nearest(unit_int8)
  return {MEAN_COSINE: float(np.mean(cosines)),
          P1_COSINE: float(np.percentile(cosines, 1)),
          NN_AGREEMENT: float(np.mean(same_neighbour))}


def measure_agreement(kind: str, fp32: np.ndarray,
                      int8: np.ndarray) -> Dict[str, float]:
  """The figures of ``FIGURES[kind]`` for one model's outputs on photos."""
  if kind == models_lib.CLASSIFIER:
    return classifier_figures(fp32, int8)
  return embedder_figures(fp32, int8)


def split_sample(photos: Sequence[np.ndarray], calibration_photos: int,
                 agreement_photos: int
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """Calibration and held-out photos from one sample, disjoint.

  With enough photos, the first ``calibration_photos`` calibrate and the
  next ``agreement_photos`` are held out; with fewer, they are split in
  the same proportion, the held-out part getting at least 2.

  Args:
    photos: prepared uint8 ``[size, size, 3]`` arrays.

  Returns:
    (calibration, held_out): uint8 ``[n, size, size, 3]`` arrays.

  Raises:
    ModelError: fewer than 3 photos (one to calibrate, two to compare).
  """
  n = len(photos)
  if n < 3:
    raise models_lib.ModelError(
        f"--precision int8 needs at least 3 readable photos of the job (one "
        f"to calibrate, two to check); found {n}")
  wanted = calibration_photos + agreement_photos
  if n >= wanted:
    calibration = calibration_photos
  else:
    calibration = min(n - 2, max(1, round(n * calibration_photos / wanted)))
  held = min(n - calibration, agreement_photos)
  stacked = np.stack([np.asarray(p, np.uint8) for p in photos])
  return stacked[:calibration], stacked[calibration:calibration + held]


def _digest(array: np.ndarray) -> str:
  digest = hashlib.sha256(repr(array.shape).encode())
  digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()[:16]


def quantized_path(resolved: models_lib.ResolvedModel, fp32_path: str,
                   fingerprint: str, calibration_digest: str) -> str:
  """The cache file of a quantized model, keyed by content only.

  Keyed by the fp32 file's bytes (a hash, read once per call; a fraction of
  a second for a full-size model, next to minutes of quantization), the
  model's fingerprint, the calibration photos, the settings and ONNX
  Runtime's version.  Not by the fp32 file's path or modification time: a
  model folder moved or copied with its staged file reuses the int8 file.
  """
  key = hashlib.sha256("\0".join((
      _file_digest(fp32_path), fingerprint, calibration_digest,
      json.dumps(SETTINGS, sort_keys=True),
      onnx_lib.installed_version("onnxruntime"),
  )).encode()).hexdigest()[:16]
  return os.path.join(onnx_lib.cache_dir(), f"{resolved.name}-{key}.int8.onnx")


def _file_digest(path: str) -> str:
  """sha256 of a local file's bytes, read in 4 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def head_nodes(model) -> List[str]:
  """The nodes that stay float32: from the last global pooling to the end.

  Quantizing them would round the model's outputs to 8 bits: a softmax over
  thousands of classes would lose every probability under 1/255 (the
  top-k of a photo would become ties at 0), and an embedding would move by
  its rounding.  The head (pooling, the dense layer, the softmax) costs a
  few million multiply-adds next to the trunk's billions, so keeping it in
  float32 costs no measurable speed.  Without a global pooling, the nodes
  that produce the graph's outputs and every softmax stay float32.

  Args:
    model: an ONNX ModelProto, its nodes in topological order (as ONNX
      requires).

  Returns:
    The names of those nodes.
  """
  nodes = list(model.graph.node)
  pools = [i for i, n in enumerate(nodes)
           if n.op_type in ("GlobalAveragePool", "GlobalMaxPool")]
  if pools:
    return [n.name for n in nodes[pools[-1]:]]
  outputs = {o.name for o in model.graph.output}
  return [n.name for n in nodes
          if n.op_type == "Softmax" or outputs & set(n.output)]


class _Calibration:
  """An ``onnxruntime.quantization.CalibrationDataReader`` over uint8 photos."""

  def __init__(self, photos: np.ndarray):
    self._batches = iter([
        photos[i:i + CALIBRATION_BATCH].astype(np.float32) / 255.0
        for i in range(0, len(photos), CALIBRATION_BATCH)])

  def get_next(self) -> Optional[dict]:
    batch = next(self._batches, None)
    return None if batch is None else {onnx_lib.ONNX_INPUT: batch}

  def rewind(self) -> None:  # one pass is all MinMax needs
    pass


def quantize_file(resolved: models_lib.ResolvedModel, fp32_path: str,
                  target_path: str, calibration: np.ndarray,
                  fingerprint: str) -> str:
  """Quantizes an fp32 ONNX file to int8 and writes it at ``target_path``.

  Args:
    resolved: the model.
    fp32_path: its checked fp32 ONNX file.
    target_path: where the int8 file goes (written atomically).
    calibration: uint8 ``[n, size, size, 3]`` prepared photos.
    fingerprint: the model's fingerprint, recorded in the file.

  Returns:
    target_path.

  Raises:
    ModelError: ONNX Runtime's quantization tools fail.
  """
  # pylint: disable=import-outside-toplevel
  import onnx
  from onnxruntime import quantization as q
  from onnxruntime.quantization import shape_inference
  # pylint: enable=import-outside-toplevel

  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="natvision-int8-") as tmp:
    source = os.path.join(tmp, "pre.onnx")
    pre_processed = True
    try:
      shape_inference.quant_pre_process(fp32_path, source)
    except Exception as e:  # noqa: BLE001 - the tools raise many kinds
      logging.warning("model %s: quant_pre_process failed (%s); quantizing "
                      "the file as it is, which may run slower", resolved.name,
                      e)
      source, pre_processed = fp32_path, False
    output = os.path.join(tmp, "int8.onnx")
    head = head_nodes(onnx.load(source))
    try:
      q.quantize_static(
          source, output, _Calibration(calibration),
          quant_format=q.QuantFormat.QDQ, per_channel=True,
          reduce_range=False, activation_type=q.QuantType.QUInt8,
          weight_type=q.QuantType.QInt8,
          calibrate_method=q.CalibrationMethod.MinMax,
          nodes_to_exclude=head)
    except Exception as e:  # noqa: BLE001
      raise models_lib.ModelError(
          f"model {resolved.name}: int8 quantization failed: "
          f"{type(e).__name__}: {e}") from e
    proto = onnx.load(output)
  settings = dict(SETTINGS, pre_process=pre_processed,
                  float_head=len(head))
  metadata = {
      onnx_lib.METADATA_MODEL: resolved.name,
      onnx_lib.METADATA_FINGERPRINT: fingerprint,
      onnx_lib.METADATA_PRECISION: base.INT8,
      "natvision_fp32_source": fp32_path,
      METADATA_CALIBRATION: json.dumps({
          "photos": int(len(calibration)), "digest": _digest(calibration),
          "settings": settings,
          "onnxruntime_version": onnx_lib.installed_version(
              "onnxruntime"),
      }, sort_keys=True),
  }
  del proto.metadata_props[:]
  for key, value in metadata.items():
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value
  data = proto.SerializeToString()
  onnx_lib.write_atomically(target_path, data)
  logging.info("quantized %s to int8 (%.1f MB) in %.1f s: %s", resolved.name,
               len(data) / 1e6, time.perf_counter() - start, target_path)
  return target_path


def _quantize_job(resolved, fp32_path, target_path, calibration,
                  fingerprint) -> dict:
  import resource  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.WARNING)
  start = time.perf_counter()
  quantize_file(resolved, fp32_path, target_path, calibration, fingerprint)
  return {"seconds": time.perf_counter() - start,
          "peak_rss_mb": resource.getrusage(
              resource.RUSAGE_SELF).ru_maxrss / 1024.0}


# About what a quantization in a child costs: its start, then per MB of
# the fp32 file (calibration runs the photos through it).
QUANTIZE_START_SECONDS = 5.0
QUANTIZE_SECONDS_PER_MB = 0.3


def quantize_in_child(resolved: models_lib.ResolvedModel, fp32_path: str,
                      target_path: str, calibration: np.ndarray,
                      fingerprint: str) -> str:
  """``quantize_file`` in a spawned child process (in-process if daemonic).

  Raises:
    ModelError: the quantization failed or its process died.
  """
  args = (resolved, fp32_path, target_path, calibration, fingerprint)
  base.announce(
      f"quantizing model {resolved.name} to int8 on {len(calibration)} of "
      f"the job's photos", QUANTIZE_START_SECONDS
      + QUANTIZE_SECONDS_PER_MB * os.path.getsize(fp32_path) / 1e6)
  if multiprocessing.current_process().daemon:
    return quantize_file(*args)
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    try:
      figures = pool.submit(_quantize_job, *args).result()
    except concurrent.futures.process.BrokenProcessPool as e:
      raise models_lib.ModelError(
          f"model {resolved.name}: the process quantizing it died ({e}); it "
          f"may have run out of memory") from e
  logging.info("model %s quantized to int8 in a child process in %.1f s (its "
               "peak memory %.0f MiB)", resolved.name, figures["seconds"],
               figures["peak_rss_mb"])
  return target_path


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
  path = quantized_path(resolved, fp32.path, decision.fingerprint,
                        _digest(calibration))
  source = "cached"
  figures = None
  if not os.path.exists(path):
    # Another job's int8 file, if it agrees well enough on this job's
    # held-out photos (transforms/runtimes/int8_cache.py).
    reused = _reuse_cached_int8(resolved, fp32, held_out, quantization,
                                intra_op_threads)
    if reused is not None:
      path, figures = reused
  if not os.path.exists(path):
    with onnx_lib.file_lock(os.path.join(os.path.dirname(path),
                                         ".convert.lock")):
      if not os.path.exists(path):
        quantize_in_child(resolved, fp32.path, path, calibration,
                          decision.fingerprint)
        source = QUANTIZED_SOURCE
  session = OnnxSession(resolved, path, intra_op_threads)
  found = (session.metadata.get(onnx_lib.METADATA_PRECISION),
           session.metadata.get(onnx_lib.METADATA_FINGERPRINT))
  if found != (base.INT8, decision.fingerprint):
    raise models_lib.ModelError(
        f"model {name}: {path} is not an int8 file of this model "
        f"(precision, fingerprint {found})")
  if figures is None:
    figures = int8_cache.recorded(path, _digest(held_out))
  if figures is None:
    figures = measure_agreement(resolved.spec.kind,
                                _predict_all(fp32, held_out),
                                _predict_all(session, held_out))
    int8_cache.record(path, decision.fingerprint, _digest(held_out), figures,
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
    published = FileSystems.join(publish_dir, os.path.basename(path))
    if not FileSystems.exists(published):
      with open(path, "rb") as f:
        onnx_lib.write_atomically(published, f.read())
    path = int8.path = published
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
      _digest(held_out), quantization.minimums, len(held_out), measure)
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
