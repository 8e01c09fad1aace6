"""pipelines/build_prior.py (natvision-prior): counts against a direct count."""

import collections

import h3
import numpy as np
import pyarrow.parquet as pq
import pytest

from natvision.pipelines import build_prior
from natvision.transforms import prior
from natvision.transforms.config import ConfigError

from tests.test_prior_counts import GBIF_HEADER, INAT_HEADER

PLACES = [(55.68, 12.57), (59.33, 18.06), (55.70, 12.60), (-33.9, 151.2)]


def _observations(rng, n):
  """Rows of an iNaturalist observations table: (lat, lon, taxon, grade),
  some without a place, a taxon or research grade."""
  rows = []
  for i in range(n):
    lat, lon = PLACES[rng.integers(len(PLACES))]
    lat, lon = lat + rng.uniform(-0.05, 0.05), lon + rng.uniform(-0.05, 0.05)
    taxon = str(int(rng.choice([47170, 48250, 55555])))
    grade = "research" if rng.random() < 0.8 else "needs_id"
    if i % 17 == 0:
      lat = ""
    if i % 23 == 0:
      taxon = ""
    rows.append((lat, lon, taxon, grade))
  return rows


def _direct(rows, resolution):
  counted, skipped = collections.Counter(), collections.Counter()
  for lat, lon, taxon, grade in rows:
    if grade != "research":
      skipped["quality_grade"] += 1
    elif not taxon:
      skipped["no_taxon"] += 1
    elif lat == "":
      skipped["no_coordinates"] += 1
    else:
      counted[(int(taxon), h3.latlng_to_cell(lat, lon, resolution))] += 1
  return counted, skipped


def test_counts_equal_a_direct_count(tmp_path):
  rng = np.random.default_rng(7)
  rows = _observations(rng, 300)
  lines = [f"u{i}\t1\t{lat}\t{lon}\t10\t{taxon}\t{grade}\t2024-05-01"
           for i, (lat, lon, taxon, grade) in enumerate(rows)]
  root = tmp_path / "snapshot"
  root.mkdir()
  (root / "observations.csv").write_text(
      "\n".join([INAT_HEADER] + lines) + "\n")
  out = str(tmp_path / "prior.parquet")
  meta = build_prior.run(["--observations", str(root), "--output", out,
                          "--resolution", "5"])
  counted, skipped = _direct(rows, 5)
  table = pq.read_table(out)
  got = {(t, c): n for t, c, n in zip(*(table.column(k).to_pylist()
                                        for k in prior.COLUMNS))}
  assert got == dict(counted)
  assert meta["resolution"] == 5 and meta["source"] == "inaturalist"
  assert meta["observations"] == sum(counted.values())
  assert meta["read"] == len(rows)
  assert {k: v for k, v in meta["skipped"].items() if v} == dict(skipped)
  assert meta["taxa"] == len({t for t, _ in counted})
  assert meta["cells"] == len({c for _, c in counted})
  # The table is one natvision-embed --prior reads.
  assert prior.settings_for(out).resolution == 5


def test_gbif_occurrences_by_species_key(tmp_path):
  lines = ["1\t55.68\t12.57\t111\t100\tPRESENT",
           "2\t55.68\t12.57\t100\t100\tPRESENT",   # species, subspecies
           "3\t55.68\t12.57\t100\t100\tABSENT",
           "4\t59.33\t18.06\t200\t200\tPRESENT"]
  (tmp_path / "occurrence.txt").write_text(
      "\n".join([GBIF_HEADER] + lines) + "\n")
  out = str(tmp_path / "gbif.parquet")
  meta = build_prior.run(["--observations", str(tmp_path), "--output", out,
                          "--taxon_column", "speciesKey"])
  cph = h3.latlng_to_cell(55.68, 12.57, prior.DEFAULT_RESOLUTION)
  sto = h3.latlng_to_cell(59.33, 18.06, prior.DEFAULT_RESOLUTION)
  table = pq.read_table(out).to_pylist()
  assert table == [{"taxon_id": 100, "h3_cell": cph, "n": 2},
                   {"taxon_id": 200, "h3_cell": sto, "n": 1}]
  assert meta["source"] == "gbif" and meta["skipped"]["absent"] == 1
  assert meta["taxon_column"] == "speciesKey"


