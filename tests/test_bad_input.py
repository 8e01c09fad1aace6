"""The whole job over a corpus of odd and broken photos: nothing is lost.

Every input appears exactly once per model, in that model's table or in the
errors table; valid oddities are in the tables, broken files in errors with
the stage that refused them, and the job exits 0.
"""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from natvision.pipelines import embed_images
from tests import corpus

MODELS = ("inaturalist_v2", "fungi_mobile_v1", "inception_resnet_v2")
TABLES = {"inaturalist_v2": "embeddings", "fungi_mobile_v1": "predictions",
          "inception_resnet_v2": "embeddings"}


def _table(directory):
  files = [os.path.join(directory, f) for f in sorted(os.listdir(directory))
           if f.endswith(".parquet")]
  return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


@pytest.fixture(scope="module")
def corpus_run(tiny_models, tmp_path_factory):
  photos = tmp_path_factory.mktemp("corpus")
  items = corpus.write_corpus(str(photos))
  manifest = photos / "manifest.csv"
  lines = ["uri,batch"] + [f'"{photos / i.filename}",b{n % 3}'
                           for n, i in enumerate(items)]
  manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
  out = str(tmp_path_factory.mktemp("out"))
  code = embed_images.main([
      "--input", str(manifest), "--output_dir", out, "--models",
      ",".join(MODELS), "--model_root", tiny_models, "--runtime", "tf",
      "--batch_size", "8"])
  return items, photos, out, code


def test_exit_zero_and_corpus_is_big_enough(corpus_run):
  items, _, _, code = corpus_run
  assert code == 0
  assert len(items) >= 30
  assert sum(i.kind == "broken" for i in items) >= 10


def test_every_file_once_per_model(corpus_run):
  items, photos, out, _ = corpus_run
  uris = {str(photos / i.filename) for i in items}
  errors = _table(os.path.join(out, "errors"))
  for model in MODELS:
    rows = _table(os.path.join(out, TABLES[model], model))
    in_table = [r["uri"] for r in rows]
    in_errors = [e["uri"] for e in errors if e["model"] in (None, model)]
    assert sorted(in_table + in_errors) == sorted(uris), model
    assert all(r["batch"] in ("b0", "b1", "b2") for r in rows)


def test_valid_oddities_in_tables_broken_in_errors_with_stage(corpus_run):
  items, photos, out, _ = corpus_run
  errors = {e["uri"]: e for e in _table(os.path.join(out, "errors"))}
  rows = {r["uri"] for r in _table(os.path.join(out, "embeddings",
                                                "inaturalist_v2"))}
  for item in items:
    uri = str(photos / item.filename)
    if item.kind == "valid":
      assert uri in rows, (item.filename, errors.get(uri))
    else:
      assert uri in errors, item.filename
      assert errors[uri]["stage"] == item.expected_stage, item.filename
      assert errors[uri]["model"] is None
      assert len(errors[uri]["error"]) > 10, errors[uri]
      assert errors[uri]["batch"] in ("b0", "b1", "b2")


def test_run_json_counts_errors_by_stage(corpus_run):
  items, _, out, _ = corpus_run
  import json  # pylint: disable=import-outside-toplevel
  with open(os.path.join(out, "run.json")) as f:
    report = json.load(f)
  broken = [i for i in items if i.kind == "broken"]
  assert report["inputs"] == len(items)
  assert sum(report["errors"]["by_stage"].values()) == len(broken)
  for stage in {i.expected_stage for i in broken}:
    assert report["errors"]["by_stage"][stage] == sum(
        i.expected_stage == stage for i in broken)


def test_size_limit_is_a_read_error(tiny_models, photo_dir, tmp_path):
  out = str(tmp_path / "out")
  embed_images.run(["--input", str(photo_dir / "flower_big.jpg"),
                    "--output_dir", out, "--models", "inaturalist_v2",
                    "--model_root", tiny_models, "--runtime", "tf",
                    "--max_file_bytes", "1000"])
  (error,) = _table(os.path.join(out, "errors"))
  assert error["stage"] == "read" and "--max_file_bytes" in error["error"]
