"""Pieces shared by the natvision jobs: model flags, table layout, the graph.

``embed_images`` and ``ingest_observations`` differ in where photos come
from and where tables land; both prepare photos once, run each model in
batches and write one table per model plus errors, with what is here.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from transforms import commit
from transforms import fetch as fetch_lib
from transforms import inference
from transforms import models as models_lib
from transforms import photos
from transforms import resume as resume_lib
from transforms import sinks
from transforms import storage

DEFAULT_MODELS = ("inaturalist_v2", "fungi_mobile_v1", "inception_resnet_v2")


class FlagError(ValueError):
  """A flag value that cannot work; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelFlags:
  """The model and photo flags every job takes, parsed and checked."""

  models: Tuple[models_lib.ResolvedModel, ...]
  batch_size: int = inference.DEFAULT_BATCH_SIZE
  top_k: int = inference.DEFAULT_TOP_K
  max_file_bytes: int = photos.DEFAULT_MAX_FILE_BYTES
  max_pixels: int = photos.DEFAULT_MAX_PIXELS
  read_attempts: int = 4
  decode_threads: int = photos.DEFAULT_DECODE_THREADS
  prefetch: int = photos.DEFAULT_PREFETCH
  color_profile: str = photos.DEFAULT_COLOR_PROFILE
  shard_rows: int = sinks.DEFAULT_SHARD_ROWS
  fetch: fetch_lib.FetchConfig = fetch_lib.FetchConfig()

  def __post_init__(self):
    if self.max_file_bytes < 1:
      raise FlagError("--max_file_bytes must be a positive number of bytes")
    if self.max_pixels < 1:
      raise FlagError("--max_pixels must be a positive number of pixels")
    if self.read_attempts < 1:
      raise FlagError("--read_attempts must be at least 1")
    if self.decode_threads < 0:
      raise FlagError("--decode_threads must be 0 (decode inline) or more")
    if self.prefetch < 1:
      raise FlagError("--prefetch must be at least 1")
    if self.color_profile not in photos.COLOR_PROFILES:
      raise FlagError(
          f"--color_profile must be one of {', '.join(photos.COLOR_PROFILES)}")
    if self.shard_rows < 1:
      raise FlagError("--shard_rows must be at least 1")
    for model in self.models:
      try:
        inference.check_settings(model, self.batch_size, self.top_k)
      except ValueError as e:
        raise FlagError(str(e)) from e

  def photo_config(self, expected_total: Optional[int] = None,
                   run_id: Optional[str] = None) -> photos.PhotoConfig:
    return photos.PhotoConfig(
        policies=photos.needed_policies([m.resize for m in self.models]),
        size=self.models[0].spec.input_size,
        max_file_bytes=self.max_file_bytes, max_pixels=self.max_pixels,
        read_attempts=self.read_attempts, expected_total=expected_total,
        color_profile=self.color_profile,
        run_id=run_id, decode_threads=self.decode_threads, prefetch=self.prefetch,
        fetch=self.fetch)

  def inference_config(self, model: models_lib.ResolvedModel
                       ) -> inference.InferenceConfig:
    return inference.InferenceConfig(model, self.batch_size, self.top_k)


def key_values(values: Sequence[str], flag: str) -> Dict[str, str]:
  """Parses repeated ``NAME=VALUE`` flags."""
  pairs = {}
  for value in values or ():
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
      raise FlagError(f"{flag} takes NAME=VALUE, got {value!r}")
    pairs[name.strip()] = path.strip()
  return pairs


