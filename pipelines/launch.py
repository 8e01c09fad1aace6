"""The one launch sequence both jobs follow, and the command-line wrapper.

    parse flags -> check the input and the models' folders
      -> decide each model's runtime -> the run's spec (transforms/spec.py)
      -> plan the tables (and what a dead attempt left) -> build the graph
      -> run it -> print the summary the pipeline wrote

A job (pipelines/embed_images.py, pipelines/ingest_observations.py) says
only what differs: its flags and config, how its input is checked, where
its tables and summary go, and its graph (a subclass of ``Job``).  The
pipeline commits its own tables and writes the summary in its last step,
so a template launch that does not wait is safe; when the job has ended
here, the summary is read back and printed.

The run report (report.html) is written in the pipeline's last step too,
by a writer the command hands to ``run``/``main`` (tools/report.py's
``embed_main``/``ingest_main`` give theirs; called directly, ``run`` writes
no report): pipelines/ never import tools/, which build on them.

Exit status (``main``): 0 the job ran (even if some photos failed); 2 bad
flags, input or models, found before anything runs (``ConfigError``);
1 a storage error (nothing committed, the same command resumes); 3 a job
rule such as ``--max_error_rate`` (``Job.exit_status``).
"""

from __future__ import annotations

import argparse
import difflib
import dataclasses
import logging
import os
import sys
import time
from typing import Any, Callable, List, Optional, Sequence, TextIO, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import DirectOptions
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.runner import PipelineState

from natvision import transforms
from natvision.transforms import commit
from natvision.transforms import console
from natvision.transforms import models as models_lib
from natvision.transforms import prior as prior_lib
from natvision.transforms import progress
from natvision.transforms import run_summary
from natvision.transforms import spec as spec_lib
from natvision.transforms import taxonomy
from natvision.transforms import storage
from natvision.transforms.config import ConfigError


# ``writer(output_dir, snapshot_date)``: writes the run's HTML report once
# the summary is written; never raises (snapshot_date None: a plain run).
ReportWriter = Callable[[str, Optional[str]], None]


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the launcher decided before building the graph.

  Attributes:
    config: the job's config, its models carrying their runtime decisions.
    spec: the run's spec (``transforms.spec.RunSpec``), built once here
      from the decided models; the tables' metadata and the summary record
      it, and resume compares dead attempts' shards with it.
    checked: what the job's input check learned (job-specific).
    layout: where the tables are staged and committed.
    resume: what a dead attempt left that this run reuses, or None.
    base: the summary's fields known at launch (a
      ``run_summary.RunSummary`` the last step completes and writes).
    report_writer: the run's last step after the summary (a
      ``ReportWriter``), or None for no report.  The commands give
      tools/report.py's (``run(..., report_writer=)``); it travels pickled
      with the graph, so a worker needs nothing of its own.
  """

  config: Any
  spec: spec_lib.RunSpec
  checked: Any
  layout: commit.Layout
  resume: Any
  base: run_summary.RunSummary
  report_writer: Optional[ReportWriter] = None


class Job:
  """What one job adds to the launch sequence; subclasses fill it in."""

  name = "natvision"  # the command, e.g. natvision-embed
  kind = ""  # the summary's job: run_summary.EMBED or run_summary.INGEST

  def parser(self) -> argparse.ArgumentParser:
    raise NotImplementedError

  def configure(self, args: argparse.Namespace):
    """The job's config from parsed flags; no I/O.

    Raises:
      ConfigError: naming the flag.
    """
    raise NotImplementedError

  def check_input(self, config):
    """Checks the input before the pipeline exists (reads headers, lists).

    Raises:
      ConfigError: an unreadable or empty input.
    """
    raise NotImplementedError

  def plan(self, config, prepared, base: run_summary.RunSummary,
           run: spec_lib.RunSpec) -> Plan:
    """Names the tables (``commit.plan_layout``, recording ``run``) and
    completes the summary's base (which holds ``run.to_dict()`` as
    ``spec``) with what the job knows at launch."""
    raise NotImplementedError

  def build(self, p: beam.Pipeline, plan: Plan) -> None:
    """Adds the job's transforms to ``p``; no side effects."""
    raise NotImplementedError

  def summary_path(self, plan: Plan) -> str:
    """Where the pipeline writes the run summary (JSON)."""
    raise NotImplementedError

  def summary(self, report: run_summary.RunSummary) -> str:
    """The lines printed when the job has ended here."""
    raise NotImplementedError

  def pending(self, plan: Plan, state: str) -> str:
    """The line printed when the job runs on (a template launch)."""
    return (f"{self.name}: job {state}; the tables are committed under "
            f"{plan.config.output_dir} when it ends (summary last: "
            f"{self.summary_path(plan)})")

  def exit_status(self, report: run_summary.RunSummary) -> int:
    del report
    return 0

  def sample_photos(self, config, prepared, count: int) -> dict:
    """``count`` of the job's photos, prepared as the job prepares them,
    for ``--precision int8`` (``transforms.runtimes.sample``).

    Returns:
      preparation policy -> list of uint8 ``[size, size, 3]`` arrays.

    Raises:
      ConfigError: the job cannot offer its photos before it runs.
    """
    del config, prepared, count
    raise ConfigError(
        f"{self.name} does not offer --precision int8: it needs photos of "
        f"the job to calibrate and check the quantization before the job "
        f"runs; run in fp32")


