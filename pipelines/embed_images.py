"""embed_images: photos in, Parquet tables of embeddings and predictions out.

    natvision-embed --input 'photos/*.jpg' --output_dir out \\
        --models inaturalist_v2,fungi_mobile_v1 --model_root /models \\
        [Beam flags]

    natvision-embed --demo     # bundled photos, tiny stand-ins

The graph: read the input (globs, a manifest or a Darwin Core archive) into
one ``ImageRef`` per distinct photo; leave out photos under other licences
(``--license``); embed and write (transforms/embed.py); count the run's
figures (transforms/summary.py); commit the tables and write ``run.json``
and ``report.html`` (``launch.Plan.report_writer``, when given) in the
last step (transforms/commit.py).  The launch steps around it are
pipelines/launch.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from typing import Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from natvision.pipelines import launch
from natvision.transforms import commit
from natvision.transforms import demo
from natvision.transforms import dwca
from natvision.transforms import embed
from natvision.transforms import fetch
from natvision.transforms import helptext
from natvision.transforms import licenses
from natvision.transforms import resume as resume_lib
from natvision.transforms import run_summary
from natvision.transforms import sinks
from natvision.transforms import sources
from natvision.transforms import spec as spec_lib
from natvision.transforms import summary as summary_lib
from natvision.transforms.config import ConfigError

SAMPLE_PHOTOS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 "sample_photos")
SAMPLE_PHOTO_EXTENSIONS = ("jpg", "png", "webp")
DEFAULT_DEMO_OUTPUT = "natvision_demo"
RUN_FILE = "run.json"


@dataclasses.dataclass(frozen=True)
class JobConfig:
  """Everything the job needs besides Beam's own options."""

  inputs: Tuple[str, ...]
  output_dir: str
  embed: embed.EmbedConfig
  max_error_rate: Optional[float] = None
  demo: bool = False
  manifest_encoding: str = sources.DEFAULT_ENCODING
  archive_encoding: Optional[str] = None
  license_filter: licenses.LicenseFilter = licenses.LicenseFilter()
  # The demo's sample folder when the demo reads it: ids hash the path
  # relative to it, so they do not depend on where the package lies.
  ids_relative_to: Optional[str] = None

  def __post_init__(self):
    if not self.inputs:
      raise ConfigError("--input is required (a glob pattern or a manifest)")
    if not self.output_dir:
      raise ConfigError("--output_dir is required (a local folder or gs://...)")
    if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
      raise ConfigError("--max_error_rate must be between 0 and 1, e.g. 0.05")
    sources.check_encoding(self.manifest_encoding)
    if self.archive_encoding is not None:
      sources.check_encoding(self.archive_encoding)
    manifests = [i for i in self.inputs if sources.manifest_format(i)]
    if manifests and len(self.inputs) > 1:
      raise ConfigError(
          "--input takes either one manifest or glob patterns, not both: got "
          f"{', '.join(self.inputs)}")

  @property
  def models(self):
    return self.embed.models

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
      formatter_class=helptext.HelpFormatter,
      description="Embed and classify photos with the seed models "
      "(inaturalist_v2, fungi_mobile_v1, inception_resnet_v2) into Parquet "
      "tables under --output_dir: one table of embeddings or predictions per "
      "model, one of errors, run.json and report.html. The photos come from "
      "glob patterns, a manifest or a Darwin Core archive, on local disk, "
      "gs://, s3:// or http(s); one bad photo never stops the run. --demo "
      "runs on the bundled sample photos with tiny stand-in models.",
      epilog=helptext.epilog([
          "natvision-embed --demo",
          "natvision-embed --input 'photos/*.jpg' --output_dir out "
          "--model_root /models",
          "natvision-embed --input manifest.csv --output_dir gs://b/tables "
          "\\",
          "    --model_root gs://b/models --runner DataflowRunner "
          "--project my-project ...",
      ], beam=True))
  p.add_argument("--input", action="append", default=[],
                 help="glob pattern on any Beam filesystem (repeatable), or "
                 "one manifest (.csv, .tsv, .jsonl, .parquet, optionally .gz) "
                 "with a uri column, or one Darwin Core archive (.zip, a "
                 "folder holding meta.xml, or a GBIF multimedia.txt)")
  p.add_argument("--manifest_encoding", default=sources.DEFAULT_ENCODING,
                 help="character encoding of a text manifest, e.g. cp1252 "
                 "for a CSV saved by a spreadsheet program on Windows")
  p.add_argument("--archive_encoding",
                 help="character encoding of every data file of a Darwin "
                 "Core input, instead of what its meta.xml declares (a bare "
                 "multimedia.txt: UTF-8), e.g. cp1252")
  p.add_argument("--output_dir", help="folder (local or gs://) for the "
                 f"tables (with --demo: {DEFAULT_DEMO_OUTPUT})")
  embed.EmbedConfig.add_flags(p)
  licenses.LicenseFilter.add_flags(p)
  launch.add_console_flags(p)
  p.add_argument("--max_error_rate", type=float,
                 help="exit with status 3 when the share of photos with an "
                 "error exceeds this (default: never)")
  p.add_argument("--demo", action="store_true",
                 help="run on the bundled sample photos with tiny stand-in "
                 "models (their outputs mean nothing)")
  helptext.mark_required(p, "--input", unless="--demo")
  helptext.mark_required(p, "--output_dir", unless="--demo")
  helptext.mark_required(p, "--model_root", unless="--demo, or --model_handle "
                         "names every model")
  return p