def add_model_flags(p: argparse.ArgumentParser) -> None:
  """Adds --models, --model_root and the other model and photo flags."""
  p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                 help="comma-separated registry names (default: all three)")
  p.add_argument("--model_root",
                 help="folder (local or gs://) holding one folder per model")
  p.add_argument("--model_handle", action="append", default=[],
                 metavar="NAME=PATH",
                 help="explicit location of one model (repeatable)")
  p.add_argument("--labelmap", action="append", default=[],
                 metavar="NAME=PATH",
                 help="labelmap CSV (id,name) for a classifier, instead of "
                 "labelmap.csv in its folder")
  p.add_argument("--batch_size", type=int, default=inference.DEFAULT_BATCH_SIZE,
                 help="photos per forward pass")
  p.add_argument("--top_k", type=int, default=inference.DEFAULT_TOP_K,
                 help="labels kept per photo by classifiers")
  p.add_argument("--resize", choices=models_lib.RESIZE_POLICIES,
                 help="override every model's default photo preparation")
  p.add_argument("--runtime", choices=("auto", "tf", "onnx"), default="auto",
                 help="auto: ONNX Runtime where it passes the check against "
                 "TensorFlow and is faster, else TensorFlow; tf; onnx (fail "
                 "if the check fails)")
  p.add_argument("--max_file_bytes", type=int,
                 default=photos.DEFAULT_MAX_FILE_BYTES,
                 help="files larger than this become errors (stage read)")
  p.add_argument("--max_pixels", type=int, default=photos.DEFAULT_MAX_PIXELS,
                 help="photos declaring more pixels are refused before "
                 "decoding (decompression bombs)")
  p.add_argument("--color_profile", choices=photos.COLOR_PROFILES,
                 default=photos.DEFAULT_COLOR_PROFILE,
                 help="ignore: embedded ICC colour profiles are not applied "
                 "(as the seed models were trained); srgb: photos with a "
                 "non-sRGB profile (Adobe RGB, Display P3...) are converted "
                 "to sRGB")
  p.add_argument("--read_attempts", type=int, default=4,
                 help="tries per photo on transient storage errors")
  p.add_argument("--decode_threads", type=int,
                 default=photos.DEFAULT_DECODE_THREADS,
                 help="threads per worker process reading and decoding "
                 "photos ahead of the models (0: decode inline)")
  p.add_argument("--prefetch", type=int, default=photos.DEFAULT_PREFETCH,
                 help="photos read and decoded ahead of the models, per "
                 "bundle")
  p.add_argument("--shard_rows", type=int, default=sinks.DEFAULT_SHARD_ROWS,
                 help="rows per Parquet shard; each shard is closed when "
                 "full, so a rerun after a dead run reuses it")
  fetch_lib.FetchConfig.add_flags(p)


def model_flags_from_args(args: argparse.Namespace,
                          model_root: Optional[str]) -> ModelFlags:
  """Builds ModelFlags from parsed flags; no I/O.

  Raises:
    FlagError: naming the flag that is wrong.
  """
  names = [n.strip() for n in args.models.split(",") if n.strip()]
  if not names:
    raise FlagError("--models is empty; name at least one of "
                    f"{', '.join(models_lib.REGISTRY)}")
  if len(set(names)) != len(names):
    raise FlagError(f"--models names a model twice: {args.models}")
  try:
    resolved = models_lib.resolve_models(
        names, model_root,
        handles=key_values(args.model_handle, "--model_handle"),
        labelmaps=key_values(args.labelmap, "--labelmap"),
        resize=args.resize, requested_runtime=args.runtime)
  except models_lib.ModelError as e:
    raise FlagError(str(e)) from e
  try:
    fetch = fetch_lib.FetchConfig.from_args(args)
  except ValueError as e:
    raise FlagError(str(e)) from e
  return ModelFlags(
      models=tuple(resolved), batch_size=args.batch_size, top_k=args.top_k,
      max_file_bytes=args.max_file_bytes, max_pixels=args.max_pixels,
      color_profile=args.color_profile,
      read_attempts=args.read_attempts, decode_threads=args.decode_threads,
      prefetch=args.prefetch, shard_rows=args.shard_rows, fetch=fetch)


def split_beam_args(parser: argparse.ArgumentParser,
                    argv: Optional[Sequence[str]]
                    ) -> Tuple[argparse.Namespace, PipelineOptions]:
  """Parses our flags; hands the rest to Beam, refusing flags nobody knows."""
  args, beam_args = parser.parse_known_args(argv)
  unknown = unknown_beam_flags(beam_args)
  if unknown:
    raise FlagError(
        f"unknown flag {unknown[0]}: neither a natvision flag nor a Beam "
        f"pipeline option; see --help")
  return args, PipelineOptions(beam_args)


def unknown_beam_flags(beam_args: Sequence[str]) -> List[str]:
  """Flags that no Beam PipelineOptions class defines.

  Beam only logs and drops such flags, so a typo such as ``--output-dir``
  would otherwise be ignored silently.
  """
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  seen = set()
  stack = list(PipelineOptions.__subclasses__())
  while stack:
    cls = stack.pop()
    if cls in seen:
      continue
    seen.add(cls)
    stack.extend(cls.__subclasses__())
    try:
      cls._add_argparse_args(parser)  # pylint: disable=protected-access
    except argparse.ArgumentError:
      pass  # the same flag defined by two option classes
  _, unknown = parser.parse_known_args(list(beam_args))
  return [a for a in unknown if a.startswith("-")]


