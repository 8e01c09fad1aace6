"""natvision-index and natvision-search on the tables of a real job.

The job (tests/conftest.py ``labelled_job``) embedded crops of six photos
with the tiny stand-ins.  Results are compared with a brute-force numpy
ranking of the same table; a ``--photo`` query goes through the job's own
read, decode, prepare and model code and must find the photo's own row.
"""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import copy_session_onnx_files
from natvision.tools import search

MODEL = "inaturalist_v2"


@pytest.fixture(scope="module")
def out(labelled_job, tmp_path_factory):
  """A copy of the job's output, so that indexes and edits stay here."""
  copy = str(tmp_path_factory.mktemp("search") / "out")
  shutil.copytree(labelled_job["out"], copy)
  return copy


def _table(out_dir, model=MODEL):
  folder = os.path.join(out_dir, "embeddings", model)
  return pa.concat_tables([pq.read_table(os.path.join(folder, f))
                           for f in sorted(os.listdir(folder))
                           if f.endswith(".parquet")])


def _brute_force(table, vector, k):
  x = np.array(table.column("embedding").to_pylist(), np.float64)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  q = np.asarray(vector, np.float64) / np.linalg.norm(vector)
  scores = x @ q
  order = np.argsort(-scores, kind="stable")[:k]
  ids = table.column("image_id").to_pylist()
  return [ids[i] for i in order], scores[order]


def _json_lines(text):
  return [json.loads(line) for line in text.strip().splitlines()]


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


def test_search_by_image_id_returns_itself_first_then_brute_force_order(
    out, capsys):
  table = _table(out)
  target = "s2c1"
  vector = table.column("embedding")[
      table.column("image_id").to_pylist().index(target)].as_py()
  want_ids, want_scores = _brute_force(table, vector, 6)
  assert search.main(["--output_dir", out, "--model", MODEL, "--image_id",
                      target, "--k", "6", "--json"]) == 0
  rows = _json_lines(capsys.readouterr().out)
  assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert rows[0]["image_id"] == target
  assert rows[0]["score"] == pytest.approx(1.0, abs=1e-5)
  assert [r["image_id"] for r in rows] == want_ids
  np.testing.assert_allclose([r["score"] for r in rows], want_scores,
                             atol=1e-5)
  # Carried columns come with each row, and the crops of the same source
  # photo are the nearest (the stand-ins tell photos apart).
  assert {"uri", "species", "site", "taxon_id"} <= set(rows[0])
  assert all(r["image_id"].startswith("s2") for r in rows[1:4])