def parse_args(argv: Optional[Sequence[str]] = None
               ) -> Tuple[JobConfig, PipelineOptions]:
  """Parses application and Beam flags from one argv; no I/O.

  Raises:
    ConfigError: a flag is missing or invalid; the message names it.
  """
  args, options = launch.split_beam_args(_parser(), argv)
  return _configure(args), options


def _configure(args: argparse.Namespace) -> "JobConfig":
  inputs = list(args.input)
  model_root = args.model_root
  output_dir = args.output_dir
  ids_relative_to = None
  if args.demo and not inputs:
    inputs = [os.path.join(SAMPLE_PHOTOS_DIR, f"*.{ext}")
              for ext in SAMPLE_PHOTO_EXTENSIONS]
    ids_relative_to = SAMPLE_PHOTOS_DIR
  if args.demo:
    output_dir = output_dir or DEFAULT_DEMO_OUTPUT
    # The machine's stand-ins, written once (transforms/demo.py).
    model_root = model_root or demo.standins_root()
  if not inputs:
    raise ConfigError("--input is required (a glob pattern or a manifest)")
  inputs = [fetch.local_path(i) for i in inputs]
  output_dir = fetch.local_path(output_dir) if output_dir else output_dir
  if not output_dir:
    raise ConfigError("--output_dir is required (a local folder or gs://...)")
  return JobConfig(inputs=tuple(inputs), output_dir=output_dir,
                   embed=embed.EmbedConfig.from_args(args, model_root),
                   max_error_rate=args.max_error_rate, demo=args.demo,
                   manifest_encoding=args.manifest_encoding,
                   archive_encoding=args.archive_encoding,
                   license_filter=licenses.LicenseFilter.from_args(args),
                   ids_relative_to=ids_relative_to)


@dataclasses.dataclass(frozen=True)
class CheckedInput:
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


def check_input(config: JobConfig) -> CheckedInput:
  """Checks the input before the pipeline starts.

  Raises:
    ConfigError: unreadable manifest or archive, a pattern matching
      nothing, or a scheme (of the input, the output or a manifest's first
      rows) that nothing installed reads.
  """
  fetch.check_schemes(list(config.inputs) + [config.output_dir])
  archive = config.archive_path()
  if archive:
    prepared = CheckedInput(manifest=None, expected_total=None,
                            archive=dwca.open_archive(
                                archive, config.archive_encoding))
  elif config.manifest_path:
    manifest = sources.read_manifest_header(config.manifest_path,
                                            config.manifest_encoding)
    fetch.check_schemes(sources.sample_uris(manifest))
    if manifest.row_count is None:
      logging.getLogger("natvision").info(
          "manifest %s: about %s rows (estimated from its first %d, which "
          "were checked; the workers check the rest); progress lines show "
          "photos done without a total", manifest.path,
          manifest.estimated_rows or "?", sources.CHECK_ROWS)
    prepared = CheckedInput(manifest=manifest, expected_total=manifest.row_count)
  else:
    sources.check_listable(config.inputs)
    count = sources.count_pattern_matches(config.inputs)
    if count.at_least:
      logging.getLogger("natvision").info(
          "--input matches over %d files (counted no further); progress "
          "lines show photos done without a total", count.files)
    prepared = CheckedInput(manifest=None,
                            expected_total=count.expected_total)
  return _with_license_column(config, prepared)


