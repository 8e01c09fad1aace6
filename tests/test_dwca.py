"""Darwin Core input: GBIF downloads (zip), IPT Audubon Core archives
(folder) and a bare multimedia.txt, written by the tests, photos served by
the loopback HTTP server; and the --license filter on them and manifests."""
# pylint: disable=redefined-outer-name

import csv
import json
import os
import zipfile

import pyarrow.parquet as pq
import pytest

from natvision.pipelines import embed_images
from tests.conftest import real_photo_paths
from tests.http_server import PhotoServer
from natvision.transforms import dwca

EMB = "inaturalist_v2"
DWC = "http://rs.tdwg.org/dwc/terms/"
DC = "http://purl.org/dc/terms/"
GBIF = "http://rs.gbif.org/terms/1.0/"
AC = "http://rs.tdwg.org/ac/terms/"

CORE_TERMS = [GBIF + "gbifID", DWC + "occurrenceID", DWC + "scientificName",
              GBIF + "taxonKey", DWC + "decimalLatitude",
              DWC + "decimalLongitude", DWC + "eventDate", DWC + "countryCode",
              DC + "license", DC + "rightsHolder", DWC + "locality"]
MEDIA_TERMS = [GBIF + "gbifID", DC + "type", DC + "format", DC + "identifier",
               DC + "references", DC + "creator", DC + "license",
               DC + "rightsHolder"]


def _meta(core_file, core_terms, media_file, media_type, media_terms,
          core_id=0):
  def fields(terms, skip):
    return "".join(f'<field index="{i}" term="{t}"/>'
                   for i, t in enumerate(terms) if i != skip)
  return (
      '<?xml version="1.0" encoding="UTF-8"?>'
      '<archive xmlns="http://rs.tdwg.org/dwc/text/" metadata="metadata.xml">'
      f'<core encoding="UTF-8" fieldsTerminatedBy="\\t" '
      f'linesTerminatedBy="\\n" fieldsEnclosedBy="" ignoreHeaderLines="1" '
      f'rowType="http://rs.tdwg.org/dwc/terms/Occurrence">'
      f'<files><location>{core_file}</location></files>'
      f'<id index="{core_id}"/>{fields(core_terms, -1)}</core>'
      f'<extension encoding="UTF-8" fieldsTerminatedBy="\\t" '
      f'linesTerminatedBy="\\n" fieldsEnclosedBy="" ignoreHeaderLines="1" '
      f'rowType="{media_type}"><files><location>{media_file}</location>'
      f'</files><coreid index="0"/>{fields(media_terms, -1)}</extension>'
      '</archive>')


def _tsv(terms, rows):
  lines = ["\t".join(dwca.short(t) for t in terms)]
  lines += ["\t".join(str(v) for v in row) for row in rows]
  return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def server():
  paths = real_photo_paths()
  files = {f"/img/{i}": open(p, "rb").read() for i, p in enumerate(paths)}
  files["/img/page"] = b"<html><title>Record page</title></html>"
  with PhotoServer(files, hosts=("127.0.0.1", "127.0.0.2")) as s:
    s.plan("/img/page", *[("status", 200, {"Content-Type": "text/html"},
                           files["/img/page"])] * 10)
    yield s


