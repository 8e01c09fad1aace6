"""Run reports: one self-contained HTML file per run, and natvision-report.

    natvision-report --output_dir OUT [--snapshot_date 2024-05-27]
                     [--color_column species]

Every ``natvision-embed`` run writes ``OUT/report.html`` after ``run.json``,
and every ``natvision-ingest`` run writes ``OUT/runs/<date>.html`` beside
``runs/<date>.json`` for the partition it added; ``natvision-report``
rebuilds either from the committed tables, adding the figures of
``OUT/evaluation.json`` when natvision-evaluate has written one.

The file needs no network access and no script: styles are inline and every
plot is a PNG (matplotlib, Agg) embedded as a data URI, each inside
``<figure class="plot">``.  Everything a plot shows is also given as text.
Sections: the run (models, photos, speed), photos per second over the run,
errors by stage and by reason with examples, source photo sizes, per
classifier its most frequent top-1 labels and the distribution of top-1
scores, per embedder a 2-D projection (PCA) coloured by a column, and the
evaluation.

Timing: the tables do not record when each photo was processed.  The
photos-per-second plot therefore uses what there is: the run's start and
end (run.json) and, per committed Parquet file, when it was last written
and how many rows it holds; the report says so next to the plot.

Photo sizes come from the tables' ``source_width`` and ``source_height``
columns where the tables have them; for older tables the headers of up to
``--size_sample`` photos are read (only the header, not the pixels).

The jobs get the writer from here: natvision-embed and natvision-ingest
start here (``embed_main``, ``ingest_main``) and hand ``write_after_run`` to
the job they run, since the pipelines never import tools/.

Inside a job, ``write_report`` never raises: a report that cannot be
written is logged as an error (the tables are committed before) and the run
goes on.  Without matplotlib (``pip install 'natvision[tools]'``) the report
has the text and a note instead of plots.
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime
import html
import io
import json
import logging
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import console
from natvision.transforms import extras
from natvision.transforms import helptext
from natvision.transforms import models as models_lib
from natvision.transforms import storage
from natvision.tools import tables as tables_lib

LOGGER = logging.getLogger("natvision.report")
REPORT_FILE = "report.html"
RUN_FILE = "run.json"
RUNS_DIR = "runs"
EVALUATION_FILE = "evaluation.json"
PROJECTION_ROWS = 5000
TOP_LABELS = 15
EXAMPLES_PER_REASON = 3
REASONS_SHOWN = 12
MAX_CATEGORIES = 10
DEFAULT_SIZE_SAMPLE = 200
DPI = 100
# Column names tried, in order, to colour the projection when none is given.
COLOR_HINTS = ("label", "species", "taxon_id", "taxon", "class", "category",
               "site", "snapshot_date")


class ReportError(ValueError):
  """The report cannot be built; the message says what is missing."""


# --------------------------------------------------------------------------
# Plots.


class Plots:
  """Makes matplotlib figures into ``<figure>`` elements (PNG data URIs).

  Without matplotlib every plot becomes a short note, so the report still
  has its text.
  """

  def __init__(self):
    try:
      # Figure without pyplot: no global backend or state is touched, and
      # savefig renders with Agg.
      from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
      self._figure = Figure
      self.available = True
    except ImportError:
      self._figure = None
      self.available = False
    self.count = 0

  def new(self, width: float = 6.4, height: float = 3.2):
    """A new figure of ``width`` x ``height`` inches; None without matplotlib."""
    if not self.available:
      return None
    return self._figure(figsize=(width, height), dpi=DPI,
                        layout="constrained")

  def html(self, fig, name: str, caption: str) -> str:
    """The figure as ``<figure class="plot">`` with an inline PNG."""
    if fig is None:
      return (f'<p class="note">Plot "{_e(caption)}" left out: matplotlib is '
              f"not installed (pip install 'natvision[tools]').</p>")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    width, height = (int(round(v)) for v in fig.get_size_inches() * DPI)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    self.count += 1
    return (f'<figure class="plot" id="plot-{_e(name)}">'
            f'<img alt="{_e(caption)}" width="{width}" height="{height}" '
            f'src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _e(text) -> str:
  return html.escape(str(text), quote=True)


def _table_html(header: Sequence[str], rows: Sequence[Sequence],
                cls: str = "") -> str:
  head = "".join(f"<th>{_e(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>"
                 for row in rows)
  return (f'<table class="{cls}"><thead><tr>{head}</tr></thead>'
          f"<tbody>{body}</tbody></table>")


def _fmt(value, digits: int = 3) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


# --------------------------------------------------------------------------
# Sections.


def _parse_time(text: Optional[str]) -> Optional[float]:
  if not text:
    return None
  try:
    return datetime.datetime.fromisoformat(text).timestamp()
  except ValueError:
    return None


def _section_run(run: dict, partition: Optional[str]) -> str:
  rows = [("output folder", run.get("output_dir", "")),
          ("run id", run.get("run_id", "")),
          ("started", run.get("started", "")),
          ("ended", run.get("ended", "")),
          ("elapsed", f"{run['elapsed_s']:.1f} s" if "elapsed_s" in run
           else "-")]
  if partition:
    rows.insert(0, ("partition", f"{tables_lib.PARTITION_KEY}={partition}"))
  if "inputs" in run:
    rows.append(("photos in the input", run["inputs"]))
  if "images_per_second" in run:
    rows.append(("photos per second (whole run)",
                 f"{run['images_per_second']:.2f}"))
  errors = run.get("errors") or {}
  if errors:
    rows.append(("error rows", f"{errors.get('total', 0)} for "
                 f"{errors.get('photos', '?')} photo(s)"))
  models = run.get("models") or run.get("model_details") or []
  model_rows = []
  if isinstance(models, list):
    for m in models:
      model_rows.append((m.get("name"), m.get("kind"), m.get("runtime", ""),
                         m.get("resize", ""), m.get("output_width", ""),
                         "stand-in (outputs mean nothing)" if m.get("standin")
                         else ""))
  elif isinstance(models, dict):
    for name, m in models.items():
      model_rows.append((name, "", "", "", "",
                         f"{m.get('rows', '?')} row(s) added, "
                         f"{m.get('failed', '?')} failed"))
  out = ["<section id='run'><h2>The run</h2>",
         _table_html(("", ""), rows, "kv")]
  if model_rows:
    out.append(_table_html(("model", "kind", "runtime", "preparation",
                            "width", "note"), model_rows))
  out.append("</section>")
  return "".join(out)


def _file_times(files: Sequence[tables_lib.TableFile]
                ) -> List[Tuple[float, int]]:
  """(last written, rows) for each file."""
  out = []
  for table_file in files:
    match = FileSystems.match([table_file.path])[0].metadata_list
    if not match:
      continue
    when = getattr(match[0], "last_updated_in_seconds", None)
    if when:
      out.append((float(when), tables_lib.file_rows(table_file.path)))
  return out


def _section_speed(run: dict, tables: Dict[str, tables_lib.ModelTable],
                   plots: Plots) -> str:
  start = run.get("started_ts") or _parse_time(run.get("started"))
  end = _parse_time(run.get("ended"))
  if start is not None and run.get("elapsed_s") is not None:
    end = start + float(run["elapsed_s"])  # the ISO times are to the second
  out = ["<section id='speed'><h2>Photos per second over the run</h2>"]
  out.append(
      "<p class='note'>The tables do not record when each photo was "
      "processed. This plot uses the run's start and end from the run "
      "summary and, for each committed Parquet file of each model, when the "
      "file was last written and how many rows it holds: rows are counted "
      "when their file was closed, so the curve is a step per file (on "
      "runners that write all files at the end, one step).</p>")
  series = {name: sorted(_file_times(t.files)) for name, t in tables.items()}
  if start is None or not any(series.values()):
    out.append("<p>No timing data.</p></section>")
    return "".join(out)
  end = end or max(t for s in series.values() for t, _ in s)
  text_rows = []
  fig = plots.new(6.4, 4.6)
  axes = fig.subplots(2, 1, sharex=True) if fig is not None else None
  span = max(end - start, 1e-9)
  for name, points in series.items():
    xs, ys, total = [0.0], [0], 0
    for when, rows in points:
      total += rows
      xs.append(min(max(when - start, 0.0), span))
      ys.append(total)
    text_rows.append((name, total, len(points), f"{total / span:.2f}",
                      f"{xs[1]:.1f} s" if len(xs) > 1 else "-",
                      f"{xs[-1]:.1f} s"))
    if axes is not None:
      axes[0].step(xs + [span], ys + [ys[-1]], where="post", label=name)
      # Rows per second between one file's close and the next's.
      edges = np.array(xs)
      rates = np.diff(ys) / np.maximum(np.diff(edges), 1e-3)
      axes[1].step(edges, np.append(rates, rates[-1] if len(rates) else 0),
                   where="post", label=name)
  if axes is not None:
    axes[0].set_ylabel("rows written\n(cumulative)")
    axes[1].set_ylabel("rows per second\n(between files)")
    axes[1].set_xlabel("seconds since the run started")
    axes[1].set_ylim(bottom=0)
    for ax in axes:
      ax.axvline(span, color="grey", linestyle=":", label="run ended")
    axes[0].legend(fontsize="small")
  out.append(plots.html(fig, "speed", "Rows written over the run and rows "
                        "per second, per model (by file)"))
  out.append(_table_html(("model", "rows", "files", "rows per second (run)",
                          "first file", "last file"), text_rows))
  out.append("</section>")
  return "".join(out)


# Values kept for a plot, a median or quantiles: a uniform sample of at most
# this many per figure, so the report's memory does not grow with the run.
SAMPLE_POINTS = 20_000


class _Sample:
  """A uniform sample without replacement of at most ``size`` rows of a
  stream of arrays (bottom-k of seeded random keys); exact (every row)
  while the stream holds fewer.

  Attributes:
    seen: rows offered so far.
  """

  def __init__(self, size: Optional[int] = None, seed: int = 0):
    self._size = SAMPLE_POINTS if size is None else size
    self._rng = np.random.default_rng(seed)
    self._keys = np.empty(0)
    self._rows: Optional[np.ndarray] = None
    self.seen = 0

  def add(self, rows: np.ndarray) -> None:
    """Offers ``rows`` (``[n]`` or ``[n, k]``)."""
    rows = np.asarray(rows)
    self.seen += len(rows)
    keys = np.concatenate([self._keys, self._rng.random(len(rows))])
    kept = (rows if self._rows is None
            else np.concatenate([self._rows, rows]))
    if len(keys) > self._size:
      best = np.sort(np.argpartition(keys, self._size)[:self._size])
      keys, kept = keys[best], kept[best]
    self._keys, self._rows = keys, kept

  @property
  def rows(self) -> np.ndarray:
    return self._rows if self._rows is not None else np.empty(0)

  @property
  def whole(self) -> bool:
    return self.seen <= self._size


def _file_by_file(files, columns: Sequence[str]):
  """Each file's rows (an Arrow table), one file in memory at a time."""
  for table_file in files:
    yield tables_lib.read_files([table_file], columns)


