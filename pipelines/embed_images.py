"""embed_images: photos in, Parquet tables of embeddings and predictions out.

    python -m pipelines.embed_images --input 'photos/*.jpg' \\
        --output_dir out --models inaturalist_v2,fungi_mobile_v1 \\
        --model_root /models [Beam flags]

    python -m pipelines.embed_images --demo     # bundled photos, tiny stand-ins

The graph: read the input (globs or a manifest) into one ``ImageRef`` per
distinct photo; read, decode and prepare each photo once; for each model,
batch and run it; write one table per model plus the errors table into a
staging folder; after the pipeline succeeds, commit the tables, write
``run.json`` and print a summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import sys
import time
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

import transforms
from transforms import inference
from transforms import models as models_lib
from transforms import photos
from transforms import sinks
from transforms import sources

DEFAULT_MODELS = ("inaturalist_v2", "fungi_mobile_v1", "inception_resnet_v2")
SAMPLE_PHOTOS_DIR = os.path.join(os.path.dirname(__file__), "sample_photos")
SAMPLE_PHOTO_EXTENSIONS = ("jpg", "png", "webp")
DEFAULT_DEMO_OUTPUT = "natvision_demo"


class FlagError(ValueError):
  """A flag value that cannot work; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class JobConfig:
  """Everything the job needs besides Beam's own options.

  Built by ``parse_args``; validated in ``__post_init__`` so that a bad
  value fails before any pipeline is built.
  """

  inputs: Tuple[str, ...]
  output_dir: str
  models: Tuple[models_lib.ResolvedModel, ...]
  batch_size: int = inference.DEFAULT_BATCH_SIZE
  top_k: int = inference.DEFAULT_TOP_K
  max_file_bytes: int = photos.DEFAULT_MAX_FILE_BYTES
  max_pixels: int = photos.DEFAULT_MAX_PIXELS
  read_attempts: int = 4
  max_error_rate: Optional[float] = None
  demo: bool = False

  def __post_init__(self):
    if not self.inputs:
      raise FlagError("--input is required (a glob pattern or a manifest)")
    if not self.output_dir:
      raise FlagError("--output_dir is required")
    if self.batch_size < 1:
      raise FlagError("--batch_size must be at least 1")
    if self.top_k < 1:
      raise FlagError("--top_k must be at least 1")
    if self.max_file_bytes < 1:
      raise FlagError("--max_file_bytes must be a positive number of bytes")
    if self.max_pixels < 1:
      raise FlagError("--max_pixels must be a positive number of pixels")
    if self.read_attempts < 1:
      raise FlagError("--read_attempts must be at least 1")
    if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
      raise FlagError("--max_error_rate must be between 0 and 1, e.g. 0.05")
    manifests = [i for i in self.inputs if sources.manifest_format(i)]
    if manifests and len(self.inputs) > 1:
      raise FlagError(
          "--input takes either one manifest or glob patterns, not both: got "
          f"{', '.join(self.inputs)}")

  @property
  def manifest_path(self) -> Optional[str]:
    if len(self.inputs) == 1 and sources.manifest_format(self.inputs[0]):
      return self.inputs[0]
    return None


def _key_values(values: Sequence[str], flag: str) -> Dict[str, str]:
  pairs = {}
  for value in values or ():
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
      raise FlagError(f"{flag} takes NAME=PATH, got {value!r}")
    pairs[name.strip()] = path.strip()
  return pairs


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="natvision-embed",
      description="Embed and classify photos with TF Hub models into Parquet "
      "tables. Flags not listed here go to Apache Beam (e.g. --runner).")
  p.add_argument("--input", action="append", default=[],
                 help="glob pattern on any Beam filesystem (repeatable), or "
                 "one manifest (.csv, .tsv, .jsonl, .parquet, optionally .gz) "
                 "with a uri column")
  p.add_argument("--output_dir", help="folder (local or gs://) for the tables")
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
  p.add_argument("--batch_size", type=int, default=inference.DEFAULT_BATCH_SIZE)
  p.add_argument("--top_k", type=int, default=inference.DEFAULT_TOP_K)
  p.add_argument("--resize", choices=models_lib.RESIZE_POLICIES,
                 help="override every model's default photo preparation")
  p.add_argument("--max_file_bytes", type=int,
                 default=photos.DEFAULT_MAX_FILE_BYTES,
                 help="files larger than this become errors (stage read)")
  p.add_argument("--max_pixels", type=int, default=photos.DEFAULT_MAX_PIXELS,
                 help="photos declaring more pixels are refused before "
                 "decoding (decompression bombs)")
  p.add_argument("--read_attempts", type=int, default=4,
                 help="tries per photo on transient storage errors")
  p.add_argument("--max_error_rate", type=float,
                 help="exit with status 3 when errors/inputs exceeds this")
  p.add_argument("--demo", action="store_true",
                 help="run on the bundled sample photos with tiny stand-in "
                 "models (their outputs mean nothing)")
  return p