def _gbif_zip(path, server):
  u = server.url
  core = [
      [101, "urn:occ:1", "Amanita muscaria (L.) Lam.", 5248, 55.1, 12.5,
       "2023-09-01", "DK", "CC0_1_0", "Ann", "Forest"],
      [102, "urn:occ:2", "Corvus corax L.", 2482468, 60.2, 24.9,
       "2023-10-02", "FI", "CC_BY_4_0", "Bo", "Shore"],
  ]
  media = [
      [101, "StillImage", "image/jpeg", u("/img/0", 0), "", "Ann",
       "http://creativecommons.org/publicdomain/zero/1.0/", "Ann"],
      [101, "Sound", "audio/mpeg", u("/img/1", 0), "", "Ann",
       "http://creativecommons.org/publicdomain/zero/1.0/", "Ann"],
      [101, "StillImage", "", u("/img/1", 1), "", "Ann",
       "© all rights reserved", "Ann"],
      # The format says HTML; the server sends a JPEG: processed.
      [102, "StillImage", "text/html", u("/img/4", 1), "", "Bo",
       "https://creativecommons.org/licenses/by-nc/4.0/", "Bo"],
      [102, "StillImage", "image/jpeg", u("/img/page", 0), "", "Bo",
       "CC BY-NC 4.0", "Bo"],
      # No core record 999 in occurrence.txt: still processed.
      [999, "StillImage", "image/png", u("/img/2", 0), "", "Cy",
       "http://creativecommons.org/licenses/by/4.0/", "Cy"],
      [102, "MovingImage", "video/mp4", u("/img/3", 0), "", "Bo", "", ""],
  ]
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("meta.xml", _meta("occurrence.txt", CORE_TERMS,
                                 "multimedia.txt", GBIF + "Multimedia",
                                 MEDIA_TERMS))
    z.writestr("occurrence.txt", _tsv(CORE_TERMS, core))
    z.writestr("multimedia.txt", _tsv(MEDIA_TERMS, media))
    z.writestr("verbatim.txt", b"not read\n")
  return str(path), media


def _run(tmp_path, tiny_models, name, input_, *flags):
  out = str(tmp_path / name)
  report = embed_images.run(["--input", input_, "--output_dir", out,
                             "--model_root", tiny_models, "--models", EMB,
                             "--runtime", "tf", *flags])
  emb = pq.read_table(os.path.join(out, "embeddings", EMB)).to_pylist()
  errors = pq.read_table(os.path.join(out, "errors")).to_pylist()
  with open(os.path.join(out, "run.json")) as f:
    run_json = json.load(f)
  return report, emb, errors, run_json


def test_gbif_download_zip(tmp_path, tiny_models, server):
  archive, media = _gbif_zip(tmp_path / "0012345-230224.zip", server)
  _, emb, errors, run_json = _run(tmp_path, tiny_models, "all", archive)
  by_uri = {r["uri"]: r for r in emb}
  still = [m for m in media if m[1] == "StillImage"]
  assert sorted(by_uri) == sorted(m[3] for m in still
                                  if not m[3].endswith("/img/page"))
  agaric = by_uri[media[0][3]]
  assert agaric["scientificName"] == "Amanita muscaria (L.) Lam."
  assert agaric["gbifID"] == "101" and agaric["countryCode"] == "DK"
  assert agaric["decimalLatitude"] == "55.1"
  assert agaric["license"] == media[0][6]
  assert agaric["occurrence_license"] == "CC0_1_0"
  assert agaric["occurrence_rightsHolder"] == "Ann"
  assert agaric["format"] == "image/jpeg" and agaric["creator"] == "Ann"
  orphan = by_uri[media[5][3]]
  assert orphan["gbifID"] == "999" and orphan["scientificName"] is None
  assert [(e["uri"], e["stage"]) for e in errors] == [(media[4][3], "read")]
  assert "text/html page titled 'Record page'" in errors[0]["error"]
  assert errors[0]["scientificName"] == "Corvus corax L."
  assert (run_json["skipped_sound"], run_json["skipped_video"]) == (1, 1)
  assert run_json["skipped_bad_lines"] == 0 and run_json["bad_lines"] == []
  assert run_json["filtered_by_license"] == 0 and run_json["inputs"] == 5
  assert server.requests["/img/3"] == 0  # the video row is never fetched
  ids = {r["uri"]: r["image_id"] for r in emb}
  assert len(set(ids.values())) == len(ids)
  assert ids[media[0][3]] == dwca.image_id("101", media[0][3])

  # --license: each name means exactly that licence; others never fetched.
  before = dict(server.requests)
  _, emb2, errors2, run2 = _run(tmp_path, tiny_models, "cc", archive,
                                "--license", "cc0,cc-by")
  assert sorted(r["uri"] for r in emb2) == sorted([media[0][3], media[5][3]])
  assert errors2 == [] and run2["filtered_by_license"] == 3
  assert (run2["skipped_sound"], run2["skipped_video"]) == (1, 1)
  for m in (media[2], media[3], media[4]):
    path = "/" + m[3].split("/", 3)[3]
    assert server.requests[path] == before.get(path, 0), path
  assert {r["uri"]: r["image_id"] for r in emb2}[media[0][3]] == (
      ids[media[0][3]])