def add_console_flags(parser: argparse.ArgumentParser) -> None:
  """Adds --verbose (read by ``main`` before anything is parsed, see
  transforms/console.py)."""
  parser.add_argument(
      "--verbose", action="store_true",
      help="show INFO logs of Beam, TensorFlow and tf2onnx (default: "
      "progress lines, warnings and the summary)")


def split_beam_args(parser: argparse.ArgumentParser,
                    argv: Optional[Sequence[str]]
                    ) -> Tuple[argparse.Namespace, PipelineOptions]:
  """Parses our flags; hands the rest to Beam, refusing flags nobody knows.

  Raises:
    ConfigError: a flag that neither natvision nor Beam defines.
  """
  args, beam_args = parser.parse_known_args(argv)
  unknown = unknown_beam_flags(beam_args)
  if unknown:
    ours = [o for a in parser._actions for o in a.option_strings]  # pylint: disable=protected-access
    close = difflib.get_close_matches(unknown[0].split("=", 1)[0], ours, n=1)
    hint = f"did you mean {close[0]}?" if close else "see --help"
    raise ConfigError(
        f"unknown flag {unknown[0]}: neither a natvision flag nor a Beam "
        f"pipeline option; {hint}")
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


def check_models(models: Sequence[models_lib.ResolvedModel], choose=None,
                 quantization=None, read_photos=None,
                 output_dir: Optional[str] = None
                 ) -> Tuple[models_lib.ResolvedModel, ...]:
  """Loads and probes each model, and decides the runtime each runs on.

  For ``--runtime auto`` or ``onnx`` the model is converted to ONNX (once:
  the file is cached) and checked against TensorFlow on a probe batch
  (transforms/runtimes/chooser.py); the decision made here is the one every
  worker runs, and it is recorded in the tables' metadata and run.json.

  Args:
    models: the resolved models; each one's ``requested_runtime`` is
      ``--runtime``.
    choose: ``ResolvedModel -> RuntimeDecision``; the chooser's ``choose``
      by default.
    quantization: ``--precision`` (a ``quantize.QuantizationConfig``); for
      int8 each model is then quantized and checked on the job's photos
      (transforms/runtimes/quantize.py).
    read_photos: ``n -> {policy: [uint8 photos]}``, the job's photos, read
      only for int8.
    output_dir: the job's output; on a bucket, int8 files are published
      under it for the workers.

  Raises:
    models_lib.ModelError: a model that is missing or does not match the
      registry, that fails the ONNX check under ``--runtime onnx``, or
      whose int8 agreement with fp32 is below ``--min_agreement``.
  """
  from natvision.transforms.runtimes import chooser  # pylint: disable=import-outside-toplevel
  from natvision.transforms.runtimes import quantize  # pylint: disable=import-outside-toplevel
  choose = choose or chooser.choose
  quantization = quantization or quantize.QuantizationConfig()
  for model in models:
    if model.spec.kind == models_lib.CLASSIFIER:
      models_lib.read_labelmap(model.labelmap_path,
                               expected=model.spec.output_width)
  if choose is chooser.choose:
    # Every conversion of the run in one child process (TensorFlow and
    # tf2onnx start once); the chooser then finds the files cached.
    from natvision.transforms.runtimes import onnx as onnx_lib  # pylint: disable=import-outside-toplevel
    try:
      onnx_lib.convert_missing(
          [quantize.fp32_request(m, quantization) for m in models])
    except models_lib.ModelError as e:
      # Each model is then converted alone, and one that fails says so.
      logging.info("converting the models together failed (%s); "
                   "converting them one at a time", e)
  decided = []
  for model in models:
    decided.append(model.with_decision(
        choose(quantize.fp32_request(model, quantization))))
  return quantize.with_int8(decided, quantization, read_photos, output_dir)


