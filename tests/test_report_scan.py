"""The report's size and model sections in bounded memory
(tools/report_scan.py): the figures equal the whole-column computation on a
small table, the tables are read record batch by record batch (never a whole
file or column), and the reservoir sample is uniform and bounded."""

import collections
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from natvision.tools import report_models
from natvision.tools import report_plots
from natvision.tools import report_scan
from natvision.tools import report_sections
from natvision.tools import tables as tables_lib


def _write_model_table(out, kind, rows, rows_per_file, dims=8, seed=0):
  """A model table of ``rows`` rows under OUT/embeddings|predictions/m:
  sizes, labels, scores and embeddings drawn from ``seed``."""
  folder = os.path.join(out, "predictions" if kind == "c" else "embeddings",
                        "m")
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  for start in range(0, rows, rows_per_file):
    n = min(rows_per_file, rows - start)
    i = np.arange(start, start + n)
    columns = {
        "image_id": [f"i{k}" for k in i],
        "uri": [f"/p/{k}.jpg" for k in i],
        "source_width": rng.integers(100, 5000, n).astype(np.int32),
        "source_height": rng.integers(100, 5000, n).astype(np.int32),
        "species": [f"s{k % 4}" for k in i],
    }
    if kind == "c":
      columns["label"] = [f"l{int(k)}" for k in rng.zipf(1.5, n) % 40]
      columns["label_id"] = list(range(n))
      columns["score"] = rng.random(n)
    else:
      flat = rng.normal(size=n * dims).astype(np.float32)
      columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, dims)
    pq.write_table(pa.table(columns),
                   os.path.join(folder, f"part-{start:08d}.parquet"),
                   row_group_size=max(1, rows_per_file // 2))
  return tables_lib.open_model_table(out, "m")


@pytest.fixture
def no_whole_reads(monkeypatch):
  """Fails any whole-file or whole-table read, and any batch larger than
  ``tables.BATCH_ROWS``; returns the batch sizes handed out."""
  sizes = []
  real = pq.ParquetFile.iter_batches

  def whole(*args, **kwargs):
    raise AssertionError("a whole file or table was read")

  def batches(self, batch_size=65536, **kwargs):
    assert batch_size <= tables_lib.BATCH_ROWS, batch_size
    for batch in real(self, batch_size=batch_size, **kwargs):
      sizes.append(batch.num_rows)
      yield batch

  for name in ("read", "read_row_group", "read_row_groups"):
    monkeypatch.setattr(pq.ParquetFile, name, whole)
  monkeypatch.setattr(pq, "read_table", whole)
  monkeypatch.setattr(tables_lib, "read_files", whole)
  monkeypatch.setattr(pq.ParquetFile, "iter_batches", batches)
  return sizes


def test_sections_read_batch_by_batch(tmp_path, no_whole_reads):
  rows = 3 * tables_lib.BATCH_ROWS  # one file of them: a whole read is big
  plots = report_plots.Plots()
  classifier = _write_model_table(str(tmp_path / "c"), "c", rows, rows)
  embedder = _write_model_table(str(tmp_path / "e"), "e", rows, rows)
  page = report_sections.section_sizes({"m": classifier}, plots, 10)
  assert f"{rows} photo(s)" in page and "random sample" in page
  assert sum(no_whole_reads) == rows
  page = report_models.section_classifier(classifier, plots)
  assert f"<p>{rows} photo(s).</p>" in page
  page = report_models.section_embedder(embedder, plots, None)
  assert f"{report_models.PROJECTION_ROWS} photo(s) projected" in page
  assert sum(no_whole_reads) == 3 * rows
  assert max(no_whole_reads) <= tables_lib.BATCH_ROWS


def test_size_figures_equal_the_whole_columns(tmp_path):
  table = _write_model_table(str(tmp_path), "c", 500, 70)
  whole = pq.read_table(os.path.join(str(tmp_path), "predictions", "m"))
  w = whole.column("source_width").to_numpy().astype(float)
  h = whole.column("source_height").to_numpy().astype(float)
  mp = w * h / 1e6
  got = report_scan.size_figures(table.files, batch_rows=33)
  assert got.photos == 500 and got.complete
  for spread, values in ((got.width, w), (got.height, h),
                         (got.megapixels, mp)):
    assert (spread.low, spread.median, spread.high) == (
        values.min(), np.median(values), values.max())
  assert list(got.megapixel_counts) == list(
      np.histogram(mp, report_scan.MEGAPIXEL_EDGES)[0])
  assert list(got.sample_w) == list(w)  # the whole table, in table order
  # Past the sample's size: min, max and the histogram still count every
  # row, and the median is near the whole column's.
  few = report_scan.size_figures(table.files, sample_rows_kept=200,
                                 batch_rows=33)
  assert not few.complete and len(few.sample_w) == 200
  assert (few.width.low, few.width.high) == (w.min(), w.max())
  assert list(few.megapixel_counts) == list(got.megapixel_counts)
  assert abs(few.width.median - np.median(w)) < 0.15 * np.median(w)


def test_classifier_figures_equal_the_whole_columns(tmp_path):
  table = _write_model_table(str(tmp_path), "c", 400, 90)
  whole = pq.read_table(os.path.join(str(tmp_path), "predictions", "m"))
  labels = whole.column("label").to_pylist()
  scores = whole.column("score").to_numpy()
  got = report_scan.classifier_figures(table.files, batch_rows=25)
  assert got.photos == 400 and got.complete
  assert (collections.Counter(got.labels).most_common(15)
          == collections.Counter(labels).most_common(15))
  qs = [0.0, 0.25, 0.5, 0.75, 1.0]
  assert got.quantiles(qs) == list(np.quantile(scores, qs))
  assert list(got.score_counts) == list(
      np.histogram(scores, report_scan.SCORE_EDGES)[0])
  page = report_models.section_classifier(table, report_plots.Plots())
  top, n = collections.Counter(labels).most_common(1)[0]
  assert f"<td>{top}</td><td>{n}</td>" in page
  assert "".join(f"<td>{q:.4f}</td>" for q in np.quantile(scores, qs)) in page


def test_a_small_embedder_is_projected_whole_and_in_order(tmp_path):
  table = _write_model_table(str(tmp_path), "e", 300, 64)
  whole = pq.read_table(os.path.join(str(tmp_path), "embeddings", "m"))
  sample = report_models._read_sample(table, ["embedding", "uri"], 1000)
  assert sample.column("uri").to_pylist() == whole.column("uri").to_pylist()
  assert sample.column("embedding").to_pylist() == whole.column(
      "embedding").to_pylist()


def _stream(n, batch):
  for start in range(0, n, batch):
    yield pa.record_batch({"i": np.arange(start, min(n, start + batch))})


def test_reservoir_is_uniform_and_bounded():
  k, n = 500, 200_000
  reservoir = report_scan.Reservoir(k, seed=1)
  held = 0
  for batch in _stream(n, 1000):
    reservoir.add(batch)
    held = max(held, reservoir._held)  # pylint: disable=protected-access
  got = reservoir.table().column("i").to_numpy()
  assert len(got) == k and len(set(got)) == k and reservoir.seen == n
  assert list(got) == sorted(got)  # stream order
  assert held <= 5 * k
  # Uniform: about a tenth of the sample in each tenth of the stream.
  per_tenth = np.bincount(got * 10 // n, minlength=10)
  assert per_tenth.min() > 25 and per_tenth.max() < 75, per_tenth
  small = report_scan.Reservoir(k)
  for batch in _stream(123, 10):
    small.add(batch)
  assert small.complete and small.table().column("i").to_pylist() == list(
      range(123))


def test_iter_batches_adds_the_partition_column(tmp_path):
  root = tmp_path / "embeddings" / "m"
  for date, n in (("2024-01-07", 5), ("2024-01-14", 3)):
    folder = root / f"{tables_lib.PARTITION_KEY}={date}"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"image_id": [f"{date}-{i}" for i in range(n)],
                             "uri": ["u"] * n}),
                   str(folder / "part-0.parquet"))
  files = tables_lib.list_table_files(str(root))
  batches = list(tables_lib.iter_batches(
      files, ["image_id", tables_lib.PARTITION_KEY], batch_rows=2))
  assert max(b.num_rows for b in batches) == 2
  got = pa.Table.from_batches(batches)
  assert got.column_names == ["image_id", tables_lib.PARTITION_KEY]
  assert got.column(tables_lib.PARTITION_KEY).to_pylist() == (
      ["2024-01-07"] * 5 + ["2024-01-14"] * 3)
  assert got.equals(tables_lib.read_files(
      files, ["image_id", tables_lib.PARTITION_KEY]))
  # Without the partition column named, none is added.
  assert [b.schema.names for b in tables_lib.iter_batches(
      files, ["uri"])] == [["uri"], ["uri"]]
