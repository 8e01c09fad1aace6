"""Manifests: formats, the launcher's bounded check, the workers' check of
the rest, rows and refs."""

import gzip
import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from natvision.transforms import manifests
from natvision.transforms import sources


def _write(path, text, gz=False):
  data = text.encode()
  if gz:
    data = gzip.compress(data)
  path.write_bytes(data)
  return str(path)


@pytest.mark.parametrize("name,fmt", [
    ("m.csv", "csv"), ("m.TSV", "tsv"), ("m.jsonl", "jsonl"),
    ("m.parquet", "parquet"), ("m.csv.gz", "csv"), ("photos/*.jpg", None),
])
def test_manifest_format(name, fmt):
  assert manifests.manifest_format(name) == fmt


def test_missing_uri_column_names_file_and_column(tmp_path):
  path = _write(tmp_path / "m.csv", "path,site\na.jpg,1\n")
  with pytest.raises(manifests.InputError) as e:
    manifests.read_manifest_header(path)
  assert "m.csv" in str(e.value) and "'uri'" in str(e.value)


def test_reserved_column_is_refused(tmp_path):
  path = _write(tmp_path / "m.csv", "uri,label\na.jpg,x\n")
  with pytest.raises(manifests.InputError, match="label"):
    manifests.read_manifest_header(path)


def test_missing_manifest_fails(tmp_path):
  with pytest.raises(manifests.InputError, match="does not exist"):
    manifests.read_manifest_header(str(tmp_path / "nope.csv"))


def _rows(path):
  manifest = manifests.read_manifest_header(path)
  return manifest, [manifests.ref_from_row(r, manifest)
                    for r in manifests.iter_manifest_rows(manifest)]


def test_csv_with_quotes_and_ids(tmp_path):
  path = _write(tmp_path / "m.csv",
                'uri,image_id,site\n"a b,c.jpg",id1,"Øresund, DK"\nb.jpg,,north\n')
  manifest, refs = _rows(path)
  assert manifest.carried == (("site", pa.string()),)
  assert refs[0].uri == "a b,c.jpg" and refs[0].image_id == "id1"
  assert refs[0].extra == (("site", "Øresund, DK"),)
  assert refs[1].image_id == sources.image_id_for_uri("b.jpg")


def test_inaturalist_style_gzipped_tsv_is_unquoted(tmp_path):
  text = 'uri\tphoto_id\tnote\nx.jpg\t12\tsays "hi\n'
  path = _write(tmp_path / "m.tsv.gz", text, gz=True)
  _, refs = _rows(path)
  assert refs[0].extra == (("photo_id", "12"), ("note", 'says "hi'))


def test_jsonl_and_parquet_keep_columns(tmp_path):
  path = _write(tmp_path / "m.jsonl",
                json.dumps({"uri": "a.jpg", "n": 3, "tags": ["x"]}) + "\n\n")
  _, refs = _rows(path)
  assert refs[0].extra == (("n", "3"), ("tags", '["x"]'))
  table = pa.table({"uri": ["a.jpg", "b.jpg"], "lat": [1.5, None]})
  pq.write_table(table, tmp_path / "m.parquet")
  manifest, refs = _rows(str(tmp_path / "m.parquet"))
  assert manifest.row_count == 2
  assert manifest.carried == (("lat", pa.float64()),)
  assert [r.extra for r in refs] == [(("lat", 1.5),), (("lat", None),)]

def _csv(tmp_path, rows, bad_at=None, name="m.csv"):
  """A CSV of ``rows`` photos; row ``bad_at`` (from 1) has a field too many."""
  lines = ["uri,site"]
  for i in range(1, rows + 1):
    lines.append(f"http://127.0.0.1:1/p{i:07d}.jpg,s{i % 7}"
                 + (",extra" if i == bad_at else ""))
  return _write(tmp_path / name, "\n".join(lines) + "\n")


