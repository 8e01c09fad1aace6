"""Darwin Core archives written by the tests, and the job that reads them.

Shared by tests/test_dwca.py (what an archive holds, which rows are photos)
and tests/test_dwca_files.py (how its data files are read): meta.xml and
data files built from term lists, a loopback photo server, and one
``natvision-embed`` run returning its tables and run.json.
"""
# pylint: disable=redefined-outer-name

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


def meta(core_file, core_terms, media_file, media_type, media_terms,
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


def tsv(terms, rows):
  lines = ["\t".join(dwca.short(t) for t in terms)]
  lines += ["\t".join(str(v) for v in row) for row in rows]
  return ("\n".join(lines) + "\n").encode()


def gbif_zip(path, core, media, extra=()):
  """A GBIF download's zip: meta.xml, occurrence.txt (``CORE_TERMS`` rows)
  and multimedia.txt (``MEDIA_TERMS`` rows), plus ``extra`` (name, bytes)
  members."""
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("meta.xml", meta("occurrence.txt", CORE_TERMS,
                                "multimedia.txt", GBIF + "Multimedia",
                                MEDIA_TERMS))
    z.writestr("occurrence.txt", tsv(CORE_TERMS, core))
    z.writestr("multimedia.txt", tsv(MEDIA_TERMS, media))
    for name, data in extra:
      z.writestr(name, data)
  return str(path)


@pytest.fixture(scope="module")
def server():
  paths = real_photo_paths()
  files = {f"/img/{i}": open(p, "rb").read() for i, p in enumerate(paths)}
  files["/img/page"] = b"<html><title>Record page</title></html>"
  with PhotoServer(files, hosts=("127.0.0.1", "127.0.0.2")) as s:
    s.plan("/img/page", *[("status", 200, {"Content-Type": "text/html"},
                           files["/img/page"])] * 10)
    yield s


def run_job(tmp_path, tiny_models, name, input_, *flags):
  out = str(tmp_path / name)
  report = embed_images.run(["--input", input_, "--output_dir", out,
                             "--model_root", tiny_models, "--models", EMB,
                             "--runtime", "tf", *flags])
  emb = pq.read_table(os.path.join(out, "embeddings", EMB)).to_pylist()
  errors = pq.read_table(os.path.join(out, "errors")).to_pylist()
  with open(os.path.join(out, "run.json")) as f:
    run_json = json.load(f)
  return report, emb, errors, run_json


def part(tag, files, terms, key, ending="\\n", encoding="UTF-8",
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


def archive_meta(core, media):
  return ('<?xml version="1.0" encoding="UTF-8"?>'
          '<archive xmlns="http://rs.tdwg.org/dwc/text/">'
          f'{core}{media}</archive>')


SMALL_CORE = [GBIF + "gbifID", DWC + "scientificName", DC + "rightsHolder"]


def lines_of(terms, rows, ending="\n"):
  """A data file's text: a header of short names, then ``rows`` (str
  lines, written as they are, or lists of fields joined by tabs)."""
  lines = ["\t".join(dwca.short(t) for t in terms)]
  lines += [r if isinstance(r, str) else "\t".join(str(v) for v in r)
            for r in rows]
  return ending.join(lines) + ending


def folder(tmp_path, name, meta_xml, files):
  """A folder archive ``tmp_path/name``: meta.xml and ``files``."""
  where = tmp_path / name
  where.mkdir()
  (where / "meta.xml").write_text(meta_xml)
  for file_name, data in files.items():
    (where / file_name).write_bytes(
        data if isinstance(data, bytes) else data.encode())
  return str(where)