def plan_job(job: Job, argv: Optional[Sequence[str]] = None
             ) -> Tuple[Plan, PipelineOptions]:
  """Every launch step before the graph: parse, check, decide, plan.

  Raises:
    ConfigError: bad flags, input or models.
    storage.StorageError: a listing or read of earlier output failed.
  """
  launched = time.time()
  args, options = split_beam_args(job.parser(), argv)
  config = job.configure(args)
  # The launcher reads inputs before the pipeline exists; Beam's S3
  # filesystem needs the options (--s3_endpoint_url, ...) set to work.
  FileSystems.set_options(options)
  prepared = job.check_input(config)
  # Cheap existence checks before anything imports TensorFlow, so that a
  # wrong --model_root fails in seconds, naming the folder.
  models_lib.check_locations(config.embed.models)
  # The labels' taxa (--taxa) before TensorFlow: too many unmatched labels
  # fails here, in seconds.
  config = dataclasses.replace(config, embed=config.embed.with_models(
      taxonomy.attach(config.embed.models, config.embed.taxonomy,
                      lambda m: models_lib.read_labelmap(
                          m.labelmap_path, expected=m.spec.output_width))))
  # The geographic prior (--prior, after the taxa it counts): read once
  # here for its fingerprint and resolution; the workers read it again.
  config = dataclasses.replace(config, embed=config.embed.with_models(
      prior_lib.attach(config.embed.models, config.embed.prior)))
  checking = time.time()
  config = dataclasses.replace(config, embed=config.embed.with_models(
      check_models(config.embed.models,
                   quantization=config.embed.quantization,
                   read_photos=lambda n: job.sample_photos(config, prepared,
                                                           n),
                   output_dir=config.output_dir)))
  run_spec = spec_lib.for_run(config.embed)
  # The start-up phases; the pipeline's last step adds "pipeline" (from
  # the job's started_ts) and "commit" (commit.run_timings).
  timings = {"launch": round(checking - launched, 3),
             "model_checks": round(time.time() - checking, 3)}
  taxa_reports = {m.name: m.label_taxa.report(config.embed.taxonomy.taxa)
                  for m in config.embed.models if m.label_taxa is not None}
  prior_reports = {m.name: m.prior.report() for m in config.embed.models
                   if m.prior is not None}
  base = run_summary.RunSummary(
      job=job.kind,
      package={"name": "natvision", "version": transforms.__version__},
      flags=list(argv) if argv is not None else sys.argv[1:],
      spec=run_spec.to_dict(), timings=timings,
      taxonomy=taxa_reports or None, prior=prior_reports or None)
  return job.plan(config, prepared, base, run_spec), options


def run(job: Job, argv: Optional[Sequence[str]] = None,
        test_pipeline=None,
        report_writer: Optional[ReportWriter] = None) -> dict:
  """Runs a job; returns its summary as written (``RunSummary.to_dict()``),
  or, for a job that runs on (a template launch), the summary's launch
  fields with ``state``.  Arguments and errors as ``execute``'s."""
  summary, plan, state = _execute(job, argv, test_pipeline, report_writer)
  if summary is None:
    return dict(plan.base.to_dict(), state=state)
  return summary.to_dict()


