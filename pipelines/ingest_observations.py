"""ingest_observations: each iNaturalist snapshot's new photos, one partition.

    python -m pipelines.ingest_observations \\
        --snapshot_dir gs://my-bucket/inat/2024-05-27 \\
        --photo_uri_template 'gs://my-mirror/photos/{photo_id}/medium.{extension}' \\
        --snapshot_date 2024-05-27 --output_dir gs://my-bucket/natvision \\
        --model_root gs://my-bucket/models --route fungi_mobile_v1=47170 \\
        [Beam flags]

iNaturalist publishes its open data as periodic snapshots.  Run on a
schedule, this job keeps the tables current at the cost of the new photos
only: it reads the snapshot's photos, observations and taxa inside the
pipeline, keeps the observations that pass the filters, leaves out each
photo that a model's table already holds (or that failed ``--max_attempts``
times for it), and appends the rest as one Hive-style partition per run::

    DIR/embeddings/<model>/snapshot_date=YYYY-MM-DD/part-*.parquet
    DIR/predictions/<model>/snapshot_date=YYYY-MM-DD/part-*.parquet
    DIR/errors/snapshot_date=YYYY-MM-DD/part-*.parquet

Every row carries the observation's fields (photo_id, photo_uuid,
observation_uuid, taxon_id, quality_grade, observed_on, latitude, longitude,
license).  ``image_id`` is the photo_id as text.

A run stages its files under ``DIR/_staging/`` and, in the pipeline's last
steps, once every table is written: removes the date's ``_SUCCESS`` markers,
moves the files into the date's partitions (replacing what an earlier run of
the same date left there), removes what dead runs of the date left under
``_staging``, writes ``DIR/runs/<date>.json`` and finally one ``_SUCCESS``
per partition, under ``DIR/_markers/<table>/`` (outside the tables, so that
every Parquet reader opens a table folder).  The job thus commits itself, also when launched from a
Dataflow template whose launcher does not wait for it; the launcher, when it
does wait, only reads the summary back and prints it.  "Already processed"
ignores the partition of the date being run, so rerunning a date recomputes
that partition: nothing is added twice and nothing is lost, and a run that
died part-way is completed by its rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from natvision.pipelines import launch
from natvision.transforms import commit
from natvision.transforms import config as config_lib
from natvision.transforms import embed
from natvision.transforms import fetch
from natvision.transforms import helptext
from natvision.transforms import licenses
from natvision.transforms import run_summary
from natvision.transforms import sinks
from natvision.transforms import snapshots
from natvision.transforms import spec as spec_lib
from natvision.transforms import summary as summary_lib
from natvision.transforms.config import ConfigError

DEFAULT_MAX_ATTEMPTS = 3
RUNS_DIR = "runs"
RUN_ID_PREFIX = "ingest"


@dataclasses.dataclass(frozen=True)
class IngestConfig:
  """Everything the job needs besides Beam's own options."""

  snapshot_dir: str
  template: snapshots.UriTemplate
  snapshot_date: datetime.date
  output_dir: str
  embed: embed.EmbedConfig
  filters: snapshots.Filters
  max_attempts: int = DEFAULT_MAX_ATTEMPTS

  def __post_init__(self):
    if not self.snapshot_dir:
      raise ConfigError("--snapshot_dir is required (a folder holding the "
                      "photos and observations tables)")
    if not self.output_dir:
      raise ConfigError("--output_dir is required (a local folder or gs://...)")
    if self.max_attempts < 1:
      raise ConfigError("--max_attempts must be at least 1")
    names = self.model_names
    unknown = [m for m, _ in self.filters.routes if m not in names]
    if unknown:
      raise ConfigError(
          f"--route names {', '.join(unknown)}, which is not in --models "
          f"({', '.join(names)}); add it to --models or drop the route")

  @property
  def models(self):
    return self.embed.models

  @property
  def model_names(self) -> Tuple[str, ...]:
    return tuple(m.name for m in self.embed.models)

  @property
  def partition(self) -> str:
    return snapshots.partition_name(self.snapshot_date)

  @property
  def date(self) -> str:
    return self.snapshot_date.isoformat()


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="natvision-ingest",
      formatter_class=helptext.HelpFormatter,
      description="Process the photos of an iNaturalist open-data snapshot "
      "that earlier runs did not, appending one partition per run "
      "(snapshot_date=YYYY-MM-DD) to the tables under --output_dir: "
      "embeddings or predictions per model, and errors. Observations are "
      "filtered by quality grade, taxon subtree and licence; a photo that "
      "failed --max_attempts times is not retried. Run it on a schedule and "
      "the tables stay current for the cost of the new photos only.",
      epilog=helptext.epilog([
          "natvision-ingest --snapshot_dir gs://b/inat/2024-05-27 "
          "--snapshot_date 2024-05-27 \\",
          "    --photo_uri_template "
          "'gs://b/photos/{photo_id}/medium.{extension}' \\",
          "    --output_dir gs://b/tables --model_root gs://b/models",
      ], beam=True))
  p.add_argument("--snapshot_dir",
                 help="folder (local or gs://) holding photos, observations "
                 "and optionally taxa tables: tab-separated .csv or .csv.gz "
                 "as iNaturalist publishes them, or .parquet")
  p.add_argument("--photo_uri_template",
                 help="where a photo's bytes live, naming columns of photos "
                 "or observations, e.g. "
                 "'gs://my-mirror/photos/{photo_id}/medium.{extension}'")
  p.add_argument("--snapshot_date",
                 help="YYYY-MM-DD, the partition this run writes "
                 "(default: today, UTC)")
  p.add_argument("--output_dir", help="folder (local or gs://) for the tables")
  embed.EmbedConfig.add_flags(p)
  launch.add_console_flags(p)
  p.add_argument("--quality_grade", default="research",
                 help="comma-separated grades to keep (research, needs_id, "
                 "casual), or 'any'")
  p.add_argument("--taxon_id",
                 help="keep only observations inside the subtree of these "
                 "taxa (comma-separated ids; needs a taxa table)")
  p.add_argument("--route", action="append", default=[],
                 metavar="MODEL=TAXON_ID[,TAXON_ID]",
                 help="send a model only the observations inside these "
                 "subtrees, e.g. fungi_mobile_v1=47170 (repeatable); other "
                 "models see every kept observation")
  licenses.LicenseFilter.add_flags(p)
  p.add_argument("--max_attempts", type=int, default=DEFAULT_MAX_ATTEMPTS,
                 help="a photo with this many error rows for a model in "
                 "earlier partitions is not retried for it")
  for flag in ("--snapshot_dir", "--photo_uri_template", "--output_dir"):
    helptext.mark_required(p, flag)
  helptext.mark_required(p, "--model_root",
                         unless="--model_handle names every model")
  return p