def parse_args(argv: Optional[Sequence[str]] = None
               ) -> Tuple[JobConfig, PipelineOptions]:
  """Parses application and Beam flags from one argv; no I/O.

  Raises:
    FlagError: a flag is missing or invalid; the message names it.
  """
  parser = _parser()
  args, beam_args = parser.parse_known_args(argv)
  unknown = unknown_beam_flags(beam_args)
  if unknown:
    raise FlagError(
        f"unknown flag {unknown[0]}: neither a natvision flag nor a Beam "
        f"pipeline option; see --help")
  inputs = list(args.input)
  model_root = args.model_root
  output_dir = args.output_dir
  if args.demo:
    inputs = inputs or [os.path.join(SAMPLE_PHOTOS_DIR, f"*.{ext}")
                        for ext in SAMPLE_PHOTO_EXTENSIONS]
    output_dir = output_dir or DEFAULT_DEMO_OUTPUT
    model_root = model_root or FileSystems.join(output_dir, "_standin_models")
  if not inputs:
    raise FlagError("--input is required (a glob pattern or a manifest)")
  if not output_dir:
    raise FlagError("--output_dir is required (a local folder or gs://...)")
  names = [n.strip() for n in args.models.split(",") if n.strip()]
  if not names:
    raise FlagError("--models is empty; name at least one of "
                    f"{', '.join(models_lib.REGISTRY)}")
  if len(set(names)) != len(names):
    raise FlagError(f"--models names a model twice: {args.models}")
  try:
    resolved = models_lib.resolve_models(
        names, model_root,
        handles=_key_values(args.model_handle, "--model_handle"),
        labelmaps=_key_values(args.labelmap, "--labelmap"),
        resize=args.resize)
  except models_lib.ModelError as e:
    raise FlagError(str(e)) from e
  config = JobConfig(
      inputs=tuple(inputs), output_dir=output_dir or "",
      models=tuple(resolved), batch_size=args.batch_size, top_k=args.top_k,
      max_file_bytes=args.max_file_bytes, max_pixels=args.max_pixels,
      read_attempts=args.read_attempts, max_error_rate=args.max_error_rate,
      demo=args.demo)
  for model in config.models:
    try:
      inference.InferenceConfig(model, config.batch_size, config.top_k)
    except ValueError as e:
      raise FlagError(str(e)) from e
  return config, PipelineOptions(beam_args)


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


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What the launcher learned before building the graph."""

  manifest: Optional[sources.Manifest]
  expected_total: Optional[int]


def prepare_inputs(config: JobConfig) -> Prepared:
  """Checks the input and the models before the pipeline starts.

  Raises:
    FlagError: unreadable manifest, a pattern matching nothing, or a model
      that is missing or does not match the registry.
  """
  try:
    if config.manifest_path:
      manifest = sources.read_manifest_header(config.manifest_path)
      expected = manifest.row_count
    else:
      manifest = None
      expected = sources.count_pattern_matches(config.inputs)
  except sources.InputError as e:
    raise FlagError(str(e)) from e
  for model in config.models:
    try:
      loaded = models_lib.load_model(model)
      if model.spec.kind == models_lib.CLASSIFIER:
        models_lib.read_labelmap(model.labelmap_path,
                                 expected=model.spec.output_width)
      del loaded
    except models_lib.ModelError as e:
      raise FlagError(str(e)) from e
  return Prepared(manifest=manifest, expected_total=expected)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where this run stages and commits its tables."""

  output_dir: str
  run_id: str
  tables: Tuple[sinks.TableSpec, ...]

  @property
  def staging(self) -> str:
    return sinks.staging_dir(self.output_dir, self.run_id)

  def table(self, name: str) -> sinks.TableSpec:
    return next(t for t in self.tables if t.name == name)


