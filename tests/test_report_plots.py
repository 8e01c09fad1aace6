"""The report's plots (tools/report_plots.py): few points are labelled,
many are binned; bars carry their counts; no matplotlib, a note."""

import numpy as np

from natvision.tools import report_plots


def _texts(fig):
  return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_few_photos_are_named_and_many_are_binned():
  plots = report_plots.Plots()
  w, h = np.array([640.0, 480, 300]), np.array([480.0, 640, 300])
  fig = report_plots.sizes(plots, w, h, ["a.jpg", "b.jpg", "c.jpg"])
  assert len(fig.axes) == 1 and _texts(fig) == ["a.jpg", "b.jpg", "c.jpg"]
  n = report_plots.FEW + 1
  fig = report_plots.sizes(plots, np.full(n, 100.0), np.full(n, 50.0),
                           ["x"] * n)
  assert len(fig.axes) == 2 and _texts(fig) == []  # histogram + scatter
  fig = report_plots.scores(plots, np.array([0.2, 0.9]), ["p", "q"])
  assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["p", "q"]


def test_bars_carry_their_counts_and_timings_name_each_phase():
  plots = report_plots.Plots()
  fig = report_plots.bars(plots, {"read": 7, "decode": 2}, "rows", "red")
  assert sorted(_texts(fig)) == ["2", "7"]
  fig = report_plots.timings(plots, {"launch": 1.0, "pipeline": 9.0})
  labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
  assert labels == ["launch 1.0 s", "pipeline 9.0 s"]
  html = plots.html(fig, "timings", "caption")
  assert html.startswith('<figure class="plot" id="plot-timings">')
  assert "data:image/png;base64," in html and plots.count == 1


def test_without_matplotlib_a_plot_is_a_note():
  plots = report_plots.Plots()
  plots.available = False
  assert plots.new() is None
  assert "matplotlib is not installed" in plots.html(None, "x", "cap")


def test_short_name():
  assert report_plots.short_name("gs://b/dir/photo.jpg") == "photo.jpg"
  assert len(report_plots.short_name("/" + "x" * 40, 10)) == 10
