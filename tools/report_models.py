"""The report's sections on each model's rows and on the evaluation.

Per classifier, its most frequent top-1 labels and the distribution of
top-1 scores; per embedder, a 2-D projection (PCA) of the unit-scaled
embeddings of up to ``PROJECTION_ROWS`` photos (a uniform sample),
coloured by a column; and
the figures of ``OUT/evaluation.json`` when natvision-evaluate wrote one.
With at most ``report_plots.FEW`` photos, each point is labelled.  Tables
are read a record batch at a time (tools/report_scan.py), never whole.
"""

from __future__ import annotations

import collections
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from natvision.tools import report_html
from natvision.tools import report_plots
from natvision.tools import report_scan
from natvision.tools import tables as tables_lib

EVALUATION_FILE = "evaluation.json"
PROJECTION_ROWS = 5000
TOP_LABELS = 15
MAX_CATEGORIES = 10
# Column names tried, in order, to colour the projection when none is given.
COLOR_HINTS = ("label", "species", "taxon_id", "taxon", "class", "category",
               "site", "snapshot_date")


def section_classifier(table: tables_lib.ModelTable,
                       plots: report_plots.Plots) -> str:
  """Top-1 labels (a bar chart when some label is the top-1 of several
  photos) and top-1 scores (labelled dots when few, else a histogram).

  Read a record batch at a time (``report_scan.classifier_figures``):
  label counts, the score histogram, min and max count every row; the
  quartiles are those of a sample of ``report_scan.SCORE_SAMPLE_ROWS``
  rows (every row when the table has no more)."""
  e = report_html.e
  figures = report_scan.classifier_figures(table.files)
  n = figures.photos
  out = [f"<section class='model' id='classifier-{e(table.name)}'>"
         f"<h2>Classifier {e(table.name)}</h2>"
         f"<p>{n} photo(s).</p>"]
  if not n:
    out.append("</section>")
    return "".join(out)
  counts = collections.Counter(figures.labels).most_common(TOP_LABELS)
  if len({c for _, c in counts}) > 1:
    fig = report_plots.bars(plots, {str(k): c for k, c in counts},
                            "photos with this top-1 label", "#9bbb59")
    out.append(plots.html(fig, f"{table.name}-top-labels",
                          f"{table.name}: most frequent top-1 labels"))
  else:
    out.append("<p class='note'>Each of these top-1 labels is the top-1 of "
               f"{counts[0][1]} photo(s), so there is no plot.</p>")
  out.append(report_html.table(("top-1 label", "photos", "share"),
                               [(k, c, f"{c / n:.1%}") for k, c in counts]))
  few = n <= report_plots.SCORE_DOTS
  names = [f"{report_plots.short_name(u, 18)}: {str(l)[:22]}"
           for u, l in zip(figures.sample_uris, figures.sample_labels)]
  fig = report_plots.scores(plots, figures.sample_scores, names,
                            (figures.score_counts, report_scan.SCORE_EDGES))
  out.append(plots.html(fig, f"{table.name}-scores",
                        f"{table.name}: top-1 score of each photo "
                        "(photo: label)" if few else
                        f"{table.name}: distribution of top-1 scores"))
  quantiles = figures.quantiles([0.0, 0.25, 0.5, 0.75, 1.0])
  out.append(report_html.table(
      ("top-1 score", "min", "25%", "median", "75%", "max"),
      [["", *(f"{q:.4f}" for q in quantiles)]]))
  if not figures.complete:
    out.append(f"<p class='note'>The quartiles are those of a random sample "
               f"of {len(figures.sample_scores)} of the {n} photos; the "
               "counts, min, max and the histogram count every photo.</p>")
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
                 n: int) -> pa.Table:
  """A uniform sample of up to ``n`` rows (every row when there are no
  more, in table order), read a record batch at a time
  (``report_scan.sample_rows``): at most ``5 * n`` sampled rows and one
  batch are held, whatever the table's size."""
  sample = report_scan.sample_rows(table.files, columns, n).table()
  if sample is None:
    return pa.table({c: pa.array([], pa.null()) for c in columns})
  return sample


