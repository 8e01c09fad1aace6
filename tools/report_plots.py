"""The report's plots: matplotlib figures as ``<figure>`` elements.

Every plot is drawn with matplotlib's ``Figure`` (no pyplot: no global
backend or state is touched; ``savefig`` renders with Agg) and embedded as
a PNG data URI inside ``<figure class="plot" id="plot-NAME">``.  Without
matplotlib (the ``report`` or ``tools`` extra) every plot becomes a short
note, so the report keeps its text.

The drawing helpers below take plain figures (counts, seconds, points), so
the sections decide what to show and these only how: a plot is drawn only
when it carries something the text next to it does not say at a glance,
and points are labelled when there are at most ``FEW`` of them.
"""

from __future__ import annotations

import base64
import io
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from natvision.tools import report_html

DPI = 100
# At most this many points (photos) are labelled one by one in a scatter
# plot; more labels overlap.
FEW = 12
# At most this many photos get a row each in the scores plot.
SCORE_DOTS = 20
PHASE_COLOURS = {"launch": "#9bbb59", "model_checks": "#4f81bd",
                 "pipeline": "#f79646", "commit": "#8064a2"}


class Plots:
  """Makes matplotlib figures into ``<figure>`` elements (PNG data URIs).

  Attributes:
    available: matplotlib could be imported.
    count: figures embedded so far.
  """

  def __init__(self):
    try:
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
    e = report_html.e
    if fig is None:
      return (f'<p class="note">Plot "{e(caption)}" left out: matplotlib is '
              f"not installed (pip install 'natvision[report]').</p>")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    width, height = (int(round(v)) for v in fig.get_size_inches() * DPI)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    self.count += 1
    return (f'<figure class="plot" id="plot-{e(name)}">'
            f'<img alt="{e(caption)}" width="{width}" height="{height}" '
            f'src="data:image/png;base64,{data}">'
            f"<figcaption>{e(caption)}</figcaption></figure>")


def short_name(uri: str, limit: int = 24) -> str:
  """The last part of a URI or path, cut to ``limit`` characters."""
  name = uri.rstrip("/").rsplit("/", 1)[-1] or uri
  return name if len(name) <= limit else name[:limit - 1] + "\u2026"


def label_points(ax, xs: Sequence[float], ys: Sequence[float],
                 labels: Sequence[str]) -> None:
  """Writes each label beside its point (for at most ``FEW`` points);
  points at the same place get one label naming up to three of them."""
  groups = {}
  for x, y, text in zip(xs, ys, labels):
    groups.setdefault((round(float(x), 6), round(float(y), 6)), []).append(
        text)
  for (x, y), texts in groups.items():
    text = ", ".join(texts[:3]) + (f" +{len(texts) - 3}" if len(texts) > 3
                                   else "")
    ax.annotate(text, (x, y), xytext=(4, 3), textcoords="offset points",
                fontsize="x-small", color="#333")


def timings(plots: Plots, phases: Dict[str, float]):
  """One bar of the run's phases (seconds), each segment labelled."""
  fig = plots.new(6.4, 1.5)
  if fig is None:
    return None
  ax = fig.add_subplot()
  total = sum(phases.values()) or 1.0
  left = 0.0
  for phase, seconds in phases.items():
    ax.barh([0], [seconds], left=left, color=PHASE_COLOURS.get(phase, "grey"),
            edgecolor="white", label=f"{phase.replace('_', ' ')} "
            f"{seconds:.1f} s")
    if seconds / total > 0.08:
      ax.text(left + seconds / 2, 0, f"{seconds:.1f} s", ha="center",
              va="center", fontsize="small", color="white")
    left += seconds
  ax.set_yticks([])
  ax.set_xlim(0, total)
  ax.set_xlabel("seconds")
  ax.legend(fontsize="x-small", ncols=len(phases), loc="lower center",
            bbox_to_anchor=(0.5, 1.0), frameon=False)
  return fig


def bars(plots: Plots, counts: Dict[str, int], xlabel: str,
         colour: str) -> Optional[object]:
  """Horizontal bars, largest on top, each with its count at its end."""
  fig = plots.new(6.4, 0.7 + 0.3 * len(counts))
  if fig is None:
    return None
  ax = fig.add_subplot()
  names = [str(n) for n in counts][::-1]
  values = list(counts.values())[::-1]
  drawn = ax.barh(names, values, color=colour)
  ax.bar_label(drawn, padding=3, fontsize="x-small")
  ax.set_xlim(0, max(values) * 1.15 if values else 1)
  ax.set_xlabel(xlabel)
  ax.tick_params(axis="y", labelsize="small")
  return fig


def sizes(plots: Plots, w: np.ndarray, h: np.ndarray,
          labels: Sequence[str],
          megapixels: Optional[Tuple[np.ndarray, np.ndarray]] = None):
  """Width against height (labelled when at most ``FEW``) and, for more
  photos, a histogram of megapixels.

  Args:
    w, h: pixels of the photos drawn (all of them, or a sample).
    labels: one per point.
    megapixels: (photos per bin, bin edges) counted over every photo; None
      bins ``w * h / 1e6``.  Only the bins from the first to the last
      non-empty one are drawn.
  """
  few = len(w) <= FEW
  fig = plots.new(6.4, 3.0)
  if fig is None:
    return None
  if few:
    ax2 = fig.add_subplot()
  else:
    ax1, ax2 = fig.subplots(1, 2)
    if megapixels is None:
      mp = w * h / 1e6
      ax1.hist(mp, bins=min(30, max(5, len(mp) // 3)), color="#4f81bd")
    else:
      counts, edges = megapixels
      used = np.flatnonzero(counts)
      first, last = (used[0], used[-1] + 1) if len(used) else (0, 1)
      ax1.stairs(counts[first:last], edges[first:last + 1], fill=True,
                 color="#4f81bd")
    ax1.set_xlabel("megapixels")
    ax1.set_ylabel("photos")
  ax2.scatter(w, h, s=14 if few else 8, alpha=0.8 if few else 0.6,
              color="#4f81bd")
  if few:
    label_points(ax2, w, h, labels)
    ax2.margins(0.25)
  ax2.set_xlim(left=max(ax2.get_xlim()[0], 0))
  ax2.set_ylim(bottom=max(ax2.get_ylim()[0], 0))
  ax2.set_xlabel("width (px)")
  ax2.set_ylabel("height (px)")
  return fig


def scores(plots: Plots, values: np.ndarray, labels: Sequence[str],
           counts: Optional[Tuple[np.ndarray, np.ndarray]] = None):
  """Top-1 scores: a labelled dot per photo when at most ``SCORE_DOTS``,
  else a histogram (of ``counts``, (photos per bin, bin edges) counted over
  every photo, when given; else of ``values``, 20 bins over [0, 1])."""
  few = len(values) <= SCORE_DOTS
  fig = plots.new(6.4, 0.8 + 0.22 * len(values) if few else 2.6)
  if fig is None:
    return None
  ax = fig.add_subplot()
  if few:
    order = np.argsort(values)
    y = np.arange(len(values))
    ax.scatter(values[order], y, color="#8064a2", s=16)
    ax.set_yticks(y, [labels[i] for i in order], fontsize="x-small")
    ax.set_xlim(0.0, 1.0)
    ax.grid(axis="x", alpha=0.3)
  elif counts is not None:
    ax.stairs(counts[0], counts[1], fill=True, color="#8064a2")
    ax.set_ylabel("photos")
  else:
    ax.hist(values, bins=20, range=(0.0, 1.0), color="#8064a2")
    ax.set_ylabel("photos")
  ax.set_xlabel("top-1 score")
  return fig
