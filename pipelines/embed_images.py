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
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

import transforms
from pipelines import common
from pipelines.common import DEFAULT_MODELS, FlagError  # noqa: F401 (API)
from tools import report as html_report
from transforms import commit
from transforms import progress
from transforms import resume as resume_lib
from transforms import dwca
from transforms import fetch
from transforms import licenses
from transforms import sinks
from transforms import sources
from transforms import storage

SAMPLE_PHOTOS_DIR = os.path.join(os.path.dirname(__file__), "sample_photos")
SAMPLE_PHOTO_EXTENSIONS = ("jpg", "png", "webp")
DEFAULT_DEMO_OUTPUT = "natvision_demo"
# The tables are committed by the pipeline's last step, not by the launcher,
# so a template launch that does not wait for the job is safe (deploy/).
COMMITS_IN_PIPELINE = True


@dataclasses.dataclass(frozen=True)
class JobConfig:
  """Everything the job needs besides Beam's own options."""

  inputs: Tuple[str, ...]
  output_dir: str
  flags: common.ModelFlags
  max_error_rate: Optional[float] = None
  demo: bool = False
  manifest_encoding: str = sources.DEFAULT_ENCODING
  license_filter: licenses.LicenseFilter = licenses.LicenseFilter()

  def __post_init__(self):
    if not self.inputs:
      raise FlagError("--input is required (a glob pattern or a manifest)")
    if not self.output_dir:
      raise FlagError("--output_dir is required (a local folder or gs://...)")
    if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
      raise FlagError("--max_error_rate must be between 0 and 1, e.g. 0.05")
    try:
      sources.check_encoding(self.manifest_encoding)
    except sources.InputError as e:
      raise FlagError(str(e)) from e
    manifests = [i for i in self.inputs if sources.manifest_format(i)]
    if manifests and len(self.inputs) > 1:
      raise FlagError(
          "--input takes either one manifest or glob patterns, not both: got "
          f"{', '.join(self.inputs)}")

  @property
  def models(self):
    return self.flags.models

  @property
  def manifest_path(self) -> Optional[str]:
    if len(self.inputs) == 1 and sources.manifest_format(self.inputs[0]):
      return self.inputs[0]
    return None

  def archive_path(self) -> Optional[str]:
    """The Darwin Core input, if --input is one (looks for meta.xml)."""
    if len(self.inputs) == 1 and not self.manifest_path and (
        dwca.is_archive_input(self.inputs[0])):
      return self.inputs[0]
    return None


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="natvision-embed",
      description="Embed and classify photos with TF Hub models into Parquet "
      "tables. Flags not listed here go to Apache Beam (e.g. --runner).")
  p.add_argument("--input", action="append", default=[],
                 help="glob pattern on any Beam filesystem (repeatable), or "
                 "one manifest (.csv, .tsv, .jsonl, .parquet, optionally .gz) "
                 "with a uri column, or one Darwin Core archive (.zip, a "
                 "folder holding meta.xml, or a GBIF multimedia.txt)")
  p.add_argument("--manifest_encoding", default=sources.DEFAULT_ENCODING,
                 help="character encoding of a text manifest, e.g. cp1252 "
                 "for a CSV saved by a spreadsheet program on Windows "
                 "(default utf-8)")
  p.add_argument("--output_dir", help="folder (local or gs://) for the tables")
  common.add_model_flags(p)
  licenses.LicenseFilter.add_flags(p)
  p.add_argument("--max_error_rate", type=float,
                 help="exit with status 3 when the share of photos with an "
                 "error exceeds this")
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
  args, options = common.split_beam_args(_parser(), argv)
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
  inputs = [fetch.local_path(i) for i in inputs]
  output_dir = fetch.local_path(output_dir) if output_dir else output_dir
  if not output_dir:
    raise FlagError("--output_dir is required (a local folder or gs://...)")
  flags = common.model_flags_from_args(args, model_root)
  try:
    license_filter = licenses.LicenseFilter.from_args(args)
  except ValueError as e:
    raise FlagError(str(e)) from e
  config = JobConfig(inputs=tuple(inputs), output_dir=output_dir, flags=flags,
                     max_error_rate=args.max_error_rate, demo=args.demo,
                     manifest_encoding=args.manifest_encoding,
                     license_filter=license_filter)
  return config, options


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What the launcher learned before building the graph."""

  manifest: Optional[sources.Manifest]
  expected_total: Optional[int]
  archive: Optional[dwca.Archive] = None
  license_column: Optional[str] = None

  @property
  def carried(self) -> sinks.Carried:
    if self.archive is not None:
      return self.archive.carried
    return self.manifest.carried if self.manifest else ()


def prepare_inputs(config: JobConfig) -> Prepared:
  """Checks the input before the pipeline starts.

  Raises:
    FlagError: unreadable manifest, a pattern matching nothing, or a
      scheme (of the input, the output or a manifest's first rows) that
      nothing installed reads.
  """
  try:
    fetch.check_schemes(list(config.inputs) + [config.output_dir])
    archive = config.archive_path()
    if archive:
      prepared = Prepared(manifest=None, expected_total=None,
                          archive=dwca.open_archive(archive))
      return _with_license_column(config, prepared)
    if config.manifest_path:
      manifest = sources.read_manifest_header(config.manifest_path,
                                              config.manifest_encoding)
      expected = manifest.row_count
      fetch.check_schemes(sources.sample_uris(manifest))
    else:
      manifest = None
      sources.check_listable(config.inputs)
      expected = sources.count_pattern_matches(config.inputs)
  except (sources.InputError, fetch.SchemeError) as e:
    raise FlagError(str(e)) from e
  return _with_license_column(
      config, Prepared(manifest=manifest, expected_total=expected))


def _with_license_column(config: JobConfig, prepared: Prepared) -> Prepared:
  """Finds the column --license reads.

  Raises:
    FlagError: --license given for an input with no licence column.
  """
  if not config.license_filter.active:
    return prepared
  column = licenses.license_column([c for c, _ in prepared.carried])
  if column is None:
    raise FlagError(
        f"--license needs a licence for each photo, and {config.inputs[0]} "
        f"has no column named {' or '.join(licenses.LICENSE_COLUMNS)}")
  return dataclasses.replace(prepared, license_column=column,
                             expected_total=None)


def build_pipeline(p: beam.Pipeline, config: JobConfig, prepared: Prepared,
                   layout: commit.Layout, report_base: dict,
                   resume: Optional[resume_lib.ResumePlan] = None):
  """Adds the job's transforms to ``p``; no side effects.

  The last step commits the tables and writes run.json, inside the pipeline.
  """
  skipped = []
  if prepared.archive is not None:
    read = p | "ReadInput" >> dwca.ReadArchiveRefs(prepared.archive)
    refs = read.refs | "OnePerPhoto" >> sources.OnePerId()
    skipped.append(read[dwca.SKIPPED_TAG])
  else:
    refs = p | "ReadInput" >> sources.ReadImageRefs(
        patterns=() if prepared.manifest else config.inputs,
        manifest=prepared.manifest)
  if prepared.license_column:
    split = refs | "FilterByLicense" >> licenses.FilterByLicense(
        config.license_filter, prepared.license_column)
    refs = split.kept
    skipped.append(split[licenses.SKIPPED_TAG])
  expected = prepared.expected_total
  if expected is not None and resume is not None:
    expected = max(expected - resume.reused_photos, 0)
  written = refs | "EmbedAndWrite" >> common.EmbedAndWrite(
      config.flags, layout, prepared.carried, expected, resume)
  tallies = [refs | "CountInputs" >> beam.Map(lambda _: ("inputs", 1))]
  for i, reasons in enumerate(skipped):
    tallies.append(reasons | f"CountSkipped{i}" >> beam.Map(lambda r: (r, 1)))
  counts = (tallies
            | "AllTallies" >> beam.Flatten()
            | "SumTallies" >> beam.CombinePerKey(sum)
            | "Counts" >> beam.combiners.ToDict())
  _ = written | "CommitRun" >> commit.CommitRun(
      layout, RunReport(report_base, config.max_error_rate),
      beam.pvalue.AsSingleton(counts))


class RunReport:
  """Writes run.json once the tables are committed (called in the pipeline).

  Everything known before the run (models, flags, start time) comes in
  ``base``; rows and errors are read back from the committed tables.
  """

  def __init__(self, base: dict, max_error_rate: Optional[float]):
    self._base = base
    self._max_error_rate = max_error_rate

  def __call__(self, layout: commit.Layout, counts: dict) -> dict:
    """Args: counts: ``inputs`` (photos sent on), ``skipped_not_image``
    and ``filtered_by_license`` (rows never fetched)."""
    inputs = counts.get("inputs", 0)
    ended = time.time()
    elapsed = max(ended - self._base["started_ts"], 1e-9)
    errors = common.error_breakdown(layout.table(sinks.ERRORS).final)
    report = dict(self._base)
    report.update({
        "ended": commit.iso(ended),
        "elapsed_s": round(elapsed, 3),
        "inputs": inputs,
        dwca.SKIPPED_NOT_IMAGE: counts.get(dwca.SKIPPED_NOT_IMAGE, 0),
        licenses.FILTERED_BY_LICENSE: counts.get(
            licenses.FILTERED_BY_LICENSE, 0),
        "images_per_second": round(inputs / elapsed, 3),
        "rows": {t.name: commit.count_rows(t.final) for t in layout.tables
                 if t.name != sinks.ERRORS},
        "errors": errors,
        "error_rate": round(errors["photos"] / inputs, 6) if inputs else 0.0,
        "max_error_rate": self._max_error_rate,
        "model_loads": {},
    })
    commit.write_json(FileSystems.join(layout.output_dir, "run.json"), report)
    html_report.write_report(layout.output_dir)  # logs, never raises
    return report


def _summary(report: dict) -> str:
  lines = [f"natvision embed_images: {report['inputs']} photo(s) in "
           f"{report['elapsed_s']:.1f}s ({report['images_per_second']:.2f} "
           f"photos/s)"]
  if report.get("reused_photos"):
    lines.append(f"  resumed: {report['reused_photos']} photo(s) reused from "
                 f"a dead attempt")
  for name, rows in report["rows"].items():
    lines.append(f"  {name}: {rows} row(s)")
  for key, why in ((dwca.SKIPPED_NOT_IMAGE, "not still images"),
                   (licenses.FILTERED_BY_LICENSE, "left out by --license")):
    if report.get(key):
      lines.append(f"  not fetched: {report[key]} row(s) {why}")
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
  # The launcher reads the input before the pipeline exists; Beam's S3
  # filesystem needs the options (--s3_endpoint_url, ...) set to work.
  FileSystems.set_options(options)
  if config.demo:
    _ensure_demo_models(config)
  prepared = prepare_inputs(config)
  config = dataclasses.replace(config, flags=common.check_models(config.flags))
  layout = commit.plan_layout(config.output_dir, config.models,
                              prepared.carried, commit.new_run_id(),
                              color_profile=config.flags.color_profile)
  resume = resume_lib.plan_resume(config.output_dir, layout.run_id,
                                  layout.tables,
                                  [m.name for m in config.models])
  layout = dataclasses.replace(layout, reused_from=resume.dead_runs)
  started = time.time()
  report_base = {
      "package": {"name": "natvision", "version": transforms.__version__},
      "run_id": layout.run_id,
      "started": commit.iso(started),
      "started_ts": started,
      "output_dir": config.output_dir,
      "models": [dict(m.describe(), standin=config.demo) for m in config.models],
      "flags": list(argv) if argv is not None else sys.argv[1:],
      "reused_photos": resume.reused_photos,
  }
  p = test_pipeline or beam.Pipeline(options=options)
  build_pipeline(p, config, prepared, layout, report_base, resume)
  # Progress lines count this run alone; when the pipeline runs in this
  # process, they are the whole job's.
  progress.start_run(layout.run_id, prepared.expected_total)
  result = p.run()
  state = result.wait_until_finish()
  if state != PipelineState.DONE:
    # A template launch or an asynchronous runner: the job commits its own
    # tables and writes run.json when it ends.
    print(f"natvision embed_images: job {state}; tables will be in "
          f"{config.output_dir} when it ends (run.json last)", flush=True)
    return dict(report_base, state=str(state))
  run_json = FileSystems.join(config.output_dir, "run.json")
  report = json.loads(storage.read_bytes(run_json))
  report["model_loads"] = common.counter_values(result, "model_loads_")
  commit.write_json(run_json, report)
  print(_summary(report), flush=True)
  return report


def _ensure_demo_models(config: JobConfig) -> None:
  """Writes tiny stand-in models for --demo unless they are there already."""
  from pipelines import standin_models  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(config.models[0].path.rstrip("/"))
  missing = [m.name for m in config.models
             if not FileSystems.exists(FileSystems.join(m.path,
                                                        "saved_model.pb"))]
  if missing:
    logging.info("writing tiny stand-in models to %s", root)
    standin_models.write_standins(root, tiny=True, models=missing)


def main(argv: Optional[Sequence[str]] = None) -> int:
  common.configure_logging()
  try:
    report = run(argv)
  except FlagError as e:
    print(f"natvision-embed: error: {e}", file=sys.stderr)
    return 2
  except storage.StorageError as e:
    print(f"natvision-embed: storage error: {e}; nothing was committed, and "
          f"running the same command again resumes", file=sys.stderr)
    return 1
  status = exit_status(report)
  if status == 3:
    print(f"natvision-embed: {report['error_rate']:.3f} of the photos failed, "
          f"more than --max_error_rate {report['max_error_rate']}",
          file=sys.stderr)
  return status


def exit_status(report: dict) -> int:
  """3 when the share of photos with an error exceeds --max_error_rate, else 0.

  A run that has not ended here (a template launch) has no error rate: 0.
  """
  limit = report.get("max_error_rate")
  rate = report.get("error_rate")
  if limit is not None and rate is not None and rate > limit:
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
