"""Inputs as users hand them over: odd manifests, odd file names, reruns.

Each test is one fault found by running the tool as a user would (issue
"Nothing lost", section "Inputs from the field"), with the right answer.
"""

import gzip
import hashlib
import io
import json
import os
import shutil

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from natvision.pipelines import embed_images
from natvision.transforms.config import ConfigError
from tests.conftest import real_photo_paths
from natvision.transforms import models as models_lib
from natvision.transforms import runtimes
from natvision.transforms import photos, progress, sinks, snapshots, sources, uris

LATIN1_NAME = b"caf\xe9.jpg"  # "café.jpg" saved by a Latin-1 system


def _make_latin1_file(folder, data: bytes) -> str:
  """Writes ``data`` under a file name that is not UTF-8; returns its str."""
  raw = os.path.join(os.fsencode(str(folder)), LATIN1_NAME)
  fd = os.open(raw, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
  try:
    os.write(fd, data)
  finally:
    os.close(fd)
  return os.fsdecode(raw)


def _table(directory) -> pa.Table:
  files = sorted(f for f in os.listdir(directory) if f.endswith(".parquet"))
  assert files, f"no Parquet files in {directory}"
  return pa.concat_tables(
      [pq.read_table(os.path.join(directory, f)) for f in files])


# --------------------------------------------------------------------------
# 1. JSONL manifests: keys that first appear after line 1.


def test_jsonl_columns_are_every_key_in_order_of_first_appearance(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text(
      json.dumps({"uri": "a.jpg"}) + "\n\n" +
      json.dumps({"uri": "b.jpg", "image_id": "p2", "site": "north"}) + "\n" +
      json.dumps({"note": "late", "uri": "c.jpg"}) + "\n")
  manifest = sources.read_manifest_header(str(path))
  assert manifest.columns == ("uri", "image_id", "site", "note")
  assert manifest.carried == (("site", pa.string()), ("note", pa.string()))
  assert manifest.row_count == 3
  refs = [sources.ref_from_row(r, manifest)
          for r in sources.iter_manifest_rows(manifest)]
  assert [r.image_id for r in refs] == [
      sources.image_id_for_uri("a.jpg"), "p2", sources.image_id_for_uri("c.jpg")]
  assert [r.extra for r in refs] == [
      (("site", None), ("note", None)),
      (("site", "north"), ("note", None)),
      (("site", None), ("note", "late"))]


def test_jsonl_bad_line_fails_at_launch_naming_it(tmp_path):
  path = tmp_path / "m.jsonl.gz"
  path.write_bytes(gzip.compress(b'{"uri": "a.jpg"}\n{"uri": "b.jpg"\n'))
  with pytest.raises(sources.InputError, match=r"m\.jsonl\.gz line 2"):
    sources.read_manifest_header(str(path))
  path.write_bytes(gzip.compress(b'{"uri": "a.jpg"}\n["b.jpg"]\n'))
  with pytest.raises(sources.InputError, match="line 2: each line must be"):
    sources.read_manifest_header(str(path))


# --------------------------------------------------------------------------
# 2. Manifest encodings.


def _accented_after_8k(fmt: str) -> bytes:
  """A manifest whose one accented row comes after the first 8 KB."""
  rows = [f"photos/p{i:05d}.jpg" for i in range(400)]
  if fmt == "jsonl":
    lines = [json.dumps({"uri": r, "observer": "Anna"}) for r in rows]
    lines.append(json.dumps({"uri": "photos/last.jpg", "observer": "Søren"},
                            ensure_ascii=False))
    text = "\n".join(lines) + "\n"
  else:
    sep = "\t" if fmt == "tsv" else ","
    lines = [f"uri{sep}observer"] + [f"{r}{sep}Anna" for r in rows]
    lines.append(f"photos/last.jpg{sep}Søren")
    text = "\r\n".join(lines) + "\r\n"
  data = text.encode("cp1252")
  assert data.index("ø".encode("cp1252")) > 8192
  return data


@pytest.mark.parametrize("name", ["m.csv", "m.tsv", "m.jsonl", "m.csv.gz",
                                  "m.tsv.gz", "m.jsonl.gz"])
def test_cp1252_manifest_fails_at_launch_or_decodes_with_the_flag(
    tmp_path, name):
  fmt = sources.manifest_format(name)
  data = _accented_after_8k(fmt)
  path = tmp_path / name
  path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
  bad_line = 401 if fmt == "jsonl" else 402  # after 400 rows (+ header)
  with pytest.raises(sources.InputError) as e:
    sources.read_manifest_header(str(path))
  message = str(e.value)
  assert str(path) in message and f"line {bad_line}:" in message
  assert "--manifest_encoding cp1252" in message

  manifest = sources.read_manifest_header(str(path), "windows-1252")
  assert manifest.encoding == "cp1252"
  rows = list(sources.iter_manifest_rows(manifest))
  assert len(rows) == 401
  assert rows[-1] == {"uri": "photos/last.jpg", "observer": "Søren"}
  assert rows[0] == {"uri": "photos/p00000.jpg", "observer": "Anna"}


def test_utf8_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
  path = tmp_path / "m.csv"
  path.write_bytes(b"\xef\xbb\xbfuri,site\na.jpg,S\xc3\xb8ren\n")
  manifest = sources.read_manifest_header(str(path))
  assert manifest.columns == ("uri", "site")
  assert list(sources.iter_manifest_rows(manifest)) == [
      {"uri": "a.jpg", "site": "Søren"}]


@pytest.mark.parametrize("name,text,line", [
    ("m.csv", 'uri,site\na.jpg,"two\nlines"\nb.jpg,x,y\n', 4),
    ("m.tsv", "uri\tsite\na.jpg\tx\n\nb.jpg\n", 4),
])
def test_ragged_rows_fail_at_launch_naming_the_line(tmp_path, name, text,
                                                     line):
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(sources.InputError, match=f"{name} line {line}:"):
    sources.read_manifest_header(str(path))


def test_csv_cells_with_line_breaks_are_one_row(tmp_path):
  path = tmp_path / "m.csv"
  path.write_text('uri,note\r\na.jpg,"two\r\nlines"\r\n\r\nb.jpg,x\r\n')
  manifest = sources.read_manifest_header(str(path))
  assert manifest.row_count == 2
  assert list(sources.iter_manifest_rows(manifest)) == [
      {"uri": "a.jpg", "note": "two\r\nlines"}, {"uri": "b.jpg", "note": "x"}]


def test_launcher_exits_2_naming_the_line_and_leaves_nothing(
    tmp_path, capsys):
  path = tmp_path / "m.csv"
  path.write_bytes(_accented_after_8k("csv"))
  out = tmp_path / "out"
  code = embed_images.main(["--input", str(path), "--output_dir", str(out),
                            "--models", "inaturalist_v2",
                            "--model_root", str(tmp_path / "models")])
  assert code == 2
  err = capsys.readouterr().err
  assert "m.csv line 402:" in err and "--manifest_encoding cp1252" in err
  assert not out.exists()  # no _staging/ left behind


def test_manifest_encoding_flag_reaches_the_manifest(tmp_path):
  path = tmp_path / "m.csv"
  path.write_bytes(_accented_after_8k("csv"))
  config, _ = embed_images.parse_args([
      "--input", str(path), "--output_dir", str(tmp_path / "out"),
      "--model_root", str(tmp_path / "models"), "--manifest_encoding",
      "cp1252"])
  manifest = embed_images.check_input(config).manifest
  assert manifest.encoding == "cp1252"
  assert list(sources.iter_manifest_rows(manifest))[-1]["observer"] == "Søren"
  with pytest.raises(ConfigError, match="klingon"):
    embed_images.parse_args(["--input", str(path), "--output_dir", "o",
                             "--model_root", str(tmp_path / "models"),
                             "--manifest_encoding", "klingon"])


# --------------------------------------------------------------------------
# 3. File names that are not UTF-8.


def test_readable_and_bytes_of_names_that_are_not_utf8():
  name = os.fsdecode(b"/p/caf\xe9.jpg")
  assert uris.uri_bytes(name) == b"/p/caf\xe9.jpg"
  assert uris.readable(name) == "/p/caf\\xe9.jpg"
  assert uris.readable("/p/café.jpg") == "/p/café.jpg"
  assert uris.readable("x\ud800") == "x\\xed\\xa0\\x80"  # lone, from JSON
  assert sources.image_id_for_uri(name) == hashlib.sha256(
      b"/p/caf\xe9.jpg").hexdigest()[:20]
  assert sources.image_id_for_uri("/p/café.jpg") != sources.image_id_for_uri(
      name)


def test_glob_yields_a_readable_ref_that_reads_the_real_file(tmp_path):
  real = _make_latin1_file(tmp_path, b"latin-1 bytes")
  with TestPipeline() as p:
    # The second pattern is itself not UTF-8; both match the one file.
    refs = p | sources.ReadImageRefs(patterns=[str(tmp_path / "*"), real])
    # (Beam's str coder refuses the surrogates of ``path``: compare bytes.)
    assert_that(refs | beam.Map(lambda r: (r.image_id, r.uri,
                                           uris.uri_bytes(r.location))),
                equal_to([(sources.image_id_for_uri(real),
                           str(tmp_path) + "/caf\\xe9.jpg",
                           os.fsencode(real))]))
  ref = sources.ref_for_uri(real)
  assert photos.read_bytes(ref.location, 100) == b"latin-1 bytes"


def test_missing_non_utf8_file_is_an_error_row_in_valid_text(tmp_path):
  ref = sources.ref_for_uri(os.fsdecode(
      os.path.join(os.fsencode(str(tmp_path)), b"gone\xe9.jpg")))
  config = photos.PhotoConfig(policies=("squash",), decode_threads=0)
  result, _ = photos.read_decode_prepare(ref, config, 299)
  assert result.stage == "read"
  assert "gone\\xe9.jpg" in result.error
  table = sinks.errors_to_table([result], sinks.errors_schema())
  assert table.column("uri").to_pylist() == [str(tmp_path) + "/gone\\xe9.jpg"]


def test_ingestion_template_with_non_utf8_bytes_keeps_a_readable_uri():
  template = snapshots.UriTemplate(os.fsdecode(b"/photos/caf\xe9/{photo_id}.jpg"))
  photo = snapshots.PhotoRow(17, "pu", "ou", "CC0", (("photo_id", "17"),))
  obs = snapshots.ObservationRow("ou", 3, "research", None, 1.0, 2.0)
  ref = snapshots.image_ref(photo, snapshots.RoutedObservation(obs, None),
                            template)
  assert ref.image_id == "17"
  assert ref.uri == "/photos/caf\\xe9/17.jpg"
  assert os.fsencode(ref.location) == b"/photos/caf\xe9/17.jpg"


@pytest.fixture(scope="module")
def latin1_photos(tmp_path_factory):
  """A folder with a photo under a Latin-1 name, its copy under a UTF-8
  name, and one more photo."""
  root = tmp_path_factory.mktemp("latin1")
  flower, chelsea = real_photo_paths()[0], real_photo_paths()[2]
  with open(flower, "rb") as f:
    latin1 = _make_latin1_file(root, f.read())
  shutil.copy(flower, root / "plain.jpg")
  shutil.copy(chelsea, root / "chelsea.png")
  return root, latin1


def _embed(inputs, out, tiny_models, *extra):
  return embed_images.run(
      ["--input", str(inputs), "--output_dir", str(out), "--models",
       "inaturalist_v2", "--model_root", tiny_models, "--runtime", "tf",
       "--batch_size", "2"] + list(extra))


def test_non_utf8_file_name_gets_an_embedding_row_with_a_stable_id(
    tiny_models, latin1_photos, tmp_path):
  root, latin1 = latin1_photos
  expected_id = hashlib.sha256(
      os.path.join(os.fsencode(str(root)), LATIN1_NAME)).hexdigest()[:20]
  shown = str(root) + "/caf\\xe9.jpg"
  for attempt in ("first", "second"):  # two runs in one process
    out = tmp_path / attempt
    report = _embed(root / "*", out, tiny_models)
    rows = {r["uri"]: r for r in _table(
        out / "embeddings" / "inaturalist_v2").to_pylist()}
    assert set(rows) == {shown, str(root / "plain.jpg"),
                         str(root / "chelsea.png")}
    assert rows[shown]["image_id"] == expected_id
    # The real bytes were read: the same photo under a UTF-8 name embeds
    # the same, within the tolerance of one runtime run on other batch
    # shapes (the two may land in different batches, and the kernels' sums
    # differ by batch shape and processor); another photo is far outside.
    same = runtimes.output_difference(
        np.array([rows[shown]["embedding"]]),
        np.array([rows[str(root / "plain.jpg")]["embedding"]]))
    other = runtimes.output_difference(
        np.array([rows[shown]["embedding"]]),
        np.array([rows[str(root / "chelsea.png")]["embedding"]]))
    tolerance = runtimes.TOLERANCES[models_lib.EMBEDDER]
    assert same <= tolerance < other / 100, (same, other)
    assert _table(out / "errors").num_rows == 0
    assert report["inputs"] == 3 and report["errors"]["total"] == 0
    # 10. Progress is counted per run, not summed over the process.
    bar = progress.for_run(report["run_id"])
    assert bar.whole_job and bar.done == 3
    assert bar.line().startswith("progress: 3 of 3 photos (100%)")


def test_jsonl_manifest_late_keys_and_latin1_name_reach_the_tables(
    tiny_models, latin1_photos, tmp_path):
  root, latin1 = latin1_photos
  manifest = tmp_path / "m.jsonl"
  # json.dumps writes the undecodable byte as the escape "\udce9".
  manifest.write_text(
      json.dumps({"uri": latin1}) + "\n" +
      json.dumps({"uri": str(root / "chelsea.png"), "image_id": "p2",
                  "site": "Øresund"}) + "\n")
  out = tmp_path / "out"
  _embed(manifest, out, tiny_models)
  table = _table(out / "embeddings" / "inaturalist_v2")
  names = table.column_names
  assert names[:3] == ["image_id", "uri", "model"] and names[-1] == "site"
  assert [c for c in names if c not in sources.RESERVED_COLUMNS] == ["site"]
  rows = sorted(table.select(["image_id", "uri", "site"]).to_pylist(),
                key=lambda r: r["uri"])
  assert rows == [
      {"image_id": sources.image_id_for_uri(latin1),
       "uri": str(root) + "/caf\\xe9.jpg", "site": None},
      {"image_id": "p2", "uri": str(root / "chelsea.png"), "site": "Øresund"},
  ]


# --------------------------------------------------------------------------
# 4. Column names that differ only by case.


def test_reserved_columns_are_every_output_column_of_every_table():
  names = set(sinks.errors_schema().names)
  for spec in models_lib.REGISTRY.values():
    model = models_lib.ResolvedModel(spec=spec, path="", resize=spec.resize)
    names |= set(sinks.schema_for(model).names)
  # With --taxa, the predictions' taxonomy columns are output columns too.
  assert set(sinks.TAXON_COLUMNS) <= sources.RESERVED_COLUMNS
  names |= set(sinks.TAXON_COLUMNS)
  assert sources.RESERVED_COLUMNS == names
  assert {"image_id", "uri", "model", "embedding", "label", "score",
          "top_k_scores", "stage", "error"} <= sources.RESERVED_COLUMNS


@pytest.mark.parametrize("header,named", [
    ("uri,Label", "Label (output column label)"),
    ("uri,MODEL", "MODEL (output column model)"),
    ("uri,Top_K_Scores", "Top_K_Scores (output column top_k_scores)"),
    ("uri,Image_ID", "Image_ID (output column image_id)"),
    ("uri,URI", "URI (output column uri)"),
    ("uri,site,Site", "site and Site"),
])
def test_case_insensitive_clash_fails_before_launch(tmp_path, header, named):
  path = tmp_path / "m.csv"
  path.write_text(header + "\n" + ",".join(["a.jpg"] * len(header.split(",")))
                  + "\n")
  with pytest.raises(sources.InputError) as e:
    sources.read_manifest_header(str(path))
  assert named in str(e.value) and "m.csv" in str(e.value)


def test_jsonl_keys_differing_by_case_across_lines_clash(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"uri": "a.jpg", "site": 1}\n{"uri": "b.jpg", "SITE": 2}\n')
  with pytest.raises(sources.InputError, match="site and SITE"):
    sources.read_manifest_header(str(path))


def test_columns_that_merely_resemble_output_columns_are_carried(tmp_path):
  path = tmp_path / "m.csv"
  path.write_text("uri,image_id,labels,model_name\na.jpg,1,x,y\n")
  manifest = sources.read_manifest_header(str(path))
  assert [c for c, _ in manifest.carried] == ["labels", "model_name"]


# --------------------------------------------------------------------------
# 9. Parquet headers: the footer only.


class _CountingFile:
  """Wraps a file object and counts the bytes read through it."""

  def __init__(self, f, reads):
    self._f = f
    self._reads = reads

  def read(self, size=-1):
    data = self._f.read(size)
    self._reads.append(len(data))
    return data

  def readinto(self, buffer):
    n = self._f.readinto(buffer)
    self._reads.append(n or 0)
    return n

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()

  def __getattr__(self, name):
    return getattr(self._f, name)


@pytest.fixture
def count_reads(monkeypatch):
  """Sizes of every read through FileSystems.open, in order."""
  reads = []
  real_open = FileSystems.open

  def counting_open(path, *args, **kwargs):
    return _CountingFile(real_open(path, *args, **kwargs), reads)

  monkeypatch.setattr(FileSystems, "open", counting_open)
  return reads


def _big_parquet(row_group_size=None) -> bytes:
  """About 8 MB of Parquet; one row group unless ``row_group_size``."""
  rng = np.random.default_rng(3)
  n = 120_000
  table = pa.table({
      "uri": [f"gs://b/photos/{i:08d}.jpg" for i in range(n)],
      "note": [rng.bytes(16).hex() for _ in range(n)],
      "lat": rng.random(n),
  })
  sink = io.BytesIO()
  pq.write_table(table, sink, row_group_size=row_group_size or n,
                 compression="none")
  return sink.getvalue()


def test_parquet_manifest_header_reads_the_footer_only(tmp_path, count_reads):
  data = _big_parquet()
  path = tmp_path / "m.parquet"
  path.write_bytes(data)
  manifest = sources.read_manifest_header(str(path))
  assert manifest.row_count == 120_000
  assert [c for c, _ in manifest.carried] == ["note", "lat"]
  assert 0 < sum(count_reads) < len(data) / 50


def test_parquet_manifest_rows_stream_one_row_group_at_a_time(
    tmp_path, count_reads):
  data = _big_parquet(row_group_size=30_000)
  path = tmp_path / "m.parquet"
  path.write_bytes(data)
  manifest = sources.read_manifest_header(str(path))
  count_reads.clear()
  uris_seen = [r["uri"] for r in sources.iter_manifest_rows(manifest)]
  assert uris_seen == [f"gs://b/photos/{i:08d}.jpg" for i in range(120_000)]
  assert max(count_reads) < len(data) / 3  # never the whole file at once


def test_snapshot_parquet_columns_read_the_footer_only(tmp_path, count_reads):
  data = _big_parquet()
  path = tmp_path / "photos.parquet"
  path.write_bytes(data)
  assert snapshots.read_columns(str(path), snapshots.PARQUET) == (
      "uri", "note", "lat")
  assert 0 < sum(count_reads) < len(data) / 50


def test_parquet_footer_only_on_gcs(gcs_server, monkeypatch):  # noqa: F811
  from google.cloud.storage import blob as blob_lib  # pylint: disable=import-outside-toplevel
  data = _big_parquet()
  manifest_path = gcs_server.bucket_url + "/field/m.parquet"
  snapshot_path = gcs_server.bucket_url + "/field/photos.parquet"
  for path in (manifest_path, snapshot_path):
    with FileSystems.create(path) as f:
      f.write(data)
  downloaded = []
  real_download = blob_lib.Blob.download_as_bytes

  def counting_download(self, *args, **kwargs):
    out = real_download(self, *args, **kwargs)
    downloaded.append(len(out))
    return out

  monkeypatch.setattr(blob_lib.Blob, "download_as_bytes", counting_download)
  manifest = sources.read_manifest_header(manifest_path)
  assert manifest.row_count == 120_000
  assert snapshots.read_columns(snapshot_path, snapshots.PARQUET) == (
      "uri", "note", "lat")
  assert 0 < sum(downloaded) < 2 * len(data) / 50


# --------------------------------------------------------------------------
# 10. Progress counters.


def test_progress_counts_each_run_from_zero():
  first = progress.start_run("run-1", 3)
  for _ in range(3):
    progress.for_run("run-1").tick()
  second = progress.start_run("run-2", 3)
  for _ in range(3):
    progress.for_run("run-2", 3).tick()
  assert first.done == 3 and second.done == 3
  assert second.line().startswith("progress: 3 of 3 photos (100%)")
  again = progress.start_run("run-1", 3)  # the same id launched anew
  assert again.done == 0


def test_worker_that_did_not_launch_the_run_reports_its_own_count():
  bar = progress.for_run("run-launched-elsewhere", 5000)
  assert not bar.whole_job
  bar.tick(2)
  line = bar.line()
  assert line.startswith("progress: this worker: 2 photos,")
  assert "5000" not in line and "%" not in line


def test_more_photos_than_expected_is_never_over_100_percent():
  bar = progress.Progress(emit=lambda line: None)
  bar.expected_total = 3
  bar.tick(4)
  assert bar.line().startswith("progress: 4 photos (3 expected)")


def test_two_pipelines_without_a_run_id_count_apart(tmp_path):
  photo = tmp_path / "a.jpg"
  shutil.copy(real_photo_paths()[0], photo)
  config = photos.PhotoConfig(policies=("squash",), size=32, decode_threads=0)
  keys = []
  for _ in range(2):
    fn = photos.ReadDecodePrepareFn(config)
    keys.append(fn._run_key)  # pylint: disable=protected-access
    with TestPipeline() as p:
      _ = (p | beam.Create([sources.ref_for_uri(str(photo))])
           | beam.ParDo(fn).with_outputs("errors", main="prepared"))
  assert keys[0] != keys[1]
  assert [progress.for_run(k).done for k in keys] == [1, 1]
