"""Run reports: one self-contained HTML file per run, and natvision-report.

    natvision-report --output_dir OUT [--snapshot_date 2024-05-27]
                     [--color_column species]

Every ``natvision-embed`` run writes ``OUT/report.html`` after ``run.json``,
and every ``natvision-ingest`` run writes ``OUT/runs/<date>.html`` beside
``runs/<date>.json`` for the partition it added; ``natvision-report``
rebuilds either from the committed tables, adding the figures of
``OUT/evaluation.json`` when natvision-evaluate has written one.

This module puts the page together and is where the commands start; the
parts are one module a concern:

* transforms/run_summary.py: the run summary both jobs write and every
  reader reads, one type (older summaries read into it too);
* tools/report_scan.py: the model tables' sizes, labels, scores and a
  sample for the projections, in bounded memory;
* tools/report_errors.py: the errors table aggregated in bounded memory;
* tools/report_sections.py: the run, where the time went, errors, sizes;
* tools/report_models.py: classifiers, embedders, the evaluation;
* tools/report_plots.py: the plots (matplotlib, PNG data URIs);
* tools/report_html.py: escaping, tables, the page.

The jobs get the writer from here: natvision-embed and natvision-ingest
start here (``embed_main``, ``ingest_main``) and hand ``write_after_run`` to
the job they run, since the pipelines never import tools/.

Inside a job, ``write_report`` never raises: a report that cannot be
written is logged as an error (the tables are committed before) and the run
goes on.  Without matplotlib (``pip install 'natvision[report]'``) the
report has the text and a note instead of plots.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from typing import Dict, Optional, Sequence, Tuple

from apache_beam.io.filesystems import FileSystems

from natvision.transforms import console
from natvision.transforms import extras
from natvision.transforms import helptext
from natvision.transforms import models as models_lib
from natvision.transforms import run_summary
from natvision.transforms import storage
from natvision.tools import report_html
from natvision.tools import report_models
from natvision.tools import report_sections
from natvision.tools import tables as tables_lib
from natvision.tools.report_plots import Plots

LOGGER = logging.getLogger("natvision.report")
REPORT_FILE = "report.html"
RUN_FILE = "run.json"
RUNS_DIR = "runs"
EVALUATION_FILE = report_models.EVALUATION_FILE
DEFAULT_SIZE_SAMPLE = 200
__all__ = ["Plots", "ReportError", "build_report", "write_report",
           "write_after_run", "embed_main", "ingest_main", "main", "parser",
           "report_paths"]


class ReportError(ValueError):
  """The report cannot be built; the message says what is missing."""


def _read_json(path: str) -> Optional[dict]:
  if not storage.exists(path):
    return None
  return json.loads(storage.read_bytes(path))


def _model_tables(output_dir: str, partition: Optional[str]
                  ) -> Dict[str, tables_lib.ModelTable]:
  out = {}
  for name in tables_lib.find_models(output_dir):
    try:
      out[name] = tables_lib.open_model_table(output_dir, name, partition)
    except tables_lib.TableError:
      continue  # no rows in this partition
  return out


def report_paths(output_dir: str, snapshot_date: Optional[str] = None
                 ) -> Tuple[str, str]:
  """(run summary, report) paths of a run or of one ingestion partition."""
  if snapshot_date:
    base = FileSystems.join(output_dir, RUNS_DIR, snapshot_date)
    return base + ".json", base + ".html"
  return (FileSystems.join(output_dir, RUN_FILE),
          FileSystems.join(output_dir, REPORT_FILE))


def build_report(output_dir: str, snapshot_date: Optional[str] = None,
                 color_column: Optional[str] = None,
                 size_sample: int = DEFAULT_SIZE_SAMPLE) -> str:
  """The report's HTML for a run (or one ingestion partition).

  Args:
    output_dir: the job's --output_dir.
    snapshot_date: an ingestion partition's date; None for natvision-embed.
    color_column: the column that colours the embedders' projections
      (default: a carried label-like column).
    size_sample: photos whose headers are read when the tables carry no
      sizes.

  Raises:
    ReportError: no run summary and no tables.
  """
  run_path, _ = report_paths(output_dir, snapshot_date)
  run = run_summary.read(run_path)
  tables = _model_tables(output_dir, snapshot_date)
  if run is None and not tables:
    raise ReportError(f"nothing to report under {output_dir}: no "
                      f"{run_path} and no tables")
  evaluation = _read_json(FileSystems.join(output_dir, EVALUATION_FILE))
  plots = Plots()
  e = report_html.e
  title = (f"natvision run report: {output_dir}"
           + (f", {tables_lib.PARTITION_KEY}={snapshot_date}"
              if snapshot_date else ""))
  body = [f"<h1>{e(title)}</h1>"]
  if run is not None and run.standin:
    body.append("<p class='warning'>Stand-in models were used: their "
                "embeddings and predictions mean nothing.</p>")
  if not plots.available:
    body.append("<p class='warning'>matplotlib is not installed, so this "
                "report has no plots (pip install 'natvision[report]' and "
                "run natvision-report).</p>")
  if run is not None:
    body.append(report_sections.section_run(run))
    body.append(report_sections.section_timings(run, plots))
  else:
    body.append(f"<p class='note'>No run summary at {e(run_path)}.</p>")
  body.append(report_sections.section_errors(output_dir, snapshot_date, run,
                                             plots))
  body.append(report_sections.section_sizes(tables, plots, size_sample))
  for table in tables.values():
    if table.kind == models_lib.CLASSIFIER:
      body.append(report_models.section_classifier(table, plots))
  for table in tables.values():
    if table.kind == models_lib.EMBEDDER:
      body.append(report_models.section_embedder(table, plots, color_column))
  if evaluation:
    body.append(report_models.section_evaluation(evaluation, plots))
  else:
    body.append("<section id='evaluation'><h2>Evaluation</h2><p class='note'>"
                "No evaluation.json: run natvision-evaluate --output_dir "
                f"{e(output_dir)} --label_column COLUMN, then "
                "natvision-report.</p></section>")
  generated = datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds")
  body.append(f"<footer class='note'>Generated {generated} by "
              f"natvision.</footer>")
  return report_html.page(title, body)


def write_report(output_dir: str, snapshot_date: Optional[str] = None,
                 color_column: Optional[str] = None,
                 size_sample: int = DEFAULT_SIZE_SAMPLE,
                 raise_errors: bool = False) -> Optional[str]:
  """Writes ``OUT/report.html`` (or ``OUT/runs/<date>.html``).

  Called by the jobs' last step, after the tables are committed and the run
  summary is written.  There it must not fail the run: unless
  ``raise_errors``, any failure is logged as an error, with how to rebuild
  the report, and None is returned; success is logged too.  The command
  (``raise_errors``) raises instead and prints its own line.

  Returns:
    The report's path, or None when it could not be written.
  """
  _, path = report_paths(output_dir, snapshot_date)
  try:
    page = build_report(output_dir, snapshot_date, color_column, size_sample)
    with FileSystems.create(path) as f:
      f.write(page.encode("utf-8"))
  except Exception:  # noqa: BLE001 - a report never costs a run its tables
    if raise_errors:
      raise
    LOGGER.exception(
        "natvision: THE RUN REPORT %s COULD NOT BE WRITTEN. The tables are "
        "committed and unaffected; rebuild the report with: natvision-report "
        "--output_dir %s%s", path, output_dir,
        f" --snapshot_date {snapshot_date}" if snapshot_date else "")
    return None
  if not raise_errors:  # the command prints its own line
    LOGGER.info("run report written to %s", path)
  return path


def write_after_run(output_dir: str,
                    snapshot_date: Optional[str] = None) -> None:
  """The jobs' last step after the summary (a ``pipelines.launch.ReportWriter``):
  ``write_report``, which logs a failure and never raises."""
  write_report(output_dir, snapshot_date)


# Every job built once this module is imported writes its report.


def embed_main(argv: Optional[Sequence[str]] = None) -> int:
  """natvision-embed: the job (pipelines/embed_images.py) with its report."""
  from natvision.pipelines import embed_images  # pylint: disable=import-outside-toplevel
  return embed_images.main(argv, report_writer=write_after_run)


def ingest_main(argv: Optional[Sequence[str]] = None) -> int:
  """natvision-ingest: the job (pipelines/ingest_observations.py) with its
  report."""
  from natvision.pipelines import ingest_observations  # pylint: disable=import-outside-toplevel
  return ingest_observations.main(argv, report_writer=write_after_run)


def _latest_partition(output_dir: str) -> Optional[str]:
  summaries = storage.match(FileSystems.join(output_dir, RUNS_DIR, "*.json"))
  dates = sorted(p.rsplit("/", 1)[-1][:-len(".json")] for p in summaries)
  return dates[-1] if dates else None


def parser() -> argparse.ArgumentParser:
  """natvision-report's flags."""
  p = helptext.ArgumentParser(
      prog="natvision-report",
      formatter_class=helptext.HelpFormatter,
      description="Rebuild the HTML run report of an output folder "
      "(OUT/report.html, or OUT/runs/<date>.html for an ingestion "
      "partition), with the evaluation when OUT/evaluation.json exists. "
      "Every run writes its report itself; this command rebuilds it, for "
      "example after natvision-evaluate.",
      epilog=helptext.epilog([
          "natvision-report --output_dir out",
          "natvision-report --output_dir gs://b/tables "
          "--snapshot_date 2024-05-27"]))
  p.add_argument("--output_dir", required=True,
                 help="a natvision-embed or natvision-ingest --output_dir "
                 "(local or gs://)")
  p.add_argument("--snapshot_date",
                 help="ingestion output: the partition to report (default: "
                 "the latest run under OUT/runs/)")
  p.add_argument("--color_column",
                 help="column that colours the embedders' projections "
                 "(default: a label-like carried column)")
  p.add_argument("--size_sample", type=int, default=DEFAULT_SIZE_SAMPLE,
                 help="photo headers read when the tables carry no sizes")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  console.configure_logging()  # the jobs' quiet console
  args = parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  status = extras.check_command("tools", "natvision-report")
  if status is not None:
    return status
  date = args.snapshot_date
  if date is None and not storage.exists(
      FileSystems.join(args.output_dir, RUN_FILE)):
    date = _latest_partition(args.output_dir)
  try:
    path = write_report(args.output_dir, date, args.color_column,
                        args.size_sample, raise_errors=True)
  except (ReportError, tables_lib.TableError) as e:
    print(f"natvision-report: error: {e}", file=sys.stderr)
    return 2
  print(f"report written to {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
