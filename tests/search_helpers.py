"""The job output the search tests query, shared by test_search.py,
test_index.py and test_query.py."""

import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

MODEL = "inaturalist_v2"


@pytest.fixture(scope="module")
def out(labelled_job, tmp_path_factory):
  """A copy of the job's output, so that indexes and edits stay here."""
  copy = str(tmp_path_factory.mktemp("search") / "out")
  shutil.copytree(labelled_job["out"], copy)
  return copy


def read_table(out_dir, model=MODEL):
  folder = os.path.join(out_dir, "embeddings", model)
  return pa.concat_tables([pq.read_table(os.path.join(folder, f))
                           for f in sorted(os.listdir(folder))
                           if f.endswith(".parquet")])