def execute(job: Job, argv: Optional[Sequence[str]] = None,
            test_pipeline=None,
            report_writer: Optional[ReportWriter] = None
            ) -> Optional[run_summary.RunSummary]:
  """Runs a job; returns its summary as the pipeline wrote it, read back
  (``run_summary.read``), or None when the job runs on (a template launch
  or an asynchronous runner).

  Args:
    job: the job.
    argv: command-line flags (application and Beam flags together).
    test_pipeline: a TestPipeline to build on instead of a new Pipeline.
    report_writer: writes report.html after the summary (``Plan``); None
      writes none.

  Raises:
    ConfigError: bad flags, input or models, before the pipeline starts.
    storage.StorageError: storage failed (the run may be resumed).
  """
  return _execute(job, argv, test_pipeline, report_writer)[0]


def _execute(job: Job, argv, test_pipeline, report_writer
             ) -> Tuple[Optional[run_summary.RunSummary], Plan, str]:
  plan, options = plan_job(job, argv)
  plan = dataclasses.replace(plan, report_writer=report_writer)
  p = test_pipeline or beam.Pipeline(options=options)
  job.build(p, plan)
  # Progress lines count this run alone; when the pipeline runs in this
  # process, they are the whole job's.
  counter = progress.start_run(plan.layout.run_id,
                               getattr(plan.checked, "expected_total", None),
                               terminal=progress_terminal(options,
                                                          test_pipeline))
  try:
    result = p.run()
    state = result.wait_until_finish()
  finally:
    counter.close()
  if state != PipelineState.DONE:
    # A template launch or an asynchronous runner: the job commits its own
    # tables and writes its summary when it ends.
    print(job.pending(plan, str(state)), flush=True)
    return None, plan, str(state)
  report = run_summary.read(job.summary_path(plan))
  if report is None:
    raise storage.StorageError(
        f"{job.summary_path(plan)}: the pipeline ended but wrote no summary")
  console.sync_stderr()  # the last progress line before the summary
  print(job.summary(report), flush=True)
  return report, plan, str(state)


def progress_terminal(options: PipelineOptions, test_pipeline=None
                      ) -> Optional[TextIO]:
  """Where the progress bar is drawn, or None for plain progress lines.

  A bar needs stderr on a terminal and the photos counted in this process:
  the DirectRunner in memory or with threads (not ``multi_processing``,
  nor Dataflow, whose workers log their own lines).
  """
  if test_pipeline is not None:
    options = test_pipeline.options
  runner = options.view_as(StandardOptions).runner
  if runner not in (None, "DirectRunner", "direct"):
    return None
  if options.view_as(DirectOptions).direct_running_mode == "multi_processing":
    return None
  stream = _TERMINAL[0] if _TERMINAL else sys.stderr
  try:
    return stream if stream.isatty() else None
  except (AttributeError, ValueError):
    return None  # a replaced or closed stderr


# The terminal stderr was on before the console filter made fd 2 a pipe
# (see ``_filter_native_stderr``): the progress bar is drawn on it directly,
# since the filter passes whole lines only and a bar redraws one line.
_TERMINAL: List[TextIO] = []


def _keep_terminal() -> None:
  if not _TERMINAL and os.isatty(2):
    _TERMINAL.append(os.fdopen(os.dup(2), "w", buffering=1))


def main(job: Job, argv: Optional[Sequence[str]] = None,
         report_writer: Optional[ReportWriter] = None) -> int:
  """The command: runs the job and turns what happened into an exit status."""
  _keep_terminal()
  console.configure_logging(verbose=console.verbose_requested(argv))
  try:
    report = execute(job, argv, report_writer=report_writer)
  except ConfigError as e:
    print(f"{job.name}: error: {e}", file=sys.stderr)
    return 2
  except storage.StorageError as e:
    print(f"{job.name}: storage error: {e}; nothing more was committed, and "
          f"running the same command again resumes", file=sys.stderr)
    return 1
  return 0 if report is None else job.exit_status(report)

