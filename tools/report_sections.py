"""The report's sections on the run: the run, its errors, its photos' sizes.

The run section is the run summary's (tools/run_summary.py), the same
fields for both jobs: models and runtimes, rows per model, photos and the
one rate of the page (the summary's photos per second), and where the time
went (the summary's ``timings``).  There is no plot over time: the tables
do not record when each photo was processed, and a shard's file time is
when it was closed or moved, which for a run under ``--shard_rows``
photos is one step at the end.

The errors section is tools/report_errors.py's aggregate and the sizes
section tools/report_scan.py's (both bounded memory whatever the table's
size).  Photo sizes come from the tables' ``source_width`` and
``source_height`` columns, or for older tables from the headers of up to
``size_sample`` photos drawn uniformly from the tables' rows.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import run_summary
from natvision.tools import report_errors
from natvision.tools import report_html
from natvision.tools import report_plots
from natvision.tools import report_scan
from natvision.tools import tables as tables_lib

e = report_html.e


def section_run(run: run_summary.RunSummary) -> str:
  """The run: when, how many photos, how fast, each model, the phases."""
  rate = ("-" if run.images_per_second is None else
          f"{run.images_per_second:.2f}")
  rows = [("output folder", run.output_dir), ("run id", run.run_id),
          ("started", run.started), ("ended", run.ended),
          ("elapsed (pipeline and commit)",
           "-" if run.elapsed_s is None else f"{run.elapsed_s:.1f} s")]
  if run.partition:
    rows.insert(0, ("partition", run.partition))
  if run.inputs is not None:
    rows.append(("photos in the input", run.inputs))
  rows.append(("photos per second", rate))
  if run.errors is not None:
    rows.append(("error rows", f"{run.errors.total} for "
                 f"{report_html.fmt(run.errors.photos)} photo(s)"))
  out = ["<section id='run'><h2>The run</h2>",
         report_html.table(None, rows, "kv")]
  if run.images_per_second is None:
    out.append("<p class='note'>An ingestion summary counts photos per "
               "model (new), not the run's photos, so it has no photos per "
               "second.</p>")
  else:
    out.append("<p class='note'>Photos per second: the summary's photos in "
               "the input over the elapsed time (pipeline and commit, "
               "after the model checks); the only rate on this page.</p>")
  ingest = run.job == run_summary.INGEST
  header = ["model", "kind", "runtime", "preparation", "width", "rows"]
  if ingest:
    header += ["new", "done before", "failed"]
  notes = any(m.standin for m in run.models)
  if notes:
    header.append("note")
  model_rows = []
  for m in run.models:
    row = [m.name, m.kind, m.runtime, m.resize,
           report_html.fmt(m.output_width), report_html.fmt(m.rows)]
    if ingest:
      row += [report_html.fmt(m.new), report_html.fmt(m.done_before),
              report_html.fmt(m.failed)]
    if notes:
      row.append("stand-in (outputs mean nothing)" if m.standin else "")
    model_rows.append(row)
  if model_rows:
    out.append(report_html.table(header, model_rows))
  return "".join(out) + "</section>"


def section_timings(run: run_summary.RunSummary,
                    plots: report_plots.Plots) -> str:
  """Where the time went: the summary's phases, as a bar and as text."""
  out = ["<section id='timings'><h2>Where the time went</h2>"]
  if len(run.timings) < 2:
    out.append("<p class='note'>The run summary records no phases.</p>")
    return "".join(out) + "</section>"
  total = sum(run.timings.values())
  out.append(plots.html(report_plots.timings(plots, run.timings), "timings",
                        "Seconds per phase of the run, from the summary"))
  out.append(report_html.table(
      ("phase", "seconds", "share"),
      [(p.replace("_", " "), f"{s:.1f}", f"{s / total:.0%}" if total else "-")
       for p, s in run.timings.items()]))
  out.append("<p class='note'>launch: flags, stand-ins, the input check; "
             "model checks: loading, converting and checking the models; "
             "pipeline: reading, inference and writing; commit: moving the "
             "tables in.</p>")
  return "".join(out) + "</section>"


def section_errors(output_dir: str, partition: Optional[str],
                   run: Optional[run_summary.RunSummary],
                   plots: report_plots.Plots) -> str:
  """Errors by stage (a plot when there are several) and by reason."""
  out = ["<section id='errors'><h2>Errors</h2>"]
  files = tables_lib.errors_files(output_dir, partition)
  counts = run.errors if run is not None else None
  if not files and not (counts and counts.total):
    out.append("<p>No errors table.</p></section>")
    return "".join(out)
  agg = report_errors.aggregate_errors(files, counts)
  if not agg.total:
    out.append("<p>No errors: every photo has a row in every model's "
               "table.</p></section>")
    return "".join(out)
  photos = ("" if agg.photos is None else f" for {agg.photos} photo(s)")
  source = ("counted by the run summary" if agg.from_summary else
            "counted from the errors table (no run summary, so photos are "
            "not counted)")
  out.append(f"<p>{agg.total} error row(s){photos}, {source}.</p>")
  if len(agg.by_stage) > 1:
    fig = report_plots.bars(plots, agg.by_stage, "error rows", "#c0504d")
    out.append(plots.html(fig, "errors-by-stage", "Error rows by stage"))
  out.append(report_html.table(("stage", "rows"), list(agg.by_stage.items())))
  if len(agg.by_model) > 1:
    out.append(report_html.table(("model", "rows"),
                                 list(agg.by_model.items())))
  out.append("<h3>By reason</h3>")
  out.append(report_html.table(
      ("stage", "reason", "rows", "examples"),
      [(r.stage, r.reason, r.rows, "; ".join(r.examples))
       for r in agg.reasons], "wide"))
  if agg.more_reasons:
    out.append(f"<p>and {agg.more_reasons} more reason(s).</p>")
  if agg.other_rows:
    out.append(f"<p>and {agg.other_rows} row(s) of reasons past the first "
               f"{report_errors.MAX_REASONS}.</p>")
  return "".join(out) + "</section>"