def _with_license_column(config: JobConfig, prepared: CheckedInput) -> CheckedInput:
  """Finds the column --license reads.

  Raises:
    ConfigError: --license given for an input with no licence column.
  """
  if not config.license_filter.active:
    return prepared
  column = licenses.license_column([c for c, _ in prepared.carried])
  if column is None:
    raise ConfigError(
        f"--license needs a licence for each photo, and {config.inputs[0]} "
        f"has no column named {' or '.join(licenses.LICENSE_COLUMNS)}")
  return dataclasses.replace(prepared, license_column=column,
                             expected_total=None)


def build_pipeline(p: beam.Pipeline, plan: launch.Plan) -> None:
  """Adds the job's transforms to ``p``; no side effects.

  The last step commits the tables and writes run.json, inside the pipeline.
  """
  config, prepared = plan.config, plan.checked
  skipped, examples = [], []
  if prepared.archive is not None:
    read = p | "ReadInput" >> dwca.ReadArchiveRefs(prepared.archive)
    refs = read["refs"] | "OnePerPhoto" >> sources.OnePerId()
    skipped.append(read[dwca.SKIPPED_TAG])
    examples.append(read[dwca.BAD_LINES_TAG] | "NameBadLines" >> beam.Map(
        lambda bad: (dwca.BAD_LINES_TAG, bad)))
  else:
    refs = p | "ReadInput" >> sources.ReadImageRefs(
        patterns=() if prepared.manifest else config.inputs,
        manifest=prepared.manifest, ids_relative_to=config.ids_relative_to)
  if prepared.license_column:
    split = refs | "FilterByLicense" >> licenses.FilterByLicense(
        config.license_filter, prepared.license_column)
    refs = split.kept
    skipped.append(split[licenses.SKIPPED_TAG])
  expected = prepared.expected_total
  if plan.resume.shards:
    expected = None  # the photos reused are known in the graph only
  # A glob never lists a web server (check_listable refuses one), so its
  # photos need no per-host keying.
  web = prepared.manifest is not None or prepared.archive is not None
  out = refs | "EmbedAndWrite" >> embed.EmbedAndWrite(
      config.embed, plan.layout, prepared.carried, expected, plan.resume,
      web=web)
  # Each stream of (name, 1) tallies is summed in its own stage before the
  # Flatten: on the DirectRunner a Flatten of streams from several stages is
  # a buffer of all their elements (one per photo otherwise).
  tallies = [refs | "CountInputs" >> beam.Map(lambda _: ("inputs", 1))
             | "SumInputs" >> beam.CombinePerKey(sum),
             out[embed.TALLIES] | "SumReused" >> beam.CombinePerKey(sum)]
  for i, reasons in enumerate(skipped):
    tallies.append(reasons | f"CountSkipped{i}" >> beam.Map(lambda r: (r, 1))
                   | f"SumSkipped{i}" >> beam.CombinePerKey(sum))
  figures = {"error_tables": out[embed.ERROR_TABLES],
             "loads": out[embed.LOADS],
             "tallies": tallies | "AllTallies" >> beam.Flatten(),
             "examples": (examples or [p | "NoExamples" >> beam.Create([])])
                         | "AllExamples" >> beam.Flatten(),
             } | "Summarize" >> summary_lib.Summarize()
  _ = out[embed.WRITTEN] | "CommitRun" >> commit.CommitRun(
      plan.layout, RunReport(plan.base, config.max_error_rate,
                             plan.report_writer),
      beam.pvalue.AsSingleton(figures))


