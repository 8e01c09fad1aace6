"""The fake GCS server: Beam's gs:// filesystem, google-cloud-storage, child
processes and DirectRunner file sinks all reach it, offline and without
credentials."""
# pylint: disable=redefined-outer-name

import io
import os
import subprocess
import sys
import textwrap

import apache_beam as beam
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io import parquetio
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from google.cloud import storage

# pylint: disable-next=unused-import
from tests.gcs_server import ENV_VARS, FakeGcsServer, gcs_server  # noqa: F401

BUCKET = "gs://natvision-test"


def _paths(pattern):
  """Sorted gs:// paths matching a Beam glob."""
  return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def _write(path, data):
  with FileSystems.create(path) as f:
    f.write(data)


def _read(path):
  with FileSystems.open(path) as f:
    return f.read()


def test_filesystems_create_read_match_rename_delete(gcs_server):
  data = bytes(range(256)) * 4000  # ~1 MB
  path = gcs_server.bucket_url + "/a/b.bin"
  _write(path, data)
  assert _read(path) == data
  assert FileSystems.exists(path)

  _write(BUCKET + "/a/sub/c.bin", b"c")
  assert _paths(BUCKET + "/a/*") == [path]  # "*" stops at "/"
  assert _paths(BUCKET + "/a/**") == [path, BUCKET + "/a/sub/c.bin"]
  assert _paths(BUCKET + "/a/**/*.bin") == [BUCKET + "/a/sub/c.bin"]
  meta = FileSystems.match([path])[0].metadata_list[0]
  assert meta.size_in_bytes == len(data)

  # No directories on GCS: mkdirs is a no-op and prefixes do not "exist".
  FileSystems.mkdirs(BUCKET + "/a/newdir")
  assert not FileSystems.exists(BUCKET + "/a/newdir")
  assert not FileSystems.exists(BUCKET + "/a/")

  # rename and delete go through the JSON batch endpoint.
  FileSystems.rename([path], [BUCKET + "/a/renamed.bin"])
  assert not FileSystems.exists(path)
  assert _read(BUCKET + "/a/renamed.bin") == data
  FileSystems.delete([BUCKET + "/a/renamed.bin"])
  assert not FileSystems.exists(BUCKET + "/a/renamed.bin")
  FileSystems.delete([BUCKET + "/a/"])  # trailing "/": recursive
  assert _paths(BUCKET + "/a/**") == []


def test_storage_client_sees_the_same_objects(gcs_server):
  _write(BUCKET + "/client/from_beam.txt", b"written by beam")
  bucket = gcs_server.client().bucket(gcs_server.bucket)
  assert bucket.blob("client/from_beam.txt").download_as_bytes() == (
      b"written by beam")

  # A default client finds the server through STORAGE_EMULATOR_HOST alone.
  default = storage.Client()
  default.bucket(gcs_server.bucket).blob("client/from_client.txt") \
      .upload_from_string(b"written by the client")
  assert _read(BUCKET + "/client/from_client.txt") == b"written by the client"
  names = [b.name for b in default.list_blobs(gcs_server.bucket,
                                              prefix="client/")]
  assert names == ["client/from_beam.txt", "client/from_client.txt"]


def test_child_process_uses_the_server_through_the_environment(gcs_server):
  _write(BUCKET + "/child/in.txt", b"from parent")
  code = textwrap.dedent("""
      from apache_beam.io.filesystems import FileSystems
      with FileSystems.open("gs://natvision-test/child/in.txt") as f:
        data = f.read()
      with FileSystems.create("gs://natvision-test/child/out.txt") as f:
        f.write(data.upper())
      print(data.decode())
  """)
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "from parent"
  assert _read(BUCKET + "/child/out.txt") == b"FROM PARENT"
  # The fake credentials file spares every process Beam's ~20 s retry loop
  # around google.auth.default().
  assert "default credentials" not in result.stderr, result.stderr