def _header_size(uri: str) -> Optional[Tuple[int, int]]:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    with FileSystems.open(uri) as f:
      with Image.open(f) as image:
        return image.size
  except Exception:  # noqa: BLE001 - a photo that cannot be read is skipped
    return None


def _sizes_from_headers(tables: Dict[str, tables_lib.ModelTable],
                        size_sample: int):
  """(figures, note) from the headers of up to ``size_sample`` photos drawn
  uniformly from the tables' rows (a ``report_scan.Reservoir``, so the
  tables are read a batch at a time)."""
  reservoir = report_scan.Reservoir(max(size_sample, 1))
  for table in tables.values():
    for batch in tables_lib.iter_batches(table.files, ["image_id", "uri"]):
      reservoir.add(batch)
  sample = reservoir.table()
  uris: Dict[str, str] = {}
  if sample is not None and size_sample > 0:
    for image_id, uri in zip(sample.column("image_id").to_pylist(),
                             sample.column("uri").to_pylist()):
      uris.setdefault(image_id, uri)
  read = {}
  for image_id in sorted(uris):
    size = _header_size(uris[image_id])
    if size:
      read[image_id] = (*size, uris[image_id])
  note = ("These tables do not record photo sizes, so the headers of "
          f"{len(uris)} photo(s) were read (a random sample of the "
          f"{reservoir.seen} row(s) of the model tables when there are more "
          f"than {size_sample}); sizes are as stored, before EXIF "
          f"orientation; {len(read)} could be read.")
  if not read:
    return None, note
  batch = pa.RecordBatch.from_pydict({
      "uri": [v[2] for v in read.values()],
      "source_width": [v[0] for v in read.values()],
      "source_height": [v[1] for v in read.values()]})
  return report_scan.size_figures_of_batches([batch]), note


def section_sizes(tables: Dict[str, tables_lib.ModelTable],
                  plots: report_plots.Plots, size_sample: int) -> str:
  """Source photo sizes: width against height (each photo labelled when
  few) and, for many photos, a histogram of megapixels.

  Read a record batch at a time (tools/report_scan.py): min and max and
  the histogram are exact over every row, the medians and the scatter are
  those of a sample of ``report_scan.SIZE_SAMPLE_ROWS`` rows (the whole
  table when it has no more)."""
  out = ["<section id='sizes'><h2>Source photo sizes</h2>"]
  figures, note = None, ""
  for table in tables.values():
    names = table.schema().names
    if "source_width" in names and "source_height" in names:
      figures = report_scan.size_figures(table.files)
      if figures is None:
        continue
      note = ("Width and height as stored in each file (EXIF orientation "
              "applied), from the source_width and source_height columns of "
              f"the {table.name} table: {figures.photos} photo(s).")
      if not figures.complete:
        note += (f" Medians and the scatter plot are those of a random "
                 f"sample of {len(figures.sample_w)} of them; min, max and "
                 "the histogram count every photo.")
      break  # the models share their photos; one table is enough
  if figures is None:
    figures, note = _sizes_from_headers(tables, size_sample)
  out.append(f"<p class='note'>{e(note)}</p>")
  if figures is None:
    return "".join(out) + "</section>"
  few = figures.photos <= report_plots.FEW
  fig = report_plots.sizes(
      plots, figures.sample_w, figures.sample_h,
      [report_plots.short_name(u, 18) for u in figures.sample_uris],
      megapixels=(figures.megapixel_counts, report_scan.MEGAPIXEL_EDGES))
  out.append(plots.html(fig, "sizes", "Source photo sizes: width against "
                        "height, each photo named" if few else
                        "Source photo sizes: megapixels, and width against "
                        "height"))
  rows = [(name, f"{s.low:.0f}", f"{s.median:.0f}", f"{s.high:.0f}")
          for name, s in (("width (px)", figures.width),
                          ("height (px)", figures.height))]
  mp = figures.megapixels
  rows.append(("megapixels", f"{mp.low:.2f}", f"{mp.median:.2f}",
               f"{mp.high:.2f}"))
  out.append(report_html.table(("", "min", "median", "max"), rows))
  return "".join(out) + "</section>"