def _section_errors(output_dir: str, partition: Optional[str],
                    plots: Plots, error_photos: Optional[int] = None) -> str:
  """Error rows by stage and by reason, with examples, read file by file.

  Args:
    error_photos: photos with any error, from the run's summary (counted
      in the graph); None: counted here from the ids (natvision-report on
      tables without a summary).
  """
  out = ["<section id='errors'><h2>Errors</h2>"]
  files = tables_lib.errors_files(output_dir, partition)
  if not files:
    out.append("<p>No errors table.</p></section>")
    return "".join(out)
  by_stage: collections.Counter = collections.Counter()
  reasons: collections.Counter = collections.Counter()
  examples: Dict[Tuple[str, str], List[dict]] = collections.defaultdict(list)
  ids = set() if error_photos is None else None
  for part in _file_by_file(files, ["image_id", "uri", "model", "stage",
                                    "error"]):
    for r in part.to_pylist():
      by_stage[r["stage"]] += 1
      reason = (r["error"].replace(r["uri"], "<uri>") if r["uri"]
                else r["error"])
      key = (r["stage"], reason)
      reasons[key] += 1
      if len(examples[key]) < EXAMPLES_PER_REASON:
        examples[key].append(r)
      if ids is not None:
        ids.add(r["image_id"])
  total = sum(by_stage.values())
  if not total:
    out.append("<p>No errors: every photo has a row in every model's "
               "table.</p></section>")
    return "".join(out)
  photos = len(ids) if ids is not None else error_photos
  out.append(f"<p>{total} error row(s) for {photos} photo(s).</p>")
  fig = plots.new(6.4, 0.6 + 0.35 * len(by_stage))
  if fig is not None:
    ax = fig.add_subplot()
    stages = sorted(by_stage, key=by_stage.get)
    ax.barh(stages, [by_stage[s] for s in stages], color="#c0504d")
    ax.set_xlabel("error rows")
  out.append(plots.html(fig, "errors-by-stage", "Error rows by stage"))
  out.append(_table_html(("stage", "rows"),
                         sorted(by_stage.items(), key=lambda kv: -kv[1])))
  ranked = sorted(reasons.items(), key=lambda kv: -kv[1])
  table_rows = []
  for (stage, reason), count in ranked[:REASONS_SHOWN]:
    shown = "; ".join(
        f"{i['uri']}" + (f" ({i['model']})" if i["model"] else "")
        for i in examples[(stage, reason)])
    table_rows.append((stage, reason, count, shown))
  out.append("<h3>By reason</h3>")
  out.append(_table_html(("stage", "reason", "rows", "examples"), table_rows,
                         "wide"))
  if len(ranked) > REASONS_SHOWN:
    out.append(f"<p>and {len(ranked) - REASONS_SHOWN} more reason(s).</p>")
  out.append("</section>")
  return "".join(out)


