"""The report's sections on the run (tools/report_sections.py): both jobs'
model rows, phases, errors with a plot only for several stages."""

import os

import pyarrow as pa
import pyarrow.parquet as pq

from natvision.tools import report_plots
from natvision.tools import report_sections
from natvision.transforms import run_summary
from tests.report_helpers import embed_summary as _embed
from tests.report_helpers import ingest_summary as _ingest


def test_run_section_gives_one_rate_and_both_jobs_model_rows():
  embed = report_sections.section_run(
      run_summary.RunSummary.from_dict(_embed()))
  ingest = report_sections.section_run(
      run_summary.RunSummary.from_dict(_ingest()))
  assert "<td>photos per second</td><td>2.50</td>" in embed
  assert "<td>photos per second</td><td>-</td>" in ingest
  row = ("<td>inaturalist_v2</td><td>embedder</td><td>tf</td>"
         "<td>center_crop</td><td>64</td><td>8</td>")
  assert row in embed and row + "<td>9</td><td>3</td><td>1</td>" in ingest
  assert "stand-in" in embed and "stand-in" not in ingest


def test_timings_plot_only_with_phases():
  plots = report_plots.Plots()
  run = run_summary.RunSummary.from_dict(_embed())
  assert 'id="plot-timings"' in report_sections.section_timings(run, plots)
  bare = run_summary.RunSummary.from_dict(dict(_embed(), timings={}))
  assert "<figure" not in report_sections.section_timings(bare, plots)


def _errors_table(out, stages):
  folder = os.path.join(out, "errors")
  os.makedirs(folder)
  n = len(stages)
  pq.write_table(pa.table({
      "image_id": [f"i{k}" for k in range(n)],
      "uri": [f"/p/{k}.jpg" for k in range(n)], "model": [None] * n,
      "stage": stages, "error": [f"bad /p/{k}.jpg" for k in range(n)]}),
                 os.path.join(folder, "part-0.parquet"))


def test_errors_plot_only_for_several_stages(tmp_path):
  plots = report_plots.Plots()
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  _errors_table(one, ["read", "read"])
  _errors_table(two, ["read", "decode", "read"])
  page = report_sections.section_errors(one, None, None, plots)
  assert "<figure" not in page and "2 error row(s)," in page
  assert "<td>bad &lt;uri&gt;</td><td>2</td><td>/p/0.jpg; /p/1.jpg</td>" in (
      page)
  page = report_sections.section_errors(two, None, None, plots)
  assert 'id="plot-errors-by-stage"' in page
  assert "<td>read</td><td>2</td>" in page