def test_audubon_core_folder_and_bare_multimedia(tmp_path, tiny_models,
                                                 server):
  folder = tmp_path / "ipt"
  folder.mkdir()
  core_terms = [DWC + "occurrenceID", DWC + "scientificName",
                DWC + "eventDate"]
  media_terms = [DWC + "occurrenceID", "http://purl.org/dc/elements/1.1/type",
                 DC + "identifier", AC + "accessURI", DC + "format",
                 "http://ns.adobe.com/xap/1.0/rights/UsageTerms"]
  (folder / "meta.xml").write_text(_meta(
      "occurrence.txt", core_terms, "multimedia.txt", AC + "Multimedia",
      media_terms))
  (folder / "occurrence.txt").write_bytes(_tsv(core_terms, [
      ["occ-a", "Bellis perennis", "2022-05-01"]]))
  media = [
      ["occ-a", "http://purl.org/dc/dcmitype/StillImage",
       "0b9c1d2e-7e0f-4a51-9d6b-3f2a9a1c0001", server.url("/img/5"),
       "image/png", "CC BY 4.0"],
      ["occ-a", "Sound", "0b9c1d2e-7e0f-4a51-9d6b-3f2a9a1c0002",
       server.url("/img/1"), "audio/wav", "CC BY 4.0"],
  ]
  (folder / "multimedia.txt").write_bytes(_tsv(media_terms, media))
  _, emb, errors, run_json = _run(tmp_path, tiny_models, "ac", str(folder))
  assert [(r["uri"], r["scientificName"], r["identifier"], r["UsageTerms"])
          for r in emb] == [(media[0][3], "Bellis perennis", media[0][2],
                             "CC BY 4.0")]
  assert errors == [] and run_json["skipped_sound"] == 1

  bare = tmp_path / "download" / "multimedia.txt"
  bare.parent.mkdir()
  bare.write_bytes(_tsv(MEDIA_TERMS, [
      [7, "StillImage", "image/jpeg", server.url("/img/0"), "", "Di",
       "CC_BY_NC_4_0", "Di"],
      [8, "StillImage", "image/jpeg", server.url("/img/0"), "", "Di",
       "CC_BY_NC_4_0", "Di"],
      [8, "Sound", "", server.url("/img/1"), "", "", "", ""]]))
  _, emb, _, run_json = _run(tmp_path, tiny_models, "bare", str(bare),
                             "--license", "cc-by-nc")
  assert sorted((r["gbifID"], r["license"]) for r in emb) == [
      ("7", "CC_BY_NC_4_0"), ("8", "CC_BY_NC_4_0")]
  assert len({r["image_id"] for r in emb}) == 2
  assert run_json["skipped_sound"] == 1


def test_license_filter_on_a_manifest(tmp_path, tiny_models, server):
  manifest = tmp_path / "m.csv"
  with open(manifest, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["uri", "License"])
    w.writerow([server.url("/img/0"), "cc-by-sa"])
    w.writerow([server.url("/img/1"), "CC-BY"])
    w.writerow([server.url("/img/2"), "photo by me, ask first"])
  _, emb, _, run_json = _run(tmp_path, tiny_models, "m", str(manifest),
                             "--license", "cc-by")
  assert [r["uri"] for r in emb] == [server.url("/img/1")]
  assert run_json["filtered_by_license"] == 2
  with pytest.raises(embed_images.FlagError, match="unknown licence name"):
    embed_images.parse_args(["--input", str(manifest), "--output_dir", "o",
                             "--model_root", tiny_models,
                             "--license", "cc-by-4.0"])


def test_license_needs_a_licence_column(tmp_path, tiny_models):
  manifest = tmp_path / "m.csv"
  manifest.write_text("uri\n/a.jpg\n")
  with pytest.raises(embed_images.FlagError, match="no column named license"):
    embed_images.run(["--input", str(manifest), "--output_dir",
                      str(tmp_path / "o"), "--model_root", tiny_models,
                      "--models", EMB, "--runtime", "tf", "--license", "cc0"])