def _header_size(uri: str) -> Optional[Tuple[int, int]]:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    with FileSystems.open(uri) as f:
      with Image.open(f) as image:
        return image.size
  except Exception:  # noqa: BLE001 - a photo that cannot be read is skipped
    return None


def _sizes_from_columns(table: tables_lib.ModelTable
                        ) -> Tuple[np.ndarray, int, str]:
  """(sampled ``[n, 2]`` widths and heights, photos with a size, note)."""
  sample = _Sample()
  for part in _file_by_file(table.files, ["source_width", "source_height"]):
    wh = np.stack([part.column(c).to_numpy(zero_copy_only=False)
                   for c in ("source_width", "source_height")], axis=1)
    wh = wh[np.all(np.nan_to_num(wh.astype(float)) > 0, axis=1)]
    sample.add(wh.astype(np.int64))
  note = ("Width and height as stored in each file (EXIF orientation "
          "applied), from the source_width and source_height columns of "
          f"the {table.name} table: {sample.seen} photo(s)")
  if not sample.whole:
    note += (f"; the plots and figures are of a uniform sample of "
             f"{len(sample.rows)}")
  return sample.rows, sample.seen, note + "."


def _sizes_from_headers(table: tables_lib.ModelTable, size_sample: int
                        ) -> Tuple[np.ndarray, str]:
  """Reads the headers of a uniform sample of ``size_sample`` photos."""
  sample = _Sample(size_sample)
  for part in _file_by_file(table.files, ["uri"]):
    sample.add(np.array(part.column("uri").to_pylist(), dtype=object))
  chosen = sorted(sample.rows)
  sizes = [s for s in (_header_size(u) for u in chosen) if s]
  note = ("These tables do not record photo sizes, so the headers of "
          f"{len(chosen)} of {sample.seen} photo(s) were read (a random "
          f"sample when there are more than {size_sample}); sizes are as "
          f"stored, before EXIF orientation; {len(sizes)} could be read.")
  return np.array(sizes, np.int64).reshape(-1, 2), note