class RunReport:
  """Writes run.json and report.html once the tables are committed.

  Called in the pipeline's last step.  Everything known before the run
  (models, flags, start time) comes in ``base``; the figures are counted
  in the graph (transforms/summary.py); rows per table are read from the
  committed files' footers.  report.html is ``write_report``'s
  (``launch.Plan.report_writer``: tools/report.py's for the command); None
  writes none.
  """

  def __init__(self, base: run_summary.RunSummary,
               max_error_rate: Optional[float],
               write_report: Optional[launch.ReportWriter] = None):
    self._base = base
    self._max_error_rate = max_error_rate
    self._write_report = write_report

  def __call__(self, layout: commit.Layout, figures: dict,
               commit_started: Optional[float] = None
               ) -> run_summary.RunSummary:
    """Args: commit_started: when the commit step began (``time.time()``).
    figures: ``summary.Summarize``'s output; its counts hold
    ``inputs`` (photos sent on, reused ones included), ``reused_photos``
    (photos whose rows resume copied), ``dwca.SKIP_REASONS`` and
    ``filtered_by_license`` (rows never fetched); its examples the first
    bad lines of an archive as (file, line, why)."""
    base = self._base
    counts = figures["counts"]
    inputs = counts.get("inputs", 0)
    ended = time.time()
    elapsed = max(ended - base.started_ts, 1e-9)
    errors = run_summary.ErrorCounts.from_dict(figures["errors"])
    rows = {t.name: commit.count_rows(t.final) for t in layout.tables
            if t.name != sinks.ERRORS}
    report = dataclasses.replace(
        base,
        ended=commit.iso(ended),
        elapsed_s=round(elapsed, 3),
        inputs=inputs,
        reused_photos=counts.get(resume_lib.REUSED_PHOTOS, 0),
        **{reason: counts.get(reason, 0) for reason in dwca.SKIP_REASONS},
        bad_lines=[f"{file}:{line}: {why}" for file, line, why in
                   figures.get("examples", {}).get(dwca.BAD_LINES_TAG, [])],
        filtered_by_license=counts.get(licenses.FILTERED_BY_LICENSE, 0),
        images_per_second=round(inputs / elapsed, 3),
        models=tuple(dataclasses.replace(m, rows=rows.get(m.table))
                     for m in base.models),
        errors=errors,
        error_rate=round(errors.photos / inputs, 6) if inputs else 0.0,
        max_error_rate=self._max_error_rate,
        model_loads=dict(figures["model_loads"]),
        timings=commit.run_timings(base.timings, base.started_ts,
                                   commit_started, ended))
    run_summary.write(FileSystems.join(layout.output_dir, RUN_FILE), report)
    if self._write_report:
      self._write_report(layout.output_dir, None)  # logs, never raises
    return report


def _summary(report: run_summary.RunSummary) -> str:
  lines = [f"natvision embed_images: {report.inputs} photo(s) in "
           f"{report.elapsed_s:.1f}s ({report.images_per_second:.2f} "
           f"photos/s)"]
  if report.reused_photos:
    lines.append(f"  resumed: {report.reused_photos} photo(s) reused from "
                 f"a dead attempt")
  for m in report.models:
    lines.append(f"  {m.table}: {m.rows} row(s)")
  for key, why in ((dwca.SKIPPED_SOUND, "sounds"),
                   (dwca.SKIPPED_VIDEO, "videos"),
                   (dwca.SKIPPED_NO_IMAGE_FORMAT,
                    "with neither a type nor an image format"),
                   (dwca.SKIPPED_OTHER_TYPE, "of another type"),
                   (dwca.SKIPPED_BAD_LINES, "on lines that cannot be read"),
                   (licenses.FILTERED_BY_LICENSE, "left out by --license")):
    if getattr(report, key):
      lines.append(f"  not fetched: {getattr(report, key)} row(s) {why}")
  for bad in report.bad_lines or []:
    lines.append(f"    {bad}")
  for warning in report.warnings or []:
    lines.append(f"  warning: {warning}")
  errs = report.errors or run_summary.ErrorCounts()
  stages = ", ".join(f"{k} {v}" for k, v in sorted(errs.by_stage.items()))
  lines.append(f"  errors: {errs.total} row(s)" +
               (f" ({stages})" if stages else ""))
  loads = ", ".join(f"{k} {v}" for k, v in sorted(report.model_loads.items()))
  lines.append(f"  model loads: {loads or 'none'}")
  if report.timings:
    lines.append(f"  timings: {commit.format_timings(report.timings)}")
  lines.append(f"  tables in {report.output_dir} (run.json and "
               f"report.html have the details)")
  if report.standin:
    lines.append("  note: stand-in models were used; their outputs mean nothing")
  return "\n".join(lines)