def test_archive_without_multimedia_is_refused(tmp_path):
  path = tmp_path / "occ_only.zip"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("meta.xml", _meta("occurrence.txt", CORE_TERMS, "x.txt",
                                 GBIF + "VernacularName", MEDIA_TERMS))
  with pytest.raises(Exception, match="has no multimedia extension"):
    dwca.open_archive(str(path))


# Issue 16, part 1: every data line accounted for, and nothing silent.

def _part(tag, files, terms, key, ending="\\n", encoding="UTF-8",
          row_type=GBIF + "Multimedia"):
  """One <core> or <extension> of meta.xml, with every file in ``files``."""
  locations = "".join(f"<location>{f}</location>" for f in files)
  key_tag = "id" if tag == "core" else "coreid"
  row_type = DWC + "Occurrence" if tag == "core" else row_type
  fields = "".join(f'<field index="{i}" term="{t}"/>'
                   for i, t in enumerate(terms))
  return (f'<{tag} encoding="{encoding}" fieldsTerminatedBy="\\t" '
          f'linesTerminatedBy="{ending}" fieldsEnclosedBy="" '
          f'ignoreHeaderLines="1" rowType="{row_type}">'
          f'<files>{locations}</files><{key_tag} index="{key}"/>{fields}'
          f'</{tag}>')


def _archive_meta(core, media):
  return ('<?xml version="1.0" encoding="UTF-8"?>'
          '<archive xmlns="http://rs.tdwg.org/dwc/text/">'
          f'{core}{media}</archive>')


SMALL_CORE = [GBIF + "gbifID", DWC + "scientificName", DC + "rightsHolder"]


def _lines_of(terms, rows, ending="\n"):
  """A data file's text: a header of short names, then ``rows`` (str
  lines, written as they are, or lists of fields joined by tabs)."""
  lines = ["\t".join(dwca.short(t) for t in terms)]
  lines += [r if isinstance(r, str) else "\t".join(str(v) for v in r)
            for r in rows]
  return ending.join(lines) + ending


def _folder(tmp_path, name, meta, files):
  folder = tmp_path / name
  folder.mkdir()
  (folder / "meta.xml").write_text(meta)
  for file_name, data in files.items():
    (folder / file_name).write_bytes(
        data if isinstance(data, bytes) else data.encode())
  return str(folder)


def test_unreadable_lines_are_counted_and_named(tmp_path, tiny_models,
                                                 server):
  # Main: InvalidArchive "non-existent field", the whole job fails.
  u = server.url
  media = [
      [1, "StillImage", "image/jpeg", u("/img/0"), "", "Ann", "CC0", "Ann"],
      # An unquoted free-text creator holding a line break: two short lines.
      "1\tStillImage\timage/jpeg\t" + u("/img/1") + "\t\tAnn\nand Bo\tCC0\tAnn",
      [2, "StillImage", "image/jpeg", u("/img/2"), "", "Cy", "CC0", "Cy"],
      [2, "StillImage", "image/jpeg", u("/img/3"), "", "Cy", "CC0", "Cy",
       "one field too many"],
      "",  # an empty line: not a record
  ]
  text = _lines_of(MEDIA_TERMS, media)
  text += "2\tStillImage\timage/jpeg\t" + u("/img/4")  # cut short, no ending
  core = _lines_of(SMALL_CORE, [[1, "Bellis perennis", "Ann"], "2",
                                [2, "Corvus corax", "Cy"]])
  archive = tmp_path / "cut.zip"
  with zipfile.ZipFile(archive, "w") as z:
    z.writestr("meta.xml", _archive_meta(
        _part("core", ["occurrence.txt"], SMALL_CORE, 0),
        _part("extension", ["multimedia.txt"], MEDIA_TERMS, 0)))
    z.writestr("occurrence.txt", core)
    z.writestr("multimedia.txt", text)
  before = dict(server.requests)
  _, emb, errors, run_json = _run(tmp_path, tiny_models, "cut", str(archive))
  assert sorted((r["uri"], r["scientificName"]) for r in emb) == [
      (u("/img/0"), "Bellis perennis"), (u("/img/2"), "Corvus corax")]
  assert errors == []
  assert run_json["inputs"] == 2 and run_json["skipped_bad_lines"] == 5
  assert run_json["bad_lines"] == [
      "multimedia.txt:3: 6 field(s), but meta.xml needs 8 (it names column 7)",
      "multimedia.txt:4: 3 field(s), but meta.xml needs 8 (it names column 7)",
      "multimedia.txt:6: 9 field(s), but the header has 8",
      "multimedia.txt:8: 4 field(s), but meta.xml needs 8 (it names column 7)",
      "occurrence.txt:3: 1 field(s), but meta.xml needs 3 (it names column 2)",
  ]
  for path in ("/img/1", "/img/3", "/img/4"):
    assert server.requests[path] == before.get(path, 0), path