def plan_layout(config: JobConfig, carried: sinks.Carried,
                run_id: str) -> Layout:
  staging = sinks.staging_dir(config.output_dir, run_id)
  tables = []
  for model in config.models:
    kind = (sinks.EMBEDDINGS if model.spec.kind == models_lib.EMBEDDER
            else sinks.PREDICTIONS)
    tables.append(sinks.TableSpec(
        name=f"{kind}/{model.name}",
        staged=sinks.table_dir(staging, kind, model.name),
        final=sinks.table_dir(config.output_dir, kind, model.name),
        schema=sinks.schema_for(model, carried)))
  tables.append(sinks.TableSpec(
      name=sinks.ERRORS,
      staged=sinks.table_dir(staging, sinks.ERRORS),
      final=sinks.table_dir(config.output_dir, sinks.ERRORS),
      schema=sinks.errors_schema(carried, config.models)))
  return Layout(output_dir=config.output_dir, run_id=run_id,
                tables=tuple(tables))


def build_pipeline(p: beam.Pipeline, config: JobConfig, prepared: Prepared,
                   layout: Layout):
  """Adds the job's transforms to ``p``; no side effects."""
  carried = prepared.manifest.carried if prepared.manifest else ()
  refs = p | "ReadInput" >> sources.ReadImageRefs(
      patterns=() if prepared.manifest else config.inputs,
      manifest=prepared.manifest)
  photo_config = photos.PhotoConfig(
      policies=photos.needed_policies([m.resize for m in config.models]),
      size=config.models[0].spec.input_size,
      max_file_bytes=config.max_file_bytes, max_pixels=config.max_pixels,
      read_attempts=config.read_attempts,
      expected_total=prepared.expected_total)
  prepped = refs | "ReadAndPrepare" >> photos.ReadAndPrepare(photo_config)
  error_streams = [prepped.errors]
  for model in config.models:
    table = layout.table(
        f"{sinks.EMBEDDINGS if model.spec.kind == models_lib.EMBEDDER else sinks.PREDICTIONS}/{model.name}")
    outputs = prepped.prepared | f"RunModel[{model.name}]" >> inference.RunModel(
        inference.InferenceConfig(model, config.batch_size, config.top_k))
    _ = (outputs.results
         | f"ToArrow[{model.name}]" >> beam.Map(
             sinks.results_to_table, table.schema, carried)
         | f"Write[{model.name}]" >> sinks.WriteTable(table.staged,
                                                      table.schema))
    error_streams.append(outputs.errors)
  errors_table = layout.table(sinks.ERRORS)
  _ = (tuple(error_streams)
       | "AllErrors" >> beam.Flatten()
       | "WriteErrors" >> sinks.WriteErrors(errors_table.staged,
                                            errors_table.schema, carried))


def _counter_values(result, prefix: str) -> Dict[str, int]:
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


def _error_breakdown(directory: str) -> dict:
  """Errors per stage and per model, and photos with any error.

  Read back from the committed errors table, so the figures are what readers
  of the table will see.
  """
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  by_stage: Dict[str, int] = {}
  by_model: Dict[str, int] = {}
  photo_ids = set()
  for path in sinks.list_parquet(directory):
    with FileSystems.open(path) as f:
      table = pq.read_table(f, columns=["image_id", "stage", "model"])
    for image_id, stage, model in zip(table.column("image_id").to_pylist(),
                                      table.column("stage").to_pylist(),
                                      table.column("model").to_pylist()):
      by_stage[stage] = by_stage.get(stage, 0) + 1
      key = model or "(before any model)"
      by_model[key] = by_model.get(key, 0) + 1
      photo_ids.add(image_id)
  return {"by_stage": by_stage, "by_model": by_model,
          "total": sum(by_stage.values()), "photos": len(photo_ids)}


def _write_json(path: str, payload: dict) -> None:
  with FileSystems.create(path) as f:
    f.write(json.dumps(payload, indent=2, sort_keys=True).encode())


