"""The report's model sections (tools/report_models.py): PCA, a classifier
whose top-1 labels all count the same has no top-labels plot, few points named."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from natvision.tools import report_models
from natvision.tools import report_plots
from natvision.tools import tables as tables_lib


def test_pca_2d_finds_the_main_direction():
  rng = np.random.default_rng(0)
  x = np.outer(rng.normal(size=50), [1.0, 0, 0]) + [0, 0, 5.0]
  x += rng.normal(scale=0.01, size=x.shape)
  points, share = report_models.pca_2d(x)
  assert points.shape == (50, 2) and share[0] > 0.9


def _classifier(out, labels):
  folder = os.path.join(out, "predictions", "m")
  os.makedirs(folder)
  n = len(labels)
  pq.write_table(pa.table({
      "image_id": [f"i{k}" for k in range(n)],
      "uri": [f"/p/{k}.jpg" for k in range(n)], "label": labels,
      "label_id": list(range(n)), "score": [0.1 * (k + 1) for k in range(n)]}),
                 os.path.join(folder, "part-0.parquet"))
  return tables_lib.open_model_table(out, "m")


def test_top_labels_plot_only_when_a_label_repeats(tmp_path):
  plots = report_plots.Plots()
  distinct = report_models.section_classifier(
      _classifier(str(tmp_path / "a"), ["x", "y", "z"]), plots)
  assert "plot-m-top-labels" not in distinct
  assert "is the top-1 of 1 photo(s), so there is no plot" in distinct
  assert "top-1 score of each photo" in distinct  # few: one dot each
  repeated = report_models.section_classifier(
      _classifier(str(tmp_path / "b"), ["x", "x", "z"]), plots)
  assert 'id="plot-m-top-labels"' in repeated
  assert "<td>x</td><td>2</td><td>66.7%</td>" in repeated
