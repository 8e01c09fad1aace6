"""transforms/snapshots/rows.py: a table row as a typed row.

Rows as text (TSV) and as Parquet values give the same typed rows; empty
values are None, and a row that cannot be used raises ``BadRow``.
"""

import datetime

import pytest

from natvision.transforms import snapshots


def test_rows_from_text_and_from_parquet_values():
  text = snapshots.photo_from_row(
      {"photo_id": "17", "photo_uuid": "pu", "observation_uuid": " ou ",
       "license": "", "extension": "jpg"}, ("extension",))
  assert text == snapshots.PhotoRow(17, "pu", "ou", None,
                                    (("extension", "jpg"),))
  typed = snapshots.photo_from_row(
      {"photo_id": 17, "photo_uuid": "pu", "observation_uuid": "ou",
       "license": None})
  assert typed.photo_id == 17
  with pytest.raises(snapshots.BadRow):
    snapshots.photo_from_row({"photo_id": "x", "observation_uuid": "o"})
  with pytest.raises(snapshots.BadRow):
    snapshots.photo_from_row({"photo_id": "1", "observation_uuid": ""})
  obs = snapshots.observation_from_row(
      {"observation_uuid": "o", "taxon_id": "", "quality_grade": "casual",
       "observed_on": "2023-07-01", "latitude": "51.5", "longitude": "bad"})
  assert (obs.taxon_id, obs.observed_on, obs.latitude, obs.longitude) == (
      None, datetime.date(2023, 7, 1), 51.5, None)
  obs = snapshots.observation_from_row(
      {"observation_uuid": "o", "taxon_id": 3.0,
       "observed_on": datetime.datetime(2023, 7, 1, 12), "latitude": 1})
  assert (obs.taxon_id, obs.observed_on, obs.latitude) == (
      3, datetime.date(2023, 7, 1), 1.0)
  taxon = snapshots.taxon_from_row({"taxon_id": "48715",
                                    "ancestry": "48460/47170/47169"})
  assert taxon == snapshots.TaxonRow(48715, (48460, 47170, 47169))
  assert snapshots.taxon_from_row({"taxon_id": "48460", "ancestry": ""}
                                  ).ancestors == ()
  with pytest.raises(snapshots.BadRow):
    snapshots.taxon_from_row({"taxon_id": "1", "ancestry": "a/b"})