def test_a_short_manifest_is_counted_exactly(tmp_path, monkeypatch):
  monkeypatch.setattr(manifests, "CHECK_ROWS", 20)
  manifest = manifests.read_manifest_header(_csv(tmp_path, 20))
  assert manifest.row_count == 20 and manifest.estimated_rows is None
  assert manifest.checked_whole


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_the_launcher_checks_the_first_rows_and_estimates_the_rest(
    tmp_path, monkeypatch, fmt):
  monkeypatch.setattr(manifests, "CHECK_ROWS", 50)
  rows = 1000
  if fmt == "jsonl":
    text = "".join(json.dumps({"uri": f"p{i:05d}.jpg", "n": str(i % 9)}) + "\n"
                   for i in range(rows))
  else:
    sep = "," if fmt == "csv" else "\t"
    text = f"uri{sep}n\n" + "".join(f"p{i:05d}.jpg{sep}{i % 9}\n"
                                    for i in range(rows))
  manifest = manifests.read_manifest_header(_write(tmp_path / f"m.{fmt}",
                                                   text))
  assert manifest.row_count is None and not manifest.checked_whole
  # Every row has the same length but the first's few bytes: the
  # estimate is the true count within 5%.
  assert manifest.estimated_rows == pytest.approx(rows, rel=0.05)


def test_a_gzipped_manifest_is_estimated_too(tmp_path, monkeypatch):
  monkeypatch.setattr(manifests, "CHECK_ROWS", 500)
  rows = 20_000
  text = "uri,n\n" + "".join(f"p{i:06d}.jpg,{i % 9}\n" for i in range(rows))
  manifest = manifests.read_manifest_header(
      _write(tmp_path / "m.csv.gz", text, gz=True))
  assert manifest.row_count is None
  # The compressed stream is read a chunk at a time: an order of magnitude.
  assert rows / 10 < manifest.estimated_rows < rows * 10


def _read_in_graph(manifest):
  with TestPipeline() as p:
    _ = p | sources.ReadImageRefs(manifest=manifest) | beam.Map(lambda r: r)


def test_a_bad_row_past_the_checked_ones_fails_on_the_worker_alike(
    tmp_path, monkeypatch):
  path = _csv(tmp_path, 200, bad_at=150)
  with pytest.raises(manifests.InputError) as whole:
    manifests.read_manifest_header(path)  # CHECK_ROWS 10,000: all checked
  monkeypatch.setattr(manifests, "CHECK_ROWS", 100)
  manifest = manifests.read_manifest_header(path)  # rows 1-100 are fine
  with pytest.raises(Exception) as worker:
    _read_in_graph(manifest)
  assert "line 151: 3 field(s), but the header has 2" in str(whole.value)
  assert str(whole.value) in str(worker.value)


def test_bad_bytes_past_the_checked_rows_fail_on_the_worker_alike(
    tmp_path, monkeypatch):
  path = tmp_path / "m.csv"
  # Past the first chunk decoded (1 MiB): the launcher never sees it.
  path.write_bytes(b"uri,site\n" + b"a.jpg,x\n" * 200_000
                   + b"b.jpg,caf\xe9\n")
  monkeypatch.setattr(manifests, "CHECK_ROWS", 10**9)
  with pytest.raises(manifests.InputError) as whole:
    manifests.read_manifest_header(str(path))
  monkeypatch.setattr(manifests, "CHECK_ROWS", 10)
  manifest = manifests.read_manifest_header(str(path))
  with pytest.raises(Exception) as worker:
    _read_in_graph(manifest)
  assert "line 200002" in str(whole.value)
  assert str(whole.value) in str(worker.value)


def test_a_jsonl_key_first_seen_past_the_checked_rows_fails_the_job(
    tmp_path, monkeypatch):
  lines = [json.dumps({"uri": f"p{i}.jpg"}) for i in range(30)]
  lines.append(json.dumps({"uri": "late.jpg", "site": "north"}))
  path = _write(tmp_path / "m.jsonl", "\n".join(lines) + "\n")
  assert manifests.read_manifest_header(path).columns == ("uri", "site")
  monkeypatch.setattr(manifests, "CHECK_ROWS", 10)
  manifest = manifests.read_manifest_header(path)
  assert manifest.columns == ("uri",)
  with pytest.raises(Exception, match="key.s. site first appear"):
    _read_in_graph(manifest)


def test_the_scheme_sample_reads_the_uri_column_only(tmp_path):
  table = pa.table({"uri": [f"p{i}.jpg" for i in range(30)],
                    "note": ["x" * 100] * 30})
  pq.write_table(table, tmp_path / "m.parquet", row_group_size=10)
  manifest = manifests.read_manifest_header(str(tmp_path / "m.parquet"))
  assert manifests.sample_uris(manifest, limit=12) == [
      f"p{i}.jpg" for i in range(12)]
  rows = list(manifests.iter_manifest_rows(manifest, columns=["uri"]))
  assert rows[0] == {"uri": "p0.jpg"} and len(rows) == 30