def _section_sizes(tables: Dict[str, tables_lib.ModelTable], plots: Plots,
                   size_sample: int) -> str:
  """Source photo sizes, from one table (the models share their photos),
  read file by file."""
  out = ["<section id='sizes'><h2>Source photo sizes</h2>"]
  wh, note = np.empty((0, 2), np.int64), ""
  for table in tables.values():
    names = table.schema().names
    if "source_width" in names and "source_height" in names:
      wh, _, note = _sizes_from_columns(table)
      break
  if not len(wh) and tables:
    wh, note = _sizes_from_headers(next(iter(tables.values())), size_sample)
  out.append(f"<p class='note'>{_e(note)}</p>")
  if not len(wh):
    out.append("</section>")
    return "".join(out)
  w = wh[:, 0].astype(float)
  h = wh[:, 1].astype(float)
  mp = w * h / 1e6
  fig = plots.new(6.4, 2.8)
  if fig is not None:
    ax1, ax2 = fig.subplots(1, 2)
    ax1.hist(mp, bins=min(30, max(5, len(mp) // 3)), color="#4f81bd")
    ax1.set_xlabel("megapixels")
    ax1.set_ylabel("photos")
    ax2.scatter(w, h, s=8, alpha=0.6, color="#4f81bd")
    ax2.set_xlabel("width (px)")
    ax2.set_ylabel("height (px)")
  out.append(plots.html(fig, "sizes", "Source photo sizes: megapixels, and "
                        "width against height"))
  rows = [(name, f"{np.min(v):.0f}", f"{np.median(v):.0f}", f"{np.max(v):.0f}")
          for name, v in (("width (px)", w), ("height (px)", h))]
  rows.append(("megapixels", f"{mp.min():.2f}", f"{np.median(mp):.2f}",
               f"{mp.max():.2f}"))
  out.append(_table_html(("", "min", "median", "max"), rows))
  out.append("</section>")
  return "".join(out)


def _section_classifier(table: tables_lib.ModelTable, plots: Plots) -> str:
  """Top-1 labels (counted exactly) and scores (histogram exact; quantiles
  of a uniform sample past ``SAMPLE_POINTS``), read file by file."""
  labels: collections.Counter = collections.Counter()
  bins = np.zeros(20, np.int64)
  sample = _Sample()
  for part in _file_by_file(table.files, ["label", "score"]):
    labels.update(part.column("label").to_pylist())
    scores = np.array(part.column("score").to_pylist(), float)
    bins += np.histogram(scores, bins=20, range=(0.0, 1.0))[0]
    sample.add(scores)
  photos = sample.seen
  out = [f"<section class='model' id='classifier-{_e(table.name)}'>"
         f"<h2>Classifier {_e(table.name)}</h2>"
         f"<p>{photos} photo(s).</p>"]
  if not photos:
    out.append("</section>")
    return "".join(out)
  counts = labels.most_common(TOP_LABELS)
  fig = plots.new(6.4, 0.6 + 0.28 * len(counts))
  if fig is not None:
    ax = fig.add_subplot()
    names = [str(n) for n, _ in counts][::-1]
    ax.barh(names, [c for _, c in counts][::-1], color="#9bbb59")
    ax.set_xlabel("photos with this top-1 label")
    ax.tick_params(axis="y", labelsize="small")
  out.append(plots.html(fig, f"{table.name}-top-labels",
                        f"{table.name}: most frequent top-1 labels"))
  out.append(_table_html(("top-1 label", "photos", "share"),
                         [(n, c, f"{c / photos:.1%}")
                          for n, c in counts]))
  fig = plots.new(6.4, 2.6)
  if fig is not None:
    ax = fig.add_subplot()
    edges = np.linspace(0.0, 1.0, 21)
    ax.stairs(bins, edges, fill=True, color="#8064a2")
    ax.set_xlabel("top-1 score")
    ax.set_ylabel("photos")
  out.append(plots.html(fig, f"{table.name}-scores",
                        f"{table.name}: distribution of top-1 scores"))
  quantiles = np.quantile(sample.rows, [0.0, 0.25, 0.5, 0.75, 1.0])
  out.append(_table_html(("top-1 score", "min", "25%", "median", "75%",
                          "max"),
                         [["", *(f"{q:.4f}" for q in quantiles)]]))
  if not sample.whole:
    out.append(f"<p class='note'>Quantiles of a uniform sample of "
               f"{len(sample.rows)} of the {photos} scores.</p>")
  out.append("</section>")
  return "".join(out)


def _choose_color_column(names: Sequence[str], data, requested: Optional[str]
                         ) -> Optional[str]:
  if requested:
    return requested if requested in names else None
  carried = [n for n in names if n not in tables_lib.MODEL_COLUMNS]
  ordered = [n for n in COLOR_HINTS if n in carried] + [
      n for n in carried if n not in COLOR_HINTS]
  for name in ordered:
    distinct = len(set(data.column(name).to_pylist())) if name in (
        data.column_names) else 0
    if 1 < distinct <= 50:
      return name
  return None


def _read_sample(table: tables_lib.ModelTable, columns: Sequence[str],
                 n: int):
  """Up to ``n`` rows, read from the first files until there are enough."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  parts, total = [], 0
  for table_file in table.files:
    part = tables_lib.read_files([table_file], columns)
    parts.append(part)
    total += part.num_rows
    if total >= 4 * n:
      break
  data = pa.concat_tables(parts, promote_options="default")
  if data.num_rows > n:
    rng = np.random.default_rng(0)
    data = data.take(pa.array(np.sort(rng.choice(data.num_rows, n,
                                                 replace=False))))
  return data


def pca_2d(vectors: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Projects unit-scaled rows on their first two principal components.

  Args:
    vectors: float ``[n, d]``.

  Returns:
    (points ``[n, 2]``, share of the variance of each component ``[2]``).
  """
  x = np.asarray(vectors, np.float64)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  x = x / np.where(norms > 0, norms, 1.0)
  x = x - x.mean(axis=0)
  if len(x) < 2:
    return np.zeros((len(x), 2)), np.zeros(2)
  _, s, vt = np.linalg.svd(x, full_matrices=False)
  comps = vt[:2]
  points = x @ comps.T
  if points.shape[1] < 2:
    points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
  variance = s ** 2
  share = variance[:2] / max(variance.sum(), 1e-12)
  return points, np.pad(share, (0, 2 - len(share)))


def _section_embedder(table: tables_lib.ModelTable, plots: Plots,
                      color_column: Optional[str]) -> str:
  names = table.schema().names + (
      [tables_lib.PARTITION_KEY] if any(f.partition for f in table.files)
      else [])
  carried = [n for n in names if n not in tables_lib.MODEL_COLUMNS]
  data = _read_sample(table, ["embedding"] + carried, PROJECTION_ROWS)
  out = [f"<section class='model' id='embedder-{_e(table.name)}'>"
         f"<h2>Embedder {_e(table.name)}</h2>"]
  if data.num_rows == 0:
    out.append("<p>No rows.</p></section>")
    return "".join(out)
  column = data.column("embedding").combine_chunks()
  vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(
      -1, column.type.list_size)
  points, share = pca_2d(vectors)
  colour = _choose_color_column(names, data, color_column)
  if color_column and colour is None:
    out.append(f"<p class='note'>No column {_e(color_column)} in this table; "
               f"the projection is not coloured.</p>")
  # Values that differ only in case or spacing are one category (as
  # natvision-evaluate matches labels); each is shown as first written.
  raw = data.column(colour).to_pylist() if colour else [None] * data.num_rows
  first: Dict[Optional[str], str] = {}
  values = []
  for value in raw:
    key = None if value is None else (" ".join(str(value).split()).casefold()
                                      or None)
    first.setdefault(key, "(none)" if key is None else str(value).strip())
    values.append(key)
  counts = collections.Counter(values)
  shown = [v for v, _ in counts.most_common(MAX_CATEGORIES)]
  out.append(f"<p>{data.num_rows} photo(s) projected on the first two "
             f"principal components of their unit-scaled embeddings "
             f"({share[0]:.0%} and {share[1]:.0%} of the variance)"
             + (f", coloured by <code>{_e(colour)}</code>" if colour else "")
             + ".</p>")
  fig = plots.new(6.4, 4.4)
  if fig is not None:
    ax = fig.add_subplot()
    palette = [f"C{i}" for i in range(MAX_CATEGORIES)]
    other = [i for i, v in enumerate(values) if v not in shown]
    if other:
      ax.scatter(points[other, 0], points[other, 1], s=10, color="lightgrey",
                 label="other")
    for i, value in enumerate(shown):
      rows = [j for j, v in enumerate(values) if v == value]
      ax.scatter(points[rows, 0], points[rows, 1], s=14, color=palette[i],
                 label=first[value][:30])
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    if colour:
      ax.legend(fontsize="x-small", title=colour, loc="upper left",
                bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
  out.append(plots.html(fig, f"{table.name}-projection",
                        f"{table.name}: 2-D projection (PCA)"
                        + (f" coloured by {colour}" if colour else "")))
  if colour:
    centroid_rows = []
    for value in shown:
      rows = [j for j, v in enumerate(values) if v == value]
      centroid_rows.append((first[value], len(rows),
                            f"{points[rows, 0].mean():+.3f}",
                            f"{points[rows, 1].mean():+.3f}"))
    out.append(_table_html((colour, "photos", "mean PC 1", "mean PC 2"),
                           centroid_rows))
  out.append("</section>")
  return "".join(out)


def _section_evaluation(evaluation: dict, plots: Plots) -> str:
  ks = evaluation.get("k", [])
  out = ["<section id='evaluation'><h2>Evaluation</h2>",
         f"<p>From {_e(EVALUATION_FILE)} ({_e(evaluation.get('created', ''))})"
         f", against the column <code>{_e(evaluation.get('label_column'))}"
         f"</code>"
         + (f" with taxa {_e(evaluation['taxa'])}" if evaluation.get("taxa")
            else "") + ". It covers the whole output folder.</p>"]
  rows, figures = [], []
  for name, m in evaluation.get("models", {}).items():
    blocks = [("label", m)] + list(m.get("ranks", {}).items())
    for rank, block in blocks:
      micro = [block["recall_at_k"].get(str(k)) for k in ks]
      macro = [block["macro_recall_at_k"].get(str(k)) for k in ks]
      rows.append([name, m.get("kind"), rank, block.get("photos"),
                   m.get("skipped") if rank == "label" else
                   block.get("not_evaluated", 0)]
                  + [_fmt(v) for v in micro] + [_fmt(v) for v in macro])
      figures.append((f"{name} ({rank})", micro, macro))
  out.append(_table_html(
      ["model", "kind", "rank", "photos", "skipped"]
      + [f"Recall@{k}" for k in ks] + [f"macro Recall@{k}" for k in ks], rows))
  fig = plots.new(6.4, 0.8 + 0.3 * max(1, len(rows)) * max(1, len(ks)))
  if fig is not None and rows:
    ax = fig.add_subplot()
    labels = [f[0] for f in figures]
    height = 0.8 / (2 * len(ks))
    y = np.arange(len(rows))
    for i, k in enumerate(ks):
      micro = [f[1][i] or 0.0 for f in figures]
      macro = [f[2][i] or 0.0 for f in figures]
      ax.barh(y + (2 * i) * height, micro, height, label=f"Recall@{k}")
      ax.barh(y + (2 * i + 1) * height, macro, height,
              label=f"macro Recall@{k}")
    ax.set_yticks(y + 0.4 - height / 2, labels, fontsize="small")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("recall")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0)
  out.append(plots.html(fig, "evaluation", "Recall@k and macro Recall@k per "
                        "model"))
  for name, m in evaluation.get("models", {}).items():
    per_label = m.get("per_label", [])[:20]
    if per_label:
      out.append(f"<h3>{_e(name)}: per label (largest first)</h3>")
      out.append(_table_html(
          ["label", "photos"] + [f"Recall@{k}" for k in ks],
          [[r["label"], r["photos"]]
           + [_fmt(r["recall_at_k"].get(str(k))) for k in ks]
           for r in per_label]))
    if m.get("skipped_labels"):
      shown = list(m["skipped_labels"].items())[:10]
      out.append(f"<p>{_e(name)}: skipped {m.get('skipped')} photo(s): "
                 + _e(", ".join(f"{k} ({v})" for k, v in shown)) + "</p>")
  out.append("</section>")
  return "".join(out)


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;
margin:2em auto;max-width:60em;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:2em}table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f3f3f3}table.wide td{word-break:break-all}
figure.plot{margin:1em 0}figure.plot img{max-width:100%;height:auto;
border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.note{color:#555;font-size:.9em}.warning{background:#fff3cd;padding:.5em}
code{background:#f3f3f3;padding:0 .2em}
"""


# --------------------------------------------------------------------------
# The report.


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
  run = _read_json(run_path)
  tables = _model_tables(output_dir, snapshot_date)
  if run is None and not tables:
    raise ReportError(f"nothing to report under {output_dir}: no "
                      f"{run_path} and no tables")
  run = run or {}
  evaluation = _read_json(FileSystems.join(output_dir, EVALUATION_FILE))
  plots = Plots()
  title = (f"natvision run report: {output_dir}"
           + (f", {tables_lib.PARTITION_KEY}={snapshot_date}"
              if snapshot_date else ""))
  body = [f"<h1>{_e(title)}</h1>"]
  models = run.get("models") or []
  if isinstance(models, list) and any(m.get("standin") for m in models):
    body.append("<p class='warning'>Stand-in models were used: their "
                "embeddings and predictions mean nothing.</p>")
  if not plots.available:
    body.append("<p class='warning'>matplotlib is not installed, so this "
                "report has no plots (pip install 'natvision[tools]' and "
                "run natvision-report).</p>")
  if run:
    body.append(_section_run(run, snapshot_date))
  else:
    body.append(f"<p class='note'>No run summary at {_e(run_path)}.</p>")
  body.append(_section_speed(run, tables, plots))
  errors = run.get("errors")
  body.append(_section_errors(
      output_dir, snapshot_date, plots,
      errors.get("photos") if isinstance(errors, dict) else None))
  body.append(_section_sizes(tables, plots, size_sample))
  for table in tables.values():
    if table.kind == models_lib.CLASSIFIER:
      body.append(_section_classifier(table, plots))
  for table in tables.values():
    if table.kind == models_lib.EMBEDDER:
      body.append(_section_embedder(table, plots, color_column))
  if evaluation:
    body.append(_section_evaluation(evaluation, plots))
  else:
    body.append("<section id='evaluation'><h2>Evaluation</h2><p class='note'>"
                "No evaluation.json: run natvision-evaluate --output_dir "
                f"{_e(output_dir)} --label_column COLUMN, then "
                "natvision-report.</p></section>")
  generated = datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds")
  body.append(f"<footer class='note'>Generated {generated} by "
              f"natvision.</footer>")
  return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
          f"<title>{_e(title)}</title>"
          "<meta name='viewport' content='width=device-width, "
          "initial-scale=1'>"
          f"<style>{STYLE}</style></head><body>{''.join(body)}"
          "</body></html>\n")


def write_report(output_dir: str, snapshot_date: Optional[str] = None,
                 color_column: Optional[str] = None,
                 size_sample: int = DEFAULT_SIZE_SAMPLE,
                 raise_errors: bool = False) -> Optional[str]:
  """Writes ``OUT/report.html`` (or ``OUT/runs/<date>.html``).

  Called by the jobs' last step, after the tables are committed and the run
  summary is written.  There it must not fail the run: unless
  ``raise_errors``, any failure is logged as an error, with how to rebuild
  the report, and None is returned.

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
  p = argparse.ArgumentParser(
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