def _taxon_ids(text: str, flag: str) -> Tuple[int, ...]:
  ids = []
  for part in text.split(","):
    part = part.strip()
    if not part:
      continue
    try:
      ids.append(int(part))
    except ValueError:
      raise ConfigError(f"{flag} takes taxon ids (integers such as 47170), "
                      f"got {part!r}") from None
  if not ids:
    raise ConfigError(f"{flag} names no taxon id")
  return tuple(dict.fromkeys(ids))


def _filters(args: argparse.Namespace) -> snapshots.Filters:
  grades = [g.strip() for g in args.quality_grade.split(",") if g.strip()]
  if "any" in grades:
    if len(grades) > 1:
      raise ConfigError("--quality_grade 'any' cannot be combined with grades")
    quality = None
  else:
    quality = frozenset(grades)
  taxon_ids = (_taxon_ids(args.taxon_id, "--taxon_id")
               if args.taxon_id is not None else ())
  routes = tuple(
      (model, _taxon_ids(ids, f"--route {model}"))
      for model, ids in config_lib.key_values(args.route, "--route").items())
  if len(routes) != len(args.route):
    raise ConfigError("--route names a model twice; give one --route per "
                    "model with comma-separated taxon ids")
  return snapshots.Filters(quality_grades=quality, taxon_ids=taxon_ids,
                           routes=routes,
                           licenses=licenses.LicenseFilter.from_args(args))


def _date(text: Optional[str]) -> datetime.date:
  if text is None:
    return datetime.datetime.now(datetime.timezone.utc).date()
  try:
    if len(text) != 10:
      raise ValueError(text)
    return datetime.date.fromisoformat(text)
  except ValueError:
    raise ConfigError(f"--snapshot_date takes YYYY-MM-DD, e.g. 2024-05-27; got "
                    f"{text!r}") from None


def parse_args(argv: Optional[Sequence[str]] = None
               ) -> Tuple[IngestConfig, PipelineOptions]:
  """Parses application and Beam flags from one argv; no I/O.

  Raises:
    ConfigError: a flag is missing or invalid; the message names it.
  """
  args, options = launch.split_beam_args(_parser(), argv)
  return _configure(args), options


