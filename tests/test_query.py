"""tools/query.py: a query photo embedded as the table's run spec says.

The query's vector must equal the photo's own row within the tolerance the
spec records, for fp32 (TensorFlow) and int8 (the job's own file) tables;
other model files, a missing int8 file and tables without a spec are
refused, naming what is wrong.
"""

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import copy_session_onnx_files
from tests.search_helpers import MODEL, out, read_table as _table  # noqa: F401
from natvision.tools import index
from natvision.tools import query as query_lib


def _rows_by_uri(out_dir, model=MODEL):
  return {r["uri"]: np.asarray(r["embedding"], np.float64)
          for r in _table(out_dir, model).to_pylist()}


def _spec_of(out_dir, model=MODEL):
  return query_lib.table_spec(index.open_searcher(out_dir, model).table)


def test_a_photo_embeds_as_its_fp32_row_within_the_recorded_tolerance(out):
  from natvision.transforms import runtimes  # pylint: disable=import-outside-toplevel
  decided = _spec_of(out).model(MODEL)
  assert (decided.runtime, decided.precision) == ("tf", "fp32")
  table = index.open_searcher(out, MODEL).table
  rows = _rows_by_uri(out)
  for uri in sorted(rows)[:4]:
    query = query_lib.embed_photo(uri, table)
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
  table = index.open_searcher(int8_out, MODEL).table
  rows = _rows_by_uri(int8_out)
  assert len(rows) >= 6
  fp32_far = 0
  for uri in sorted(rows):
    query = query_lib.embed_photo(uri, table)
    # The same int8 file on the same photo, in a batch of 1 instead of 4:
    # within the tolerance the spec records.
    diff = runtimes.output_difference(query[None], rows[uri][None])
    assert diff <= decided.tolerance, (uri, diff)
    # What search made before it read the spec: the fp32 model's embedding.
    fp32 = query_lib.embed_photo(uri, table, runtime="onnx")
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
  table = index.open_searcher(int8_out, MODEL).table
  uri = sorted(_rows_by_uri(int8_out))[0]
  moved = str(tmp_path / "moved.onnx")
  shutil.move(decided.int8_file, moved)
  try:
    with pytest.raises(index.SearchError) as missing:
      query_lib.embed_photo(uri, table)
    assert decided.int8_file in str(missing.value)
    assert "made in int8" in str(missing.value)
    # Another file in its place (the fp32 one): not the file recorded.
    fp32_file = next(os.path.join(os.path.dirname(decided.int8_file), n)
                     for n in os.listdir(os.path.dirname(decided.int8_file))
                     if n.startswith(MODEL) and n.endswith(".onnx")
                     and not n.endswith(".int8.onnx"))
    shutil.copy(fp32_file, decided.int8_file)
    with pytest.raises(index.SearchError, match="not the int8 file") as other:
      query_lib.embed_photo(uri, table)
    assert decided.int8_file in str(other.value)
  finally:
    shutil.move(moved, decided.int8_file)
    runtimes.forget()


def test_other_model_files_and_tables_without_a_spec_are_refused(
    out, labelled_job, tmp_path):
  from natvision.transforms import sinks  # pylint: disable=import-outside-toplevel
  table = index.open_searcher(out, MODEL).table
  uri = sorted(_rows_by_uri(out))[0]
  other = os.path.join(labelled_job["models"], "inception_resnet_v2")
  with pytest.raises(index.SearchError, match="not those that made"):
    query_lib.embed_photo(uri, table, handles={MODEL: other})
  # A table an older natvision wrote: the same rows, no spec.
  old = tmp_path / "old"
  folder = old / "embeddings" / MODEL
  folder.mkdir(parents=True)
  rows = _table(out)
  meta = json.loads(rows.schema.metadata[sinks.METADATA_KEY])
  del meta["spec"]
  pq.write_table(rows.replace_schema_metadata(
      {sinks.METADATA_KEY: json.dumps(meta)}), folder / "part-0.parquet")
  old_table = index.open_searcher(str(old), MODEL).table
  with pytest.raises(index.SearchError, match="records no run spec"):
    query_lib.embed_photo(uri, old_table)