class EmbedJob(launch.Job):
  """natvision-embed in the launch sequence (pipelines/launch.py)."""

  name = "natvision-embed"
  kind = run_summary.EMBED

  def parser(self) -> argparse.ArgumentParser:
    return _parser()

  def configure(self, args: argparse.Namespace) -> JobConfig:
    config = _configure(args)
    if config.demo:
      _ensure_demo_models(config)
    return config

  def check_input(self, config: JobConfig) -> CheckedInput:
    return check_input(config)

  def sample_photos(self, config: JobConfig, prepared: CheckedInput,
                    count: int) -> dict:
    """Photos spread over the glob matches or the manifest's first rows."""
    if prepared.archive is not None:
      raise ConfigError(
          "--precision int8 is not offered for a Darwin Core input yet; "
          "list the photos in a manifest, or run in fp32")
    from natvision.transforms.runtimes import sample  # pylint: disable=import-outside-toplevel
    refs = sample.pick(count, patterns=config.inputs,
                       manifest=prepared.manifest)
    return sample.prepare(refs, config.embed.photos)

  def plan(self, config: JobConfig, prepared: CheckedInput,
           base: dict, run: spec_lib.RunSpec) -> launch.Plan:
    layout = commit.plan_layout(config.output_dir, config.models,
                                prepared.carried, commit.new_run_id(),
                                run=run)
    resume = resume_lib.plan_resume(config.output_dir, layout.run_id,
                                    layout.tables, run)
    layout = dataclasses.replace(layout, reused_from=resume.dead_runs)
    started = time.time()
    base = dataclasses.replace(
        base, run_id=layout.run_id, started=commit.iso(started),
        started_ts=started, output_dir=config.output_dir,
        models=tuple(run_summary.ModelSummary.from_described(
            m.describe(), commit.table_name(m), standin=config.demo)
                     for m in config.models),
        warnings=list(prepared.archive.warnings
                      if prepared.archive is not None else ()))
    return launch.Plan(config=config, spec=run, checked=prepared,
                       layout=layout, resume=resume, base=base)

  def build(self, p: beam.Pipeline, plan: launch.Plan) -> None:
    build_pipeline(p, plan)

  def summary_path(self, plan: launch.Plan) -> str:
    return FileSystems.join(plan.config.output_dir, RUN_FILE)

  def summary(self, report: run_summary.RunSummary) -> str:
    return _summary(report)

  def exit_status(self, report: run_summary.RunSummary) -> int:
    status = exit_status(report)
    if status == 3:
      print(f"natvision-embed: {report.error_rate:.3f} of the photos "
            f"failed, more than --max_error_rate {report.max_error_rate}",
            file=sys.stderr)
    return status


JOB = EmbedJob()


def run(argv: Optional[Sequence[str]] = None, test_pipeline=None,
        report_writer: Optional[launch.ReportWriter] = None) -> dict:
  """Runs the job; returns the run report (also written to run.json).

  Args:
    argv: command-line flags (application and Beam flags together).
    test_pipeline: a TestPipeline to build on instead of a new Pipeline.
    report_writer: writes the HTML report after the summary (tools/report.py's
      ``write_after_run``); None writes none.

  Raises:
    ConfigError: bad flags, input or models, before the pipeline starts.
    storage.StorageError: storage failed; running again resumes.
  """
  return launch.run(JOB, argv, test_pipeline, report_writer)


def _ensure_demo_models(config: JobConfig) -> None:
  """Writes tiny stand-in models (and their ONNX files) for --demo unless
  they are there already (transforms/demo.py)."""
  root = os.path.dirname(config.models[0].path.rstrip("/"))
  demo.ensure(root, [m.name for m in config.models])


def main(argv: Optional[Sequence[str]] = None,
         report_writer: Optional[launch.ReportWriter] = None) -> int:
  """natvision-embed; exit status as pipelines/launch.py says."""
  return launch.main(JOB, argv, report_writer)


def exit_status(report: run_summary.RunSummary) -> int:
  """3 when the share of photos with an error exceeds --max_error_rate, else 0.

  A run that has not ended here (a template launch) has no error rate: 0.
  """
  limit = report.max_error_rate
  rate = report.error_rate
  if limit is not None and rate is not None and rate > limit:
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