def check_models(flags: ModelFlags, choose=None) -> ModelFlags:
  """Loads and probes each model, and decides the runtime each will run on.

  For ``--runtime auto`` or ``onnx`` the model is converted to ONNX (once:
  the file is cached) and checked against TensorFlow on a probe batch
  (transforms/runtimes/chooser.py); the decision made here is the one every
  worker runs, and it is recorded in the tables' metadata and run.json.

  Args:
    flags: the parsed flags; each model's ``requested_runtime`` is
      ``--runtime``.
    choose: ``ResolvedModel -> RuntimeDecision``; the chooser's ``choose``
      by default.

  Returns:
    The flags with a ``RuntimeDecision`` attached to each model.

  Raises:
    FlagError: a model that is missing or does not match the registry, or
      that fails the ONNX check under ``--runtime onnx``.
  """
  from transforms.runtimes import chooser  # pylint: disable=import-outside-toplevel
  choose = choose or chooser.choose
  decided = []
  for model in flags.models:
    try:
      if model.spec.kind == models_lib.CLASSIFIER:
        models_lib.read_labelmap(model.labelmap_path,
                                 expected=model.spec.output_width)
      decided.append(model.with_decision(choose(model)))
    except models_lib.ModelError as e:
      raise FlagError(str(e)) from e
  return dataclasses.replace(flags, models=tuple(decided))


class EmbedAndWrite(beam.PTransform):
  """PCollection[ImageRef] -> staged tables, one per model, plus errors.

  Each photo is read, decoded and prepared once; each model then sees the
  photos routed to it (``ImageRef.models``) in batches.  The output holds
  the names of the staged files, once they are final (see CommitRun).
  """

  def __init__(self, flags: ModelFlags, layout: commit.Layout,
               carried: sinks.Carried = (),
               expected_total: Optional[int] = None,
               resume: Optional[resume_lib.ResumePlan] = None):
    super().__init__()
    self._flags = flags
    self._layout = layout
    self._carried = carried
    self._expected_total = expected_total
    self._resume = resume or resume_lib.ResumePlan()

  def expand(self, refs):
    flags, layout, carried = self._flags, self._layout, self._carried
    written = []
    if self._resume.complete:
      complete = self._resume.complete
      refs = refs | "LeaveOutReused" >> beam.Filter(
          lambda r: r.image_id not in complete)
      written.append(refs.pipeline | "ReuseShards" >> resume_lib.ReuseShards(
          self._resume, layout.tables))
    prepped = refs | "ReadAndPrepare" >> photos.ReadAndPrepare(
        flags.photo_config(self._expected_total, layout.run_id))
    error_streams = [prepped.errors]
    for model in flags.models:
      table = layout.model_table(model)
      outputs = (prepped.prepared
                 | f"RunModel[{model.name}]" >> inference.RunModel(
                     flags.inference_config(model)))
      files = (outputs.results
               | f"ToArrow[{model.name}]" >> beam.Map(
                   sinks.results_to_table, table.schema, carried)
               | f"Write[{model.name}]" >> sinks.WriteTable(
                   table.staged, table.schema, flags.shard_rows))
      error_streams.append(outputs.errors)
      written.append(files)
    errors = layout.table(sinks.ERRORS)
    written.append(tuple(error_streams)
                   | "AllErrors" >> beam.Flatten()
                   | "WriteErrors" >> sinks.WriteErrors(
                       errors.staged, errors.schema, carried,
                       flags.shard_rows))
    return tuple(written) | "AllWritten" >> beam.Flatten()


def counter_values(result, prefix: str) -> Dict[str, int]:
  values: Dict[str, int] = {}
  try:
    counters = result.metrics().query()["counters"]
  except Exception:  # noqa: BLE001 - some runners report no metrics
    return values
  for c in counters:
    name = c.key.metric.name
    if name.startswith(prefix):
      values[name[len(prefix):]] = values.get(name[len(prefix):], 0) + (
          c.committed if c.committed is not None else c.attempted)
  return values


def error_breakdown(directory: str, top_reasons: int = 20) -> dict:
  """Errors per stage, per model and per reason, and photos with any error.

  Read back from the committed errors table, so the figures are what readers
  of the table will see.  Reasons are counted with the photo's URI taken out
  of the message, and only the ``top_reasons`` most frequent are kept.
  """
  import collections  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  by_stage = collections.Counter()
  by_model = collections.Counter()
  by_reason = collections.Counter()
  photo_ids = set()
  for path in commit.list_parquet(directory):
    with storage.failing_as("reading", path), FileSystems.open(path) as f:
      table = pq.read_table(f, columns=["image_id", "uri", "stage", "model",
                                        "error"])
    for row in table.to_pylist():
      by_stage[row["stage"]] += 1
      by_model[row["model"] or "(before any model)"] += 1
      reason = row["error"].replace(row["uri"], "<uri>") if row["uri"] else (
          row["error"])
      by_reason[f"{row['stage']}: {reason}"] += 1
      photo_ids.add(row["image_id"])
  return {"by_stage": dict(by_stage), "by_model": dict(by_model),
          "by_reason": dict(by_reason.most_common(top_reasons)),
          "total": sum(by_stage.values()), "photos": len(photo_ids)}


def configure_logging() -> None:
  """INFO for natvision (progress lines), WARNING for chatty libraries."""
  import logging  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.INFO,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("apache_beam", "absl", "tensorflow", "h5py"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
