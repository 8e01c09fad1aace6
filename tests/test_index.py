"""tools/index.py: the index of an embeddings table, exact or tuned.

On a copy of a real job's tables (tests/conftest.py ``labelled_job``): the
exact index records its files and refuses a table rewritten since; a table
of 6000 clustered vectors gets an IVF index whose Recall@10 is measured
again here on other queries.
"""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.search_helpers import MODEL, out, read_table as _table  # noqa: F401
from natvision.tools import index
from natvision.tools import search


def test_index_is_exact_below_the_threshold_and_records_its_files(out,
                                                                  capsys):
  assert search.index_main(["--output_dir", out, "--model", MODEL]) == 0
  assert "exact index (Flat)" in capsys.readouterr().out
  with open(os.path.join(out, "embeddings", MODEL, "_index",
                         "index.json")) as f:
    meta = json.load(f)
  table = _table(out)
  assert meta["kind"] == "exact" and meta["recall_at_10"] == 1.0
  assert meta["rows"] == table.num_rows and meta["dims"] == 64
  assert sum(f["rows"] for f in meta["files"]) == table.num_rows
  assert all(f["path"].endswith(".parquet") for f in meta["files"])


def test_an_index_of_other_files_is_refused(labelled_job, tmp_path, capsys):
  # Its own copy: the file added below would make the module's ``out``
  # refuse every later search of this model.
  out = str(tmp_path / "out")
  shutil.copytree(labelled_job["out"], out)
  assert search.index_main(["--output_dir", out, "--model",
                            "inception_resnet_v2"]) == 0
  folder = os.path.join(out, "embeddings", "inception_resnet_v2")
  first = sorted(f for f in os.listdir(folder) if f.endswith(".parquet"))[0]
  table = pq.read_table(os.path.join(folder, first))
  pq.write_table(table.slice(0, 1), os.path.join(folder, "part-extra.parquet"))
  capsys.readouterr()
  assert search.main(["--output_dir", out, "--model", "inception_resnet_v2",
                      "--image_id", "s0c0"]) == 2
  assert "natvision-index --output_dir" in capsys.readouterr().err


def test_approximate_index_reaches_and_records_its_recall(labelled_job,
                                                          tmp_path):
  """A table above the threshold gets an IVF index tuned to Recall@10."""
  source = _table(labelled_job["out"])
  rng = np.random.default_rng(5)
  n, d = 6000, 64
  centres = rng.standard_normal((60, d))
  x = (centres[rng.integers(0, 60, n)] + 1.2 * rng.standard_normal((n, d)))
  x = x.astype(np.float32)
  folder = tmp_path / "embeddings" / MODEL
  folder.mkdir(parents=True)
  flat = pa.array(x.reshape(-1), pa.float32())
  table = pa.table({
      "image_id": [f"v{i}" for i in range(n)],
      "uri": [f"/nowhere/{i}.jpg" for i in range(n)],
      "model": [MODEL] * n,
      "embedding": pa.FixedSizeListArray.from_arrays(flat, d),
  }).replace_schema_metadata(source.schema.metadata)
  for part in range(2):
    pq.write_table(table.slice(part * n // 2, n // 2),
                   folder / f"part-0000{part}-of-00002.parquet")
  meta = index.build_index(str(tmp_path), MODEL, exact_below=n * d - 1)
  assert meta["kind"] == "approximate"
  assert meta["factory"].startswith("IVF") and meta["nprobe"] >= 1
  assert meta["recall_at_10"] >= index.TARGET_RECALL
  # Measured again here, on other queries: about what was recorded.
  searcher = index.open_searcher(str(tmp_path), MODEL)
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  queries = rng.choice(n, 200, replace=False)
  truth = np.argsort(-(unit[queries] @ unit.T), axis=1)[:, :10]
  _, found = searcher.search(x[queries], 10)
  recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
  assert recall >= meta["recall_at_10"] - 0.05
  # A query by image_id still returns the photo itself first.
  hits = search.search_photo(searcher, 5, image_id="v4321")
  assert hits[0].row["image_id"] == "v4321"
  assert hits[0].score == pytest.approx(1.0, abs=1e-5)