def test_bare_multimedia_with_a_short_line(tmp_path, tiny_models, server):
  # Main: InvalidArchive, the whole job fails.
  bare = tmp_path / "dl" / "multimedia.txt"
  bare.parent.mkdir()
  bare.write_text(_lines_of(MEDIA_TERMS, [
      [7, "StillImage", "image/jpeg", server.url("/img/5"), "", "Di", "CC0",
       "Di"],
      "8\tStillImage"]))
  _, emb, _, run_json = _run(tmp_path, tiny_models, "bare", str(bare))
  assert [(r["gbifID"], r["uri"]) for r in emb] == [
      ("7", server.url("/img/5"))]
  assert run_json["skipped_bad_lines"] == 1
  assert run_json["bad_lines"] == [
      "multimedia.txt:3: 2 field(s), but meta.xml needs 8 (it names column 7)"]


def test_declared_line_ending_differs_from_the_written_one(
    tmp_path, tiny_models, server):
  # Main: each file is one header line, "0 photo(s)", exit 0, no warning.
  u = server.url
  meta = _archive_meta(
      _part("core", ["occurrence.txt"], SMALL_CORE, 0, ending="\\r\\n"),
      _part("extension", ["multimedia.txt"], MEDIA_TERMS, 0,
            ending="\\r\\n"))
  folder = _folder(tmp_path, "lf", meta, {
      "occurrence.txt": _lines_of(SMALL_CORE, [[1, "Bellis perennis", "A"],
                                               [2, "Corvus corax", "B"]],
                                  ending="\r"),
      "multimedia.txt": _lines_of(MEDIA_TERMS, [
          [1, "StillImage", "image/jpeg", u("/img/0"), "", "A", "CC0", "A"],
          [2, "StillImage", "image/jpeg", u("/img/2"), "", "B", "CC0", "B"]],
                                  ending="\n")})
  report, emb, _, run_json = _run(tmp_path, tiny_models, "lf", folder)
  assert sorted((r["uri"], r["scientificName"]) for r in emb) == [
      (u("/img/0"), "Bellis perennis"), (u("/img/2"), "Corvus corax")]
  assert run_json["warnings"] == [
      'occurrence.txt: meta.xml declares linesTerminatedBy "\\r\\n" but its '
      'lines end with "\\r"; read as written',
      'multimedia.txt: meta.xml declares linesTerminatedBy "\\r\\n" but its '
      'lines end with "\\n"; read as written']
  assert "warning: multimedia.txt: meta.xml declares" in (
      embed_images.JOB.summary(report))


