"""transforms/dwca_files.py: every data line of an archive accounted for.

Archives are written by the tests (tests/dwca_helpers.py) with short lines,
other line endings than declared, several ``<location>`` files and bytes
invalid in the declared encoding; whole ``natvision-embed`` runs read them,
photos served by the loopback HTTP server.
"""
# pylint: disable=redefined-outer-name

import os
import zipfile

import pytest

from natvision.pipelines import embed_images
from tests.dwca_helpers import (  # noqa: F401  (server: a fixture)
    EMB, MEDIA_TERMS, SMALL_CORE, archive_meta as _archive_meta,
    folder as _folder, lines_of as _lines_of, part as _part, run_job as _run,
    server)
from natvision.transforms import dwca
from natvision.transforms import dwca_files
from natvision.transforms import run_summary


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
      embed_images.JOB.summary(run_summary.RunSummary.from_dict(report)))


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
  with pytest.raises(dwca_files.ArchiveEncodingError, match=r"line 201 \(byte"):
    dwca.open_archive(folder)
  monkeypatch.setattr(dwca_files, "CHECK_BYTES", 4096)
  monkeypatch.setattr(dwca_files, "_CHUNK", 1024)
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
