"""Darwin Core input: GBIF downloads (zip), IPT Audubon Core archives
(folder) and a bare multimedia.txt, written by the tests, photos served by
the loopback HTTP server; and the --license filter on them and manifests."""
# pylint: disable=redefined-outer-name

import csv
import zipfile

import pytest

from natvision.pipelines import embed_images
from tests.dwca_helpers import (  # noqa: F401  (server: a fixture)
    AC, CORE_TERMS, DC, DWC, EMB, GBIF, MEDIA_TERMS, SMALL_CORE,
    archive_meta as _archive_meta, folder as _folder, lines_of as _lines_of,
    gbif_zip, meta as _meta, part as _part, run_job as _run, tsv as _tsv,
    server)
from natvision.transforms import config as config_lib
from natvision.transforms import dwca
from natvision.transforms import run_summary


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
  return gbif_zip(path, core, media,
                  extra=[("verbatim.txt", b"not read\n")]), media


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
  with pytest.raises(config_lib.ConfigError, match="unknown licence name"):
    embed_images.parse_args(["--input", str(manifest), "--output_dir", "o",
                             "--model_root", tiny_models,
                             "--license", "cc-by-4.0"])


def test_license_needs_a_licence_column(tmp_path, tiny_models):
  manifest = tmp_path / "m.csv"
  manifest.write_text("uri\n/a.jpg\n")
  with pytest.raises(config_lib.ConfigError, match="no column named license"):
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
  assert "not fetched: 2 row(s) sounds" in embed_images.JOB.summary(
      run_summary.RunSummary.from_dict(report))


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
