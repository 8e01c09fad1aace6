"""Sources: globs and manifests become one ImageRef per distinct photo."""

import gzip
import itertools
import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from natvision.transforms import sources
from natvision.transforms.records import ImageRef


def _write(path, text, gz=False):
  data = text.encode()
  if gz:
    data = gzip.compress(data)
  path.write_bytes(data)
  return str(path)


def test_image_id_is_stable_and_distinct():
  a = sources.image_id_for_uri("gs://b/x.jpg")
  assert a == sources.image_id_for_uri("gs://b/x.jpg")
  assert a != sources.image_id_for_uri("gs://b/y.jpg")
  assert len(a) == 20


@pytest.mark.parametrize("name,fmt", [
    ("m.csv", "csv"), ("m.TSV", "tsv"), ("m.jsonl", "jsonl"),
    ("m.parquet", "parquet"), ("m.csv.gz", "csv"), ("photos/*.jpg", None),
])
def test_manifest_format(name, fmt):
  assert sources.manifest_format(name) == fmt


def test_missing_uri_column_names_file_and_column(tmp_path):
  path = _write(tmp_path / "m.csv", "path,site\na.jpg,1\n")
  with pytest.raises(sources.InputError) as e:
    sources.read_manifest_header(path)
  assert "m.csv" in str(e.value) and "'uri'" in str(e.value)


def test_reserved_column_is_refused(tmp_path):
  path = _write(tmp_path / "m.csv", "uri,label\na.jpg,x\n")
  with pytest.raises(sources.InputError, match="label"):
    sources.read_manifest_header(path)


def test_missing_manifest_fails(tmp_path):
  with pytest.raises(sources.InputError, match="does not exist"):
    sources.read_manifest_header(str(tmp_path / "nope.csv"))


def _rows(path):
  manifest = sources.read_manifest_header(path)
  return manifest, [sources.ref_from_row(r, manifest)
                    for r in sources.iter_manifest_rows(manifest)]


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


def test_pipeline_dedups_manifest_rows(tmp_path):
  path = _write(tmp_path / "m.csv",
                "uri,image_id\na.jpg,1\na2.jpg,1\nb.jpg,2\nb.jpg,\nb.jpg,\n")
  manifest = sources.read_manifest_header(path)
  with TestPipeline() as p:
    refs = p | sources.ReadImageRefs(manifest=manifest)
    ids = refs | beam.Map(lambda r: (r.image_id, r.uri))
    assert_that(ids, equal_to([
        ("1", "a.jpg"), ("2", "b.jpg"),
        (sources.image_id_for_uri("b.jpg"), "b.jpg")]))


def test_pipeline_globs_match_each_file_once(tmp_path):
  for name in ("a.jpg", "b.png", "c.txt"):
    (tmp_path / name).write_bytes(b"x")
  patterns = [str(tmp_path / "*.jpg"), str(tmp_path / "*"),]
  # a.jpg matches both patterns: three files, counted as they are read.
  assert sources.count_pattern_matches(patterns) == sources.InputCount(3)
  with TestPipeline() as p:
    uris = (p | sources.ReadImageRefs(patterns=patterns)
            | beam.Map(lambda r: r.uri.rsplit("/", 1)[-1]))
    assert_that(uris, equal_to(["a.jpg", "b.png", "c.txt"]))


def test_overlapping_patterns_count_each_file_once(tmp_path):
  for name in ("a1.jpg", "a2.jpg", "b.jpg", "a.txt"):
    (tmp_path / name).write_bytes(b"x")
  patterns = [str(tmp_path / "*.jpg"), str(tmp_path / "a*")]
  assert sources.count_pattern_matches(patterns) == sources.InputCount(4)
  assert sources.count_pattern_matches(
      patterns + patterns[:1]) == sources.InputCount(4)


def _ref(uri, image_id="same", path=None, **extra):
  return ImageRef(image_id=image_id, uri=uri, extra=tuple(extra.items()),
                  path=path)