def pca_2d(vectors: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Projects unit-scaled rows on their first two principal components.

  Args:
    vectors: float ``[n, d]``.

  Returns:
    (points ``[n, 2]``, share of the variance of each component ``[2]``).
  """
  x = np.asarray(vectors, np.float32)  # for a plot: half the copies
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


def section_embedder(table: tables_lib.ModelTable, plots: report_plots.Plots,
                      color_column: Optional[str]) -> str:
  names = table.schema().names + (
      [tables_lib.PARTITION_KEY] if any(f.partition for f in table.files)
      else [])
  carried = [n for n in names if n not in tables_lib.MODEL_COLUMNS]
  data = _read_sample(table, ["embedding", "uri"] + carried, PROJECTION_ROWS)
  e = report_html.e
  out = [f"<section class='model' id='embedder-{e(table.name)}'>"
         f"<h2>Embedder {e(table.name)}</h2>"]
  if data.num_rows == 0:
    out.append("<p>No rows.</p></section>")
    return "".join(out)
  column = data.column("embedding").combine_chunks()
  vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(
      -1, column.type.list_size)
  points, share = pca_2d(vectors)
  colour = _choose_color_column(names, data, color_column)
  if color_column and colour is None:
    out.append(f"<p class='note'>No column {report_html.e(color_column)} "
               "in this table; the projection is not coloured.</p>")
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
             + (f", coloured by <code>{e(colour)}</code>" if colour else "")
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
    if len(points) <= report_plots.FEW and "uri" in data.column_names:
      report_plots.label_points(
          ax, points[:, 0], points[:, 1],
          [report_plots.short_name(u, 18)
           for u in data.column("uri").to_pylist()])
      ax.margins(0.2)
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
    out.append(report_html.table((colour, "photos", "mean PC 1", "mean PC 2"),
                           centroid_rows))
  out.append("</section>")
  return "".join(out)


def section_evaluation(evaluation: dict, plots: report_plots.Plots) -> str:
  e = report_html.e
  ks = evaluation.get("k", [])
  out = ["<section id='evaluation'><h2>Evaluation</h2>",
         f"<p>From {e(EVALUATION_FILE)} ({e(evaluation.get('created', ''))})"
         f", against the column <code>{e(evaluation.get('label_column'))}"
         f"</code>"
         + (f" with taxa {e(evaluation['taxa'])}" if evaluation.get("taxa")
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
                  + [report_html.fmt(v) for v in micro]
                  + [report_html.fmt(v) for v in macro])
      if block.get("photos"):  # a model with nothing evaluated: no bars
        figures.append((f"{name} ({rank})", micro, macro))
  out.append(report_html.table(
      ["model", "kind", "rank", "photos", "skipped"]
      + [f"Recall@{k}" for k in ks] + [f"macro Recall@{k}" for k in ks], rows))
  fig = (plots.new(6.4, 0.8 + 0.3 * len(figures) * max(1, len(ks)))
         if figures else None)
  if fig is not None:
    ax = fig.add_subplot()
    labels = [f[0] for f in figures]
    height = 0.8 / (2 * len(ks))
    y = np.arange(len(figures))
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
  if figures:
    out.append(plots.html(fig, "evaluation", "Recall@k and macro Recall@k "
                          "per model (models with photos evaluated)"))
  for name, m in evaluation.get("models", {}).items():
    per_label = m.get("per_label", [])[:20]
    if per_label:
      out.append(f"<h3>{e(name)}: per label (largest first)</h3>")
      out.append(report_html.table(
          ["label", "photos"] + [f"Recall@{k}" for k in ks],
          [[r["label"], r["photos"]]
           + [report_html.fmt(r["recall_at_k"].get(str(k))) for k in ks]
           for r in per_label]))
    if m.get("skipped_labels"):
      shown = list(m["skipped_labels"].items())[:10]
      out.append(f"<p>{e(name)}: skipped {m.get('skipped')} photo(s): "
                 + e(", ".join(f"{k} ({v})" for k, v in shown)) + "</p>")
  out.append("</section>")
  return "".join(out)