def test_bad_flags_are_config_errors(tmp_path, capsys):
  for argv, match in ((["--output", "x.parquet"], "--observations"),
                      (["--observations", "x"], "--output"),
                      (["--observations", "x", "--output", "y",
                        "--resolution", "16"], "--resolution"),
                      (["--observations", "x", "--output", "y",
                        "--quality_grade", ","], "--quality_grade")):
    with pytest.raises(ConfigError, match=match):
      build_prior.parse_args(argv)
  assert build_prior.main(["--observations", str(tmp_path / "none"),
                           "--output", str(tmp_path / "p.parquet")]) == 2
  assert "no iNaturalist observations table" in capsys.readouterr().err


@pytest.mark.parametrize("member", ["occurrence.txt", "0012345.csv"])
def test_a_zipped_gbif_download_is_read_in_place(tmp_path, member):
  """The zip GBIF sends (a Darwin Core download's occurrence.txt, or a
  simple download's one tab-separated .csv) counts as the same rows
  unzipped do, without being unpacked first."""
  import zipfile  # pylint: disable=import-outside-toplevel
  lines = ["1\t55.68\t12.57\t111\t100\tPRESENT",
           "2\t55.68\t12.57\t100\t100\tPRESENT",
           "3\t55.68\t12.57\t100\t100\tABSENT",
           "4\t59.33\t18.06\t200\t200\tPRESENT",
           "5\t\t\t200\t200\tPRESENT"]
  text = "\r\n".join([GBIF_HEADER] + lines) + "\r\n"
  (tmp_path / "plain").mkdir()
  (tmp_path / "plain" / "occurrence.txt").write_text(text)
  archive = tmp_path / "0012345-240101120000000.zip"
  with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("meta.xml", "<archive/>")
    z.writestr(member, text)
    z.writestr("multimedia.txt", "gbifID\tidentifier\n")
  metas = {}
  for name, source in (("zip", archive), ("plain", tmp_path / "plain")):
    out = str(tmp_path / f"{name}.parquet")
    metas[name] = build_prior.run(["--observations", str(source),
                                   "--output", out,
                                   "--taxon_column", "speciesKey"])
  assert (pq.read_table(str(tmp_path / "zip.parquet")).to_pylist()
          == pq.read_table(str(tmp_path / "plain.parquet")).to_pylist())
  assert metas["zip"]["observations"] == 3
  skipped = metas["zip"]["skipped"]
  assert skipped == metas["plain"]["skipped"]
  assert {k: v for k, v in skipped.items() if v} == {"absent": 1,
                                                     "no_coordinates": 1}


def test_a_zip_without_occurrences_is_refused_before_the_job(tmp_path):
  import zipfile  # pylint: disable=import-outside-toplevel
  archive = tmp_path / "photos.zip"
  with zipfile.ZipFile(archive, "w") as z:
    z.writestr("multimedia.txt", "gbifID\tidentifier\n")
    z.writestr("meta.xml", "<archive/>")
  with pytest.raises(ConfigError, match="holds no occurrence.txt"):
    build_prior.run(["--observations", str(archive), "--output",
                     str(tmp_path / "p.parquet")])
  (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
  with pytest.raises(ConfigError, match="not a zip file"):
    build_prior.run(["--observations", str(tmp_path / "broken.zip"),
                     "--output", str(tmp_path / "p.parquet")])


def test_a_launch_that_does_not_wait_reports_the_state_not_a_missing_table(
    tmp_path, monkeypatch, capsys):
  """A Flex Template launch (deploy/) returns before the job runs: the
  table is written by the job's last step later, so the launcher must not
  read it back (it used to fail there)."""
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.runners.runner import PipelineState  # pylint: disable=import-outside-toplevel

  class Pending:
    def wait_until_finish(self):
      return PipelineState.RUNNING

  monkeypatch.setattr(beam.Pipeline, "run", lambda self, *a, **k: Pending())
  (tmp_path / "occurrence.txt").write_text(GBIF_HEADER + "\n")
  out = str(tmp_path / "later.parquet")
  argv = ["--observations", str(tmp_path), "--output", out]
  assert build_prior.main(argv) == 0
  assert f"it writes {out} when it ends" in capsys.readouterr().out
