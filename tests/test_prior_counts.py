"""transforms/prior_counts.py: finding observations and keying their rows."""

import gzip

import h3
import pytest

from natvision.transforms import config
from natvision.transforms import prior_counts

RES = 4
INAT_HEADER = ("observation_uuid\tobserver_id\tlatitude\tlongitude\t"
               "positional_accuracy\ttaxon_id\tquality_grade\tobserved_on")
GBIF_HEADER = ("gbifID\tdecimalLatitude\tdecimalLongitude\ttaxonKey\t"
               "speciesKey\toccurrenceStatus")


def _inat(tmp_path, lines, name="observations.csv"):
  path = tmp_path / name
  text = "\n".join([INAT_HEADER] + lines) + "\n"
  if name.endswith(".gz"):
    path.write_bytes(gzip.compress(text.encode()))
  else:
    path.write_text(text)
  return str(tmp_path)


def test_a_snapshot_folder_is_read_as_inaturalist(tmp_path):
  root = _inat(tmp_path, [], "observations.csv.gz")
  obs = prior_counts.find_observations(root)
  assert obs.source == prior_counts.INATURALIST and obs.fmt == "tsv"
  assert obs.taxon_column == "taxon_id"
  assert obs.used_columns == ("latitude", "longitude", "taxon_id",
                              "quality_grade")


def test_a_gbif_folder_or_file_is_read_as_gbif(tmp_path):
  (tmp_path / "occurrence.txt").write_text(GBIF_HEADER + "\n")
  for path in (str(tmp_path), str(tmp_path / "occurrence.txt")):
    obs = prior_counts.find_observations(path, taxon_column="speciesKey")
    assert obs.source == prior_counts.GBIF
    assert obs.files == (str(tmp_path / "occurrence.txt"),)
    assert obs.used_columns == ("decimalLatitude", "decimalLongitude",
                                "speciesKey", "occurrenceStatus")


def test_missing_tables_and_columns_are_config_errors(tmp_path):
  with pytest.raises(config.ConfigError, match="no iNaturalist"):
    prior_counts.find_observations(str(tmp_path / "nothing"))
  (tmp_path / "occurrence.txt").write_text("gbifID\tdecimalLatitude\n")
  with pytest.raises(config.ConfigError,
                     match="lacks column.*decimalLongitude, taxonKey"):
    prior_counts.find_observations(str(tmp_path))


def test_key_of_counts_research_grade_rows_with_a_place_and_a_taxon(
    tmp_path):
  obs = prior_counts.find_observations(_inat(tmp_path, []))
  cell = h3.latlng_to_cell(55.68, 12.57, RES)
  assert prior_counts.key_of(["55.68", "12.57", "47170", "research"], obs,
                             RES) == ((47170, cell), None)
  cases = {
      ("55.68", "12.57", "47170", "needs_id"): prior_counts.QUALITY_GRADE,
      ("55.68", "12.57", "", "research"): prior_counts.NO_TAXON,
      ("55.68", "12.57", "x", "research"): prior_counts.NO_TAXON,
      ("", "12.57", "47170", "research"): prior_counts.NO_COORDINATES,
      ("91", "12.57", "47170", "research"): prior_counts.INVALID_COORDINATES,
  }
  for values, reason in cases.items():
    assert prior_counts.key_of(list(values), obs, RES) == (None, reason)
  wider = prior_counts.find_observations(
      str(tmp_path), quality_grades=("research", "needs_id"))
  assert prior_counts.key_of(["55.68", "12.57", "1", "needs_id"], wider,
                             RES)[0] == (1, cell)


def test_gbif_absence_records_are_not_presences(tmp_path):
  (tmp_path / "occurrence.txt").write_text(GBIF_HEADER + "\n")
  obs = prior_counts.find_observations(str(tmp_path))
  assert prior_counts.key_of(["55.68", "12.57", "5", "ABSENT"], obs,
                             RES) == (None, prior_counts.ABSENT)
  assert prior_counts.key_of(["55.68", "12.57", "5", "PRESENT"], obs,
                             RES)[0] == (5, h3.latlng_to_cell(55.68, 12.57,
                                                              RES))