def _summary(report: dict) -> str:
  lines = [f"natvision embed_images: {report['inputs']} photo(s) in "
           f"{report['elapsed_s']:.1f}s ({report['images_per_second']:.2f} "
           f"photos/s)"]
  for name, rows in report["rows"].items():
    lines.append(f"  {name}: {rows} row(s)")
  errs = report["errors"]
  stages = ", ".join(f"{k} {v}" for k, v in sorted(errs["by_stage"].items()))
  lines.append(f"  errors: {errs['total']} row(s)" +
               (f" ({stages})" if stages else ""))
  loads = ", ".join(f"{k} {v}" for k, v in sorted(report["model_loads"].items()))
  lines.append(f"  model loads: {loads or 'not reported by this runner'}")
  lines.append(f"  tables in {report['output_dir']} (run.json has the details)")
  if any(m.get("standin") for m in report["models"]):
    lines.append("  note: stand-in models were used; their outputs mean nothing")
  return "\n".join(lines)


def run(argv: Optional[Sequence[str]] = None, test_pipeline=None) -> dict:
  """Runs the job; returns the run report (also written to run.json).

  Args:
    argv: command-line flags (application and Beam flags together).
    test_pipeline: a TestPipeline to build on instead of a new Pipeline.

  Raises:
    FlagError: bad flags, input or models, before the pipeline starts.
  """
  config, options = parse_args(argv)
  if config.demo:
    _ensure_demo_models(config)
  prepared = prepare_inputs(config)
  run_id = datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
  carried = prepared.manifest.carried if prepared.manifest else ()
  layout = plan_layout(config, carried, run_id)
  started = time.time()
  p = test_pipeline or beam.Pipeline(options=options)
  build_pipeline(p, config, prepared, layout)
  result = p.run()
  result.wait_until_finish()
  sinks.commit_tables(layout.tables, layout.staging)
  ended = time.time()

  rows = {t.name: sinks.count_rows(t.final) for t in layout.tables
          if t.name != sinks.ERRORS}
  errors_dir = layout.table(sinks.ERRORS).final
  errors = _error_breakdown(errors_dir)
  prepared_count = _counter_values(result, "photos_prepared").get("", None)
  failed_count = _counter_values(result, "photos_failed").get("", None)
  inputs = (prepared_count + failed_count if prepared_count is not None
            and failed_count is not None else prepared.expected_total)
  elapsed = max(ended - started, 1e-9)
  report = {
      "package": {"name": "natvision", "version": transforms.__version__},
      "run_id": run_id,
      "started": _iso(started),
      "ended": _iso(ended),
      "elapsed_s": round(elapsed, 3),
      "inputs": inputs,
      "images_per_second": round((inputs or 0) / elapsed, 3),
      "output_dir": config.output_dir,
      "models": [dict(m.describe(), standin=config.demo) for m in config.models],
      "flags": list(argv) if argv is not None else sys.argv[1:],
      "rows": rows,
      "errors": errors,
      "model_loads": _counter_values(result, "model_loads_"),
      "error_rate": round(errors["photos"] / inputs, 6) if inputs else 0.0,
      "max_error_rate": config.max_error_rate,
  }
  _write_json(FileSystems.join(config.output_dir, "run.json"), report)
  print(_summary(report), flush=True)
  return report


def _iso(ts: float) -> str:
  return datetime.datetime.fromtimestamp(
      ts, datetime.timezone.utc).isoformat(timespec="seconds")


def _ensure_demo_models(config: JobConfig) -> None:
  """Writes tiny stand-in models for --demo unless they are there already."""
  from pipelines import standin_models  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(config.models[0].path.rstrip("/"))
  missing = [m.name for m in config.models if not FileSystems.exists(m.path)]
  if missing:
    logging.info("writing tiny stand-in models to %s", root)
    standin_models.write_standins(root, tiny=True, models=missing)


def main(argv: Optional[Sequence[str]] = None) -> int:
  logging.basicConfig(level=logging.INFO,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("apache_beam", "absl", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    report = run(argv)
  except FlagError as e:
    print(f"natvision-embed: error: {e}", file=sys.stderr)
    return 2
  limit = report["max_error_rate"]
  if limit is not None and report["error_rate"] > limit:
    print(f"natvision-embed: {report['error_rate']:.3f} of the photos failed, "
          f"more than --max_error_rate {limit}", file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