def test_duplicates_pick_by_uri_then_carried_values_in_any_order():
  refs = [
      _ref("b.jpg", site=None, n=1),
      _ref("a.jpg", site="north", n=10),
      _ref("a.jpg", site="north", n=9),   # "10" < "9" as text
      _ref("a.jpg", site=None, n=99),     # None before any text
      _ref("a.jpg", site="", n=5),
  ]
  chosen = {sources._first_of_duplicates(("same", order))
            for order in itertools.permutations(refs)}
  assert chosen == {_ref("a.jpg", site=None, n=99)}
  # Without the missing value: the empty text, then text order.
  rest = [r for r in refs if r != _ref("a.jpg", site=None, n=99)]
  assert {sources._first_of_duplicates(("same", order))
          for order in itertools.permutations(rest)} == {
              _ref("a.jpg", site="", n=5)}
  assert min(rest[1:3], key=sources.duplicate_order) == rest[1]


def test_duplicates_differing_only_in_path_pick_the_one_without():
  plain = _ref("caf%E9.jpg")
  escaped = _ref("caf%E9.jpg", path="caf\udce9.jpg")
  for refs in ([plain, escaped], [escaped, plain]):
    assert sources._first_of_duplicates(("same", refs)) == plain


def test_pipeline_dedup_does_not_depend_on_row_order(tmp_path):
  rows = ["a.jpg,1,north", "a.jpg,1,", "a2.jpg,1,east", "a.jpg,1,south"]
  for i, order in enumerate((rows, rows[::-1])):
    path = _write(tmp_path / f"m{i}.csv",
                  "uri,image_id,site\n" + "\n".join(order) + "\n")
    manifest = sources.read_manifest_header(path)
    with TestPipeline() as p:
      refs = p | sources.ReadImageRefs(manifest=manifest)
      # The empty site is None, which sorts before any text.
      assert_that(refs | beam.Map(lambda r: (r.image_id, r.uri, r.extra)),
                  equal_to([("1", "a.jpg", (("site", None),))]))


def test_pattern_matching_nothing_names_it(tmp_path):
  with pytest.raises(sources.InputError, match="nothing.jpg"):
    sources.count_pattern_matches([str(tmp_path / "nothing.jpg")])


def test_sample_photo_ids_do_not_depend_on_the_folder(tmp_path):
  names = ["a.jpg", "b.png"]
  for place in ("venv_one/sample_photos", "elsewhere/x/sample_photos"):
    folder = tmp_path / place
    folder.mkdir(parents=True)
    for name in names:
      (folder / name).write_bytes(b"not read here")
    with TestPipeline() as p:
      refs = p | sources.ReadImageRefs(patterns=[str(folder / "*")],
                                       ids_relative_to=str(folder))
      # The id hashes the name relative to the folder, nothing else.
      assert_that(refs | beam.Map(lambda r: (r.image_id, r.uri)), equal_to(
          [(sources.image_id_for_uri(n), str(folder / n)) for n in names]))
  # User inputs keep ids of the whole URI.
  folder = tmp_path / "venv_one/sample_photos"
  with TestPipeline() as p:
    refs = p | sources.ReadImageRefs(patterns=[str(folder / "*")])
    assert_that(refs | beam.Map(lambda r: r.image_id), equal_to(
        [sources.image_id_for_uri(str(folder / n)) for n in names]))
  assert sources.image_id_relative_to("/else/a.jpg", str(folder)) == (
      sources.image_id_for_uri("/else/a.jpg"))
  assert sources.image_id_for_uri("a.jpg") != sources.image_id_for_uri(
      str(folder / "a.jpg"))


def test_the_count_stops_at_its_bound_and_says_so(tmp_path):
  (tmp_path / "sub").mkdir()
  for i in range(5):
    (tmp_path / f"a{i}.jpg").write_bytes(b"")
  (tmp_path / "sub" / "b.jpg").write_bytes(b"")
  one = [str(tmp_path / "*.jpg")]
  assert sources.count_pattern_matches(one, limit=5) == sources.InputCount(5)
  over = sources.count_pattern_matches(one, limit=4)
  assert over == sources.InputCount(4, at_least=True)
  assert over.expected_total is None
  # "**" enters sub-folders; "*" does not (Beam's pattern syntax).
  deep = [str(tmp_path / "**.jpg")]
  assert sources.count_pattern_matches(deep) == sources.InputCount(6)
  # Files counted under an earlier pattern do not use up the bound.
  both = one + deep
  assert sources.count_pattern_matches(both, limit=6) == sources.InputCount(6)
  with TestPipeline() as p:
    names = (p | sources.ReadImageRefs(patterns=both)
             | beam.Map(lambda r: r.uri[len(str(tmp_path)) + 1:]))
    assert_that(names, equal_to(
        [f"a{i}.jpg" for i in range(5)] + ["sub/b.jpg"]))
