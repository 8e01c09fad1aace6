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

from pipelines import embed_images
from tests.conftest import real_photo_paths
from tests.http_server import PhotoServer
from transforms import dwca

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