def test_text_output_is_a_table_best_first(out, capsys):
  assert search.main(["--output_dir", out, "--model", MODEL, "--image_id",
                      "s0c0", "--k", "3"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].split()[:4] == ["rank", "image_id", "uri", "score"]
  assert len(lines) == 4
  assert lines[1].split()[1] == "s0c0"
  scores = [float(line.split()[3]) for line in lines[1:]]
  assert scores == sorted(scores, reverse=True)


def test_search_by_photo_embeds_it_as_the_job_did(out, labelled_job, capsys):
  row = next(r for r in labelled_job["photos"].rows if r["image_id"] == "s3c2")
  assert search.main(["--output_dir", out, "--model", MODEL, "--photo",
                      row["uri"], "--k", "3", "--json"]) == 0
  rows = _json_lines(capsys.readouterr().out)
  assert rows[0]["image_id"] == "s3c2"
  # The same pixels through the same code: the very same embedding.
  assert rows[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_search_by_a_new_crop_finds_its_source(out, labelled_job, tmp_path,
                                               capsys):
  from tests.conftest import real_photo_paths  # pylint: disable=import-outside-toplevel
  photo = Image.open(real_photo_paths()[1]).convert("RGB")
  w, h = photo.size
  path = tmp_path / "new crop.png"
  photo.crop((w // 10, h // 5, w * 8 // 10, h * 9 // 10)).save(path)
  assert search.main(["--output_dir", out, "--model", "inception_resnet_v2",
                      "--photo", str(path), "--k", "3", "--json",
                      "--model_root", labelled_job["models"]]) == 0
  rows = _json_lines(capsys.readouterr().out)
  assert [r["image_id"][:2] for r in rows] == ["s1"] * 3
  assert rows[0]["score"] < 0.9999  # not a copy of any row


def test_unreadable_photo_and_classifier_tables_are_refused(out, tmp_path,
                                                           capsys):
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not a photo")
  assert search.main(["--output_dir", out, "--model", MODEL, "--photo",
                      str(bad)]) == 2
  assert "decode failed" in capsys.readouterr().err
  assert search.main(["--output_dir", out, "--model", "fungi_mobile_v1",
                      "--image_id", "s0c0"]) == 2
  assert "is a classifier" in capsys.readouterr().err
  assert search.main(["--output_dir", out, "--model", MODEL, "--image_id",
                      "nope"]) == 2
  assert "no row with image_id 'nope'" in capsys.readouterr().err


def test_duplicates_are_the_pairs_above_the_threshold(out, capsys):
  table = _table(out)
  x = np.array(table.column("embedding").to_pylist(), np.float64)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  sim = x @ x.T
  ids = table.column("image_id").to_pylist()
  threshold = float(np.quantile(sim[np.triu_indices(len(x), 1)], 0.9))
  want = sorted(((float(sim[i, j]), ids[i], ids[j])
                 for i in range(len(x)) for j in range(i + 1, len(x))
                 if sim[i, j] >= threshold), key=lambda p: -p[0])
  assert search.main(["--output_dir", out, "--model", MODEL, "--duplicates",
                      "--threshold", str(threshold), "--json"]) == 0
  got = _json_lines(capsys.readouterr().out)
  assert len(got) == len(want) > 5
  assert [(g["image_id_a"], g["image_id_b"]) for g in got] == [
      (a, b) for _, a, b in want]
  np.testing.assert_allclose([g["score"] for g in got],
                             [s for s, _, _ in want], atol=1e-5)


def test_an_index_of_other_files_is_refused(out, capsys):
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
  meta = search.build_index(str(tmp_path), MODEL, exact_below=n * d - 1)
  assert meta["kind"] == "approximate"
  assert meta["factory"].startswith("IVF") and meta["nprobe"] >= 1
  assert meta["recall_at_10"] >= search.TARGET_RECALL
  # Measured again here, on other queries: about what was recorded.
  searcher = search.open_searcher(str(tmp_path), MODEL)
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


# --------------------------------------------------------------------------
# A query photo is embedded as the table's recorded run spec says.


def _rows_by_uri(out_dir, model=MODEL):
  return {r["uri"]: np.asarray(r["embedding"], np.float64)
          for r in _table(out_dir, model).to_pylist()}


def _spec_of(out_dir, model=MODEL):
  return search.table_spec(search.open_searcher(out_dir, model).table)


def test_a_photo_embeds_as_its_fp32_row_within_the_recorded_tolerance(out):
  from natvision.transforms import runtimes  # pylint: disable=import-outside-toplevel
  decided = _spec_of(out).model(MODEL)
  assert (decided.runtime, decided.precision) == ("tf", "fp32")
  table = search.open_searcher(out, MODEL).table
  rows = _rows_by_uri(out)
  for uri in sorted(rows)[:4]:
    query = search.embed_photo(uri, table)
    # The job ran the photo in a batch of 8, the query alone: the kernels'
    # sums may round differently, by at most the runtime's tolerance,
    # which the table's spec records (runtimes.TOLERANCES of the kind).
    diff = runtimes.output_difference(query[None], rows[uri][None])
    assert diff <= decided.tolerance, (uri, diff)


@pytest.fixture(scope="module")
def int8_out(tiny_models, photo_dir, tmp_path_factory):
  """An int8 embeddings table, with an ONNX cache of its own (so that the
  int8 file, which lives in it, can be taken away here)."""
  from natvision.pipelines import embed_images  # pylint: disable=import-outside-toplevel
  from natvision.transforms import runtimes  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("int8")
  cache = copy_session_onnx_files(root / "onnx_cache")
  saved = os.environ["NATVISION_ONNX_CACHE"]
  os.environ["NATVISION_ONNX_CACHE"] = str(cache)
  out = str(root / "out")
  try:
    embed_images.run([
        "--input", str(photo_dir / "*"), "--output_dir", out,
        "--models", MODEL, "--model_root", tiny_models,
        "--precision", "int8", "--min_agreement", "0",
        "--calibration_photos", "3", "--agreement_photos", "4",
        "--runtime", "onnx", "--batch_size", "4"])
    runtimes.forget()  # the search opens the file afresh
    yield out
  finally:
    runtimes.forget()
    os.environ["NATVISION_ONNX_CACHE"] = saved


def test_a_photo_embeds_as_its_int8_row_within_the_recorded_tolerance(
    int8_out):
  from natvision.transforms import runtimes  # pylint: disable=import-outside-toplevel
  decided = _spec_of(int8_out).model(MODEL)
  assert decided.precision == "int8" and os.path.exists(decided.int8_file)
  table = search.open_searcher(int8_out, MODEL).table
  rows = _rows_by_uri(int8_out)
  assert len(rows) >= 6
  fp32_far = 0
  for uri in sorted(rows):
    query = search.embed_photo(uri, table)
    # The same int8 file on the same photo, in a batch of 1 instead of 4:
    # within the tolerance the spec records.
    diff = runtimes.output_difference(query[None], rows[uri][None])
    assert diff <= decided.tolerance, (uri, diff)
    # What search made before it read the spec: the fp32 model's embedding.
    fp32 = search.embed_photo(uri, table, runtime="onnx")
    fp32_far += runtimes.output_difference(
        fp32[None], rows[uri][None]) > 10 * decided.tolerance
  # fp32 is not the table's embedding (so this test tells the two apart).
  assert fp32_far == len(rows)


def test_a_missing_or_other_int8_file_is_refused_naming_it(int8_out,
                                                          tmp_path):
  from natvision.transforms import runtimes  # pylint: disable=import-outside-toplevel
  # As a fresh natvision-search process: no int8 session held from the
  # test before, which would be taken over without opening the file.
  runtimes.forget()
  decided = _spec_of(int8_out).model(MODEL)
  table = search.open_searcher(int8_out, MODEL).table
  uri = sorted(_rows_by_uri(int8_out))[0]
  moved = str(tmp_path / "moved.onnx")
  shutil.move(decided.int8_file, moved)
  try:
    with pytest.raises(search.SearchError) as missing:
      search.embed_photo(uri, table)
    assert decided.int8_file in str(missing.value)
    assert "made in int8" in str(missing.value)
    # Another file in its place (the fp32 one): not the file recorded.
    fp32_file = next(os.path.join(os.path.dirname(decided.int8_file), n)
                     for n in os.listdir(os.path.dirname(decided.int8_file))
                     if n.startswith(MODEL) and not n.endswith(".int8.onnx"))
    shutil.copy(fp32_file, decided.int8_file)
    with pytest.raises(search.SearchError, match="not the int8 file") as other:
      search.embed_photo(uri, table)
    assert decided.int8_file in str(other.value)
  finally:
    shutil.move(moved, decided.int8_file)
    runtimes.forget()


def test_other_model_files_and_tables_without_a_spec_are_refused(
    out, labelled_job, tmp_path):
  from natvision.transforms import sinks  # pylint: disable=import-outside-toplevel
  table = search.open_searcher(out, MODEL).table
  uri = sorted(_rows_by_uri(out))[0]
  other = os.path.join(labelled_job["models"], "inception_resnet_v2")
  with pytest.raises(search.SearchError, match="not those that made"):
    search.embed_photo(uri, table, handles={MODEL: other})
  # A table an older natvision wrote: the same rows, no spec.
  old = tmp_path / "old"
  folder = old / "embeddings" / MODEL
  folder.mkdir(parents=True)
  rows = _table(out)
  meta = json.loads(rows.schema.metadata[sinks.METADATA_KEY])
  del meta["spec"]
  pq.write_table(rows.replace_schema_metadata(
      {sinks.METADATA_KEY: json.dumps(meta)}), folder / "part-0.parquet")
  old_table = search.open_searcher(str(old), MODEL).table
  with pytest.raises(search.SearchError, match="records no run spec"):
    search.embed_photo(uri, old_table)