def test_every_location_is_read(tmp_path, tiny_models, server):
  # Main: only occurrence_1.txt and multimedia_1.txt are read.
  u = server.url
  meta = _archive_meta(
      _part("core", ["occurrence_1.txt", "occurrence_2.txt"], SMALL_CORE, 0),
      _part("extension", ["multimedia_1.txt", "multimedia_2.txt"],
            MEDIA_TERMS, 0))
  row = lambda key, path: [key, "StillImage", "image/jpeg", u(path), "", "A",
                           "CC0", "A"]
  folder = _folder(tmp_path, "split", meta, {
      "occurrence_1.txt": _lines_of(SMALL_CORE, [[1, "Bellis perennis", "A"]]),
      "occurrence_2.txt": _lines_of(SMALL_CORE, [[2, "Corvus corax", "B"]]),
      "multimedia_1.txt": _lines_of(MEDIA_TERMS, [row(1, "/img/0"),
                                                  row(2, "/img/1")]),
      "multimedia_2.txt": _lines_of(MEDIA_TERMS, [row(1, "/img/2"),
                                                  row(2, "/img/3")])})
  _, emb, errors, run_json = _run(tmp_path, tiny_models, "split", folder)
  assert sorted((r["uri"], r["scientificName"]) for r in emb) == [
      (u("/img/0"), "Bellis perennis"), (u("/img/1"), "Corvus corax"),
      (u("/img/2"), "Bellis perennis"), (u("/img/3"), "Corvus corax")]
  assert errors == [] and run_json["inputs"] == 4


def test_bytes_invalid_in_the_declared_encoding_are_refused(
    tmp_path, tiny_models, server, capsys):
  # Main: "Jos\ufffd" in every table, exit 0, no warning.
  u = server.url
  meta = _archive_meta(
      _part("core", ["occurrence.txt"], SMALL_CORE, 0),
      _part("extension", ["multimedia.txt"], MEDIA_TERMS, 0))
  media = _lines_of(MEDIA_TERMS, [
      [1, "StillImage", "image/jpeg", u("/img/0"), "", "José", "CC-BY",
       "José"]]).encode("cp1252")
  folder = _folder(tmp_path, "cp1252", meta, {
      "occurrence.txt": _lines_of(SMALL_CORE, [[1, "Bellis perennis", "A"]]),
      "multimedia.txt": media})
  out = str(tmp_path / "refused")
  flags = ["--input", folder, "--output_dir", out, "--model_root",
           tiny_models, "--models", EMB, "--runtime", "tf"]
  assert embed_images.main(flags) == 2
  err = capsys.readouterr().err
  offset = media.index("é".encode("cp1252"))
  assert (f"multimedia.txt line 2 (byte {offset}): bytes "
          "b'\\xe9' are not valid UTF-8") in err, err
  assert "--archive_encoding" in err
  assert not os.path.exists(os.path.join(out, "run.json"))
  _, emb, _, _ = _run(tmp_path, tiny_models, "cp1252_ok", folder,
                      "--archive_encoding", "cp1252")
  assert [(r["creator"], r["rightsHolder"], r["scientificName"])
          for r in emb] == [("José", "José", "Bellis perennis")]


def test_photos_by_type_or_image_format(tmp_path, tiny_models, server):
  # Main: rows with an empty or swapped type are never fetched, and every
  # skip is one count, skipped_not_image.
  u = server.url
  media = [
      [1, "", "image/jpeg", u("/img/0"), "", "A", "CC0", "A"],  # photo
      [1, "image/png", "StillImage", u("/img/1"), "", "A", "CC0", "A"],
      [1, "http://purl.org/dc/dcmitype/StillImage", "", u("/img/2"), "", "A",
       "CC0", "A"],  # photo
      [1, "Still Image", "", u("/img/3"), "", "A", "CC0", "A"],  # photo
      [1, "", "audio/mpeg", u("/img/4"), "", "A", "CC0", "A"],  # sound
      [1, "http://purl.org/dc/dcmitype/Sound", "", u("/img/4"), "", "A",
       "CC0", "A"],  # sound
      [1, "", "video/mp4", u("/img/5"), "", "A", "CC0", "A"],  # video
      [1, "MovingImage", "", u("/img/5"), "", "A", "CC0", "A"],  # video
      [1, "", "", u("/img/5"), "", "A", "CC0", "A"],  # no image format
      [1, "", "application/pdf", u("/img/5"), "", "A", "CC0", "A"],
      [1, "Text", "text/plain", u("/img/5"), "", "A", "CC0", "A"],  # other
  ]
  meta = _archive_meta(
      _part("core", ["occurrence.txt"], SMALL_CORE, 0),
      _part("extension", ["multimedia.txt"], MEDIA_TERMS, 0))
  folder = _folder(tmp_path, "types", meta, {
      "occurrence.txt": _lines_of(SMALL_CORE, [[1, "Bellis perennis", "A"]]),
      "multimedia.txt": _lines_of(MEDIA_TERMS, media)})
  before = dict(server.requests)
  report, emb, _, run_json = _run(tmp_path, tiny_models, "types", folder)
  assert sorted(r["uri"] for r in emb) == [u(f"/img/{i}") for i in range(4)]
  assert {k: run_json.get(k) for k in (
      "skipped_sound", "skipped_video", "skipped_no_image_format",
      "skipped_other_type", "skipped_bad_lines")} == {
      "skipped_sound": 2, "skipped_video": 2, "skipped_no_image_format": 2,
      "skipped_other_type": 1, "skipped_bad_lines": 0}
  assert "skipped_not_image" not in run_json
  assert server.requests["/img/5"] == before.get("/img/5", 0)
  assert "not fetched: 2 row(s) sounds" in embed_images.JOB.summary(report)