def _configure(args: argparse.Namespace) -> "IngestConfig":
  if not args.snapshot_dir:
    raise ConfigError("--snapshot_dir is required (a folder holding the "
                      "photos and observations tables)")
  if not args.photo_uri_template:
    raise ConfigError("--photo_uri_template is required, e.g. "
                      "'gs://my-mirror/photos/{photo_id}/medium.{extension}'")
  if not args.output_dir:
    raise ConfigError("--output_dir is required (a local folder or gs://...)")
  template = snapshots.UriTemplate(args.photo_uri_template)
  date = _date(args.snapshot_date)
  filters = _filters(args)
  config = IngestConfig(
      snapshot_dir=args.snapshot_dir, template=template, snapshot_date=date,
      output_dir=args.output_dir,
      embed=embed.EmbedConfig.from_args(args, args.model_root),
      filters=filters,
      max_attempts=args.max_attempts)
  return config


@dataclasses.dataclass(frozen=True)
class CheckedInput:
  """What the launcher learned before building the graph."""

  snapshot: snapshots.SnapshotConfig
  history: snapshots.History


def _table_root(output_dir: str, table_name: str) -> str:
  return FileSystems.join(output_dir, *table_name.split("/"))


def check_input(config: IngestConfig) -> CheckedInput:
  """Checks the snapshot, the template and the models; lists earlier runs.

  Reads only table headers and file listings, never table rows.

  Raises:
    ConfigError: a missing table or column, a template naming an unknown
      column, a scheme nothing installed reads, or a model that is missing
      or does not match the registry.
  """
  fetch.check_schemes([config.snapshot_dir, config.template.template,
                       config.output_dir])
  snapshot = snapshots.open_snapshot(config.snapshot_dir,
                                     need_taxa=config.filters.needs_taxa)
  sources = snapshots.template_sources(config.template, snapshot)
  snapshot_config = snapshots.SnapshotConfig(
      snapshot=snapshot, template=config.template, sources=sources,
      filters=config.filters, models=config.model_names)
  roots = [(m.name, _table_root(config.output_dir, commit.table_name(m)))
           for m in config.models]
  errors_root = FileSystems.join(config.output_dir, sinks.ERRORS)
  for _, root in roots + [("", errors_root)]:
    if snapshots.unpartitioned_files(root):
      raise ConfigError(
          f"--output_dir {config.output_dir}: {root} holds Parquet files "
          f"outside snapshot_date= partitions (an embed_images table?); "
          f"give ingest_observations an --output_dir of its own")
  history = snapshots.find_history(roots, errors_root, config.partition)
  return CheckedInput(snapshot=snapshot_config, history=history)


def summary_path(config: IngestConfig) -> str:
  return FileSystems.join(config.output_dir, RUNS_DIR, f"{config.date}.json")


def report_base(base: run_summary.RunSummary, config: IngestConfig,
                prepared: CheckedInput, run_id: str,
                started: float) -> run_summary.RunSummary:
  """The launcher's summary base completed with what the job knows before
  the run starts."""
  return dataclasses.replace(
      base,
      run_id=run_id,
      snapshot_date=config.date,
      partition=config.partition,
      snapshot_dir=config.snapshot_dir,
      output_dir=config.output_dir,
      summary_path=summary_path(config),
      started=commit.iso(started),
      started_ts=started,
      filters=config.filters.describe(),
      max_attempts=config.max_attempts,
      earlier_partitions=list(prepared.history.partitions),
      models=tuple(run_summary.ModelSummary.from_described(
          m.describe(), commit.table_name(m)) for m in config.models))


def build_pipeline(p: beam.Pipeline, config: IngestConfig, prepared: CheckedInput,
                   layout: commit.Layout,
                   base: run_summary.RunSummary,
                   report_writer: Optional[launch.ReportWriter] = None):
  """Adds the job's transforms to ``p``; no side effects at build time.

  The last steps, once every table is written, unmark the date's
  partitions, commit the staged files, and write the summary and the
  markers (FinishPartition), inside the pipeline.

  Args:
    base: the summary's fields known at launch (``report_base``).
  """
  found = p | "NewPhotos" >> snapshots.NewPhotos(
      prepared.snapshot, prepared.history, config.max_attempts,
      with_stats=True)
  out = found["work"] | "EmbedAndWrite" >> embed.EmbedAndWrite(
      config.embed, layout, snapshots.CARRIED)
  figures = {"error_tables": out[embed.ERROR_TABLES],
             "loads": out[embed.LOADS],
             "tallies": found[snapshots.STATS]
             } | "Summarize" >> summary_lib.Summarize()
  _ = out[embed.WRITTEN] | "CommitRun" >> commit.CommitRun(
      layout, FinishPartition(config, base, report_writer),
      beam.pvalue.AsSingleton(figures), before=commit.unmark_partition)