def test_direct_runner_write_to_text_and_match_files(gcs_server):
  with beam.Pipeline() as p:
    _ = (p | beam.Create(["a", "b", "c"])
         | beam.io.WriteToText(BUCKET + "/text/x", file_name_suffix=".txt",
                               num_shards=2))
  # The sink's commit renamed its temp files and deleted the temp dir.
  assert _paths(BUCKET + "/text/**") == [
      BUCKET + "/text/x-00000-of-00002.txt",
      BUCKET + "/text/x-00001-of-00002.txt"]

  with beam.Pipeline() as p:
    lines = (p | fileio.MatchFiles(BUCKET + "/text/*.txt")
             | fileio.ReadMatches()
             | beam.FlatMap(lambda f: f.read_utf8().split()))
    assert_that(lines, equal_to(["a", "b", "c"]))


def test_direct_runner_write_to_parquet_batched(gcs_server):
  table = pa.table({"id": [1, 2, 3], "name": ["x", "y", "z"]})
  with beam.Pipeline() as p:
    _ = (p | beam.Create([table])
         | parquetio.WriteToParquetBatched(
             BUCKET + "/parquet/part", schema=table.schema,
             file_name_suffix=".parquet"))
  paths = _paths(BUCKET + "/parquet/**")
  assert paths == [BUCKET + "/parquet/part-00000-of-00001.parquet"]
  assert pq.read_table(io.BytesIO(_read(paths[0]))).equals(table)

  # pyarrow's own GCS filesystem can read it too, given the endpoint.
  if not hasattr(pafs, "GcsFileSystem"):
    return  # this pyarrow build has no GCS support
  fs = pafs.GcsFileSystem(anonymous=True, scheme="http",
                          endpoint_override=gcs_server.url.split("://")[1])
  assert pq.read_table("natvision-test/parquet", filesystem=fs).equals(table)


def test_multi_processing_workers_reach_the_server(gcs_server):
  options = PipelineOptions(direct_running_mode="multi_processing",
                            direct_num_workers=2)
  with beam.Pipeline(options=options) as p:
    _ = (p | beam.Create(["m", "n"])
         | beam.Map(lambda x: "%s %d" % (x, os.getpid()))
         | beam.io.WriteToText(BUCKET + "/workers/x", num_shards=1))
  lines = _read(BUCKET + "/workers/x-00000-of-00001").decode().split("\n")
  rows = sorted(line.split() for line in lines if line)
  assert [name for name, _ in rows] == ["m", "n"]
  assert str(os.getpid()) not in {pid for _, pid in rows}


def test_upload_and_download_dir(gcs_server, tmp_path):
  src = tmp_path / "src"
  (src / "deep" / "er").mkdir(parents=True)
  (src / "top.txt").write_bytes(b"top")
  (src / "deep" / "er" / "leaf é.bin").write_bytes(b"\x00leaf")
  uploaded = gcs_server.upload_dir(str(src), BUCKET + "/tree/")
  assert uploaded == [BUCKET + "/tree/deep/er/leaf é.bin",
                      BUCKET + "/tree/top.txt"]
  downloaded = gcs_server.download_dir(BUCKET + "/tree", str(tmp_path / "dst"))
  assert [os.path.relpath(p, tmp_path / "dst") for p in downloaded] == [
      os.path.join("deep", "er", "leaf é.bin"), "top.txt"]
  assert (tmp_path / "dst" / "deep" / "er" / "leaf é.bin").read_bytes() == (
      b"\x00leaf")


def test_second_server_is_isolated_and_restores_environment(gcs_server):
  before = {k: os.environ.get(k) for k in gcs_server.env}
  assert before == gcs_server.env and set(ENV_VARS) <= set(before)
  with FakeGcsServer() as other:
    assert os.environ["STORAGE_EMULATOR_HOST"] == other.url != gcs_server.url
    assert other.create_bucket("other") == "gs://other"
    assert other.create_bucket("other") == "gs://other"  # idempotent
    _write("gs://other/x.txt", b"other")
    assert not FileSystems.exists(BUCKET + "/x.txt")
    assert [b.name for b in other.client().list_buckets()] == ["other"]
  assert not other.running
  assert {k: os.environ.get(k) for k in gcs_server.env} == before
  assert not FileSystems.exists("gs://other/x.txt")  # session server again
  assert "natvision-test" in [b.name for b in gcs_server.client()
                              .list_buckets()]