@pytest.mark.parametrize("kind, fmt, expected", [
    ("StillImage", "text/html", None),
    ("stillimage", "", None),
    ("dcmitype:StillImage", "", None),
    ("http://purl.org/dc/dcmitype/StillImage/", "", None),
    ("", "IMAGE/JPEG", None),
    ("image/jpeg", "", None),
    ("", "StillImage", None),
    ("Sound", "image/jpeg", "skipped_sound"),
    ("audio/ogg", "", "skipped_sound"),
    ("MovingImage", "", "skipped_video"),
    ("", "video/mp4; codecs=avc1", "skipped_video"),
    ("", "", "skipped_no_image_format"),
    (None, None, "skipped_no_image_format"),
    ("InteractiveResource", "image/jpeg", "skipped_other_type"),
])
def test_photo_or_skip(kind, fmt, expected):
  assert dwca.photo_or_skip(kind, fmt) == expected


def test_the_launcher_checks_a_bounded_prefix_and_workers_the_rest(
    tmp_path, tiny_models, capsys, monkeypatch):
  """The launcher decodes the first CHECK_BYTES of a data file; a bad byte
  after them fails the job on the workers with the launcher's message."""
  rows = [[i, "StillImage", "image/jpeg", f"http://127.0.0.1:9/{i}.jpg", "",
           "Ann", "CC-BY", "Ann"] for i in range(1, 200)]
  rows.append([200, "StillImage", "image/jpeg", "http://127.0.0.1:9/200.jpg",
               "", "José", "CC-BY", "José"])
  media = _lines_of(MEDIA_TERMS, rows).encode("cp1252")
  offset = media.index("é".encode("cp1252"))
  folder = _folder(tmp_path, "late", _archive_meta(
      _part("core", ["occurrence.txt"], SMALL_CORE, 0),
      _part("extension", ["multimedia.txt"], MEDIA_TERMS, 0)), {
          "occurrence.txt": _lines_of(SMALL_CORE, [[1, "Bellis", "A"]]),
          "multimedia.txt": media})
  message = (f"multimedia.txt line 201 (byte {offset}): bytes b'\\xe9' are "
             "not valid UTF-8")
  # Checked whole (the default bound is far larger): refused at launch.
  with pytest.raises(dwca.ArchiveEncodingError, match=r"line 201 \(byte"):
    dwca.open_archive(folder)
  monkeypatch.setattr(dwca, "CHECK_BYTES", 4096)
  monkeypatch.setattr(dwca, "_CHUNK", 1024)
  assert offset > 4096 + 1024
  assert dwca.open_archive(folder).media is not None  # launch check passes
  out = str(tmp_path / "late_out")
  flags = ["--input", folder, "--output_dir", out, "--model_root",
           tiny_models, "--models", EMB, "--runtime", "tf"]
  status = embed_images.main(flags)
  err = capsys.readouterr().err
  assert status == 2, err
  assert message in err, err
  assert "--archive_encoding" in err
  assert not os.path.exists(os.path.join(out, "run.json"))
  assert not os.path.exists(os.path.join(out, "embeddings"))