# --------------------------------------------------------------------------
# Committing the partition (the pipeline's last steps).


# --------------------------------------------------------------------------
# The report.


def _model_report(config: IngestConfig, layout: commit.Layout,
                  stats: Dict[str, int], model: run_summary.ModelSummary
                  ) -> run_summary.ModelSummary:
  """``model`` (as decided at launch) with the partition's counts."""
  routes = dict(config.filters.routes)
  rows = commit.count_rows(layout.table(model.table).final)
  new = stats.get(f"new_{model.name}", 0)
  return dataclasses.replace(
      model, new=new,
      done_before=stats.get(f"done_before_{model.name}", 0),
      held_back=stats.get(f"held_back_{model.name}", 0),
      rows=rows, failed=max(new - rows, 0),
      route=list(routes[model.name]) if model.name in routes else None)


def _snapshot_report(config: IngestConfig, stats: Dict[str, int]) -> dict:
  return {
      "photos": stats.get("snapshot_photos", 0),
      "observations": stats.get("snapshot_observations", 0),
      "taxa": stats.get("snapshot_taxa", 0),
      "observations_passed_filters": stats.get("observations_passed", 0),
      "photos_passed_filters": stats.get("photos_passed", 0),
      "photos_filtered_out": stats.get("photos_filtered_out", 0),
      "duplicate_photo_rows": stats.get("duplicate_photo_rows", 0),
      "bad_rows": {t: stats.get(f"bad_rows_{t}", 0)
                   for t in snapshots.TABLES},
      "subtree_sizes": {str(r): stats.get(f"subtree_{r}", 0)
                        for r in config.filters.roots},
  }


class FinishPartition:
  """The run's last step, after the commit (called by commit.CommitRun).

  Removes what dead runs of the date left under ``_staging``, writes
  ``runs/<date>.json``, the ``_SUCCESS`` markers and then the partition's
  report (``write_report``, ``launch.Plan.report_writer``: tools/report.py's;
  None writes none).  The counts come from the pipeline's own STATS
  (summed into ``stats``) and from the committed tables; nothing is read
  from Beam metrics.
  """

  def __init__(self, config: IngestConfig, base: run_summary.RunSummary,
               write_report: Optional[launch.ReportWriter] = None):
    self._config = config
    self._base = base
    self._write_report = write_report

  def __call__(self, layout: commit.Layout, figures: dict,
               commit_started: Optional[float] = None
               ) -> run_summary.RunSummary:
    config, base = self._config, self._base
    stats = figures["counts"]
    stale = commit.remove_dead_attempts(
        layout.output_dir, f"{RUN_ID_PREFIX}-{config.date}-",
        keep=layout.run_id)
    ended = time.time()
    report = dataclasses.replace(
        base,
        ended=commit.iso(ended),
        elapsed_s=round(max(ended - base.started_ts, 1e-9), 3),
        snapshot=_snapshot_report(config, stats),
        filtered_by_license=stats.get(licenses.FILTERED_BY_LICENSE, 0),
        models=tuple(_model_report(config, layout, stats, m)
                     for m in base.models),
        errors=run_summary.ErrorCounts.from_dict(figures["errors"]),
        model_loads=dict(figures["model_loads"]),
        stale_staging_removed=stale,
        timings=commit.run_timings(base.timings, base.started_ts,
                                   commit_started, ended))
    run_summary.write(base.summary_path, report)
    commit.write_markers(layout, config.date, report.ended)
    if self._write_report:
      self._write_report(layout.output_dir, config.date)  # never raises
    return report


def _summary(report: run_summary.RunSummary) -> str:
  snap = report.snapshot or {}
  lines = [
      f"natvision ingest_observations: {report.partition} in "
      f"{report.elapsed_s:.1f}s",
      f"  snapshot: {snap.get('photos')} photo row(s), "
      f"{snap.get('observations')} observation(s); "
      f"{snap.get('photos_passed_filters')} photo(s) passed the "
      f"filters ({_describe_filters(report.filters or {})})",
  ]
  if report.filtered_by_license:
    lines.append(f"  not fetched: {report.filtered_by_license} "
                 f"photo(s) left out by --license")
  for m in report.models:
    lines.append(
        f"  {m.name}: {m.new} new, {m.done_before} done in earlier runs, "
        f"{m.rows} row(s) added, {m.failed} failed")
  errs = report.errors or run_summary.ErrorCounts()
  stages = ", ".join(f"{k} {v}" for k, v in sorted(errs.by_stage.items()))
  lines.append(f"  errors: {errs.total} row(s) for {errs.photos} "
               f"photo(s)" + (f" ({stages})" if stages else ""))
  for m in report.models:
    if m.held_back:
      lines.append(
          f"  not retried: {m.held_back} photo(s) had failed "
          f"--max_attempts {report.max_attempts} times for {m.name} "
          f"(their rows are in {report.output_dir}/errors)")
  bad = {k: v for k, v in (snap.get("bad_rows") or {}).items() if v}
  if bad:
    lines.append("  unusable snapshot rows skipped: " + ", ".join(
        f"{k} {v}" for k, v in sorted(bad.items())))
  if report.timings:
    lines.append(f"  timings: {commit.format_timings(report.timings)}")
  lines.append(f"  partition {report.partition} committed under "
               f"{report.output_dir} (summary: {report.summary_path})")
  return "\n".join(lines)


def _describe_filters(filters: dict) -> str:
  grade = filters["quality_grade"]
  parts = ["quality_grade " + (grade if isinstance(grade, str)
                               else ",".join(grade))]
  if filters["taxon_id"]:
    parts.append("taxon " + ",".join(str(t) for t in filters["taxon_id"]))
  for model, ids in filters["routes"].items():
    parts.append(f"{model} only in " + ",".join(str(t) for t in ids))
  if filters.get("license"):
    parts.append("license " + ",".join(filters["license"]))
  return "; ".join(parts)


class IngestJob(launch.Job):
  """natvision-ingest in the launch sequence (pipelines/launch.py)."""

  name = "natvision-ingest"
  kind = run_summary.INGEST

  def parser(self) -> argparse.ArgumentParser:
    return _parser()

  def configure(self, args: argparse.Namespace) -> IngestConfig:
    return _configure(args)

  def check_input(self, config: IngestConfig) -> CheckedInput:
    return check_input(config)

  def plan(self, config: IngestConfig, prepared: CheckedInput,
           base: run_summary.RunSummary, run: spec_lib.RunSpec
           ) -> launch.Plan:
    run_id = f"{RUN_ID_PREFIX}-{config.date}-{commit.new_run_id()}"
    layout = commit.plan_layout(config.output_dir, config.models,
                                snapshots.CARRIED, run_id,
                                partition=config.partition, run=run)
    base = report_base(base, config, prepared, run_id, time.time())
    return launch.Plan(config=config, spec=run, checked=prepared,
                       layout=layout, resume=None, base=base)

  def build(self, p: beam.Pipeline, plan: launch.Plan) -> None:
    build_pipeline(p, plan.config, plan.checked, plan.layout, plan.base,
                   plan.report_writer)

  def summary_path(self, plan: launch.Plan) -> str:
    return summary_path(plan.config)

  def summary(self, report: run_summary.RunSummary) -> str:
    return _summary(report)

  def pending(self, plan: launch.Plan, state: str) -> str:
    return (f"natvision ingest_observations: job {state}; partition "
            f"{plan.config.partition} will be committed under "
            f"{plan.config.output_dir} when it ends (summary: "
            f"{summary_path(plan.config)}, then _SUCCESS)")


JOB = IngestJob()


def run(argv: Optional[Sequence[str]] = None, test_pipeline=None,
        report_writer: Optional[launch.ReportWriter] = None) -> dict:
  """Runs the job; returns the run report (also DIR/runs/<date>.json).

  Args:
    argv: command-line flags (application and Beam flags together).
    test_pipeline: a TestPipeline to build on instead of a new Pipeline.
    report_writer: writes the HTML report after the summary (tools/report.py's
      ``write_after_run``); None writes none.

  Raises:
    ConfigError: bad flags, snapshot or models, before the pipeline starts.
    storage.StorageError: storage failed; running the date again resumes.
  """
  return launch.run(JOB, argv, test_pipeline, report_writer)


def main(argv: Optional[Sequence[str]] = None,
         report_writer: Optional[launch.ReportWriter] = None) -> int:
  """natvision-ingest; exit status as pipelines/launch.py says."""
  return launch.main(JOB, argv, report_writer)


if __name__ == "__main__":
  sys.exit(main())
