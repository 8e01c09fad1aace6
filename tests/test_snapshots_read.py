"""transforms/snapshots/read.py: the tables read inside the pipeline.

``ReadSnapshot`` under TestPipeline on synthetic snapshots
(tests/snapshot_gen.py), as TSV and Parquet: it filters and routes the
observations, joins photos to them, carries their columns, skips malformed
lines and replaces bytes that are not UTF-8.  The join keeps one row of an
observation listed twice whatever the order the rows arrive in.
"""

import datetime
import itertools
import os

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.snapshot_gen import AVES, FUNGI, PLANTAE, SPECIES
from tests.snapshot_helpers import (  # noqa: F401  (fixture)
    EMB, FUN, photo_ids, snapshot_config, world)
from natvision.transforms import snapshots
from natvision.transforms.snapshots import read


def _routed(taxon_id=9, grade="research", lat=1.0, fields=(), models=None):
  obs = snapshots.ObservationRow("o1", taxon_id, grade,
                                 datetime.date(2024, 5, 1), lat, 2.0, fields)
  return snapshots.RoutedObservation(obs, models)


def _joined(observations):
  """The ImageRef the join gives photo 17 of observation o1."""
  join = read._JoinFn(snapshots.UriTemplate("/p/{photo_id}.jpg"))
  join.start_bundle()
  photo = snapshots.PhotoRow(17, "pu", "o1", "cc0", (("photo_id", "17"),))
  (_, ref), = join.process(("o1", {snapshots.PHOTOS: [photo],
                                   snapshots.OBSERVATIONS: observations}))
  return ref


def test_join_picks_one_row_of_a_repeated_observation_in_any_order():
  rows = [
      _routed(taxon_id=10),
      _routed(lat=5.0),
      _routed(lat=float("nan")),
      _routed(lat=None, models=(EMB,)),
      _routed(lat=None),
      _routed(lat=None, fields=(("extension", "png"),)),
  ]
  # taxon_id 9 before 10 (as numbers, not text), then a missing latitude
  # before NaN before any number, then no template field values, then
  # routed to every model (None) before some.
  assert {_joined(list(order)) for order in itertools.permutations(rows)
          } == {_joined([rows[4]])}
  assert _joined(rows).extra_dict()["latitude"] is None
  assert _joined(rows).models is None
  # A row without a taxon (None) sorts before any taxon.
  unknown = _routed(taxon_id=None, grade="casual")
  for order in (rows + [unknown], [unknown] + rows):
    assert _joined(order).extra_dict()["taxon_id"] is None


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_read_snapshot_filters_routes_and_joins(world, fmt):
  folder = world.write_snapshot(f"read-{fmt}", fmt=fmt)
  config = snapshot_config(world, folder, snapshots.Filters(
      routes=((FUN, (FUNGI,)),)))
  agaric = world.photos_of(world.agaric)
  want = [(str(p.photo_id), world.photo_path(p), (EMB, FUN)) for p in agaric]
  raven = world.photos_of(world.raven)[0]
  want.append((str(raven.photo_id), world.photo_path(raven), (EMB,)))
  with TestPipeline() as p:
    refs = p | snapshots.ReadSnapshot(config)
    assert_that(refs | beam.Map(lambda kv: (kv[0], kv[1].uri, kv[1].models)),
                equal_to(want))
    carried = refs | beam.Map(lambda kv: dict(kv[1].extra)["taxon_id"])
    assert_that(carried, equal_to([SPECIES["fly_agaric"]] * 2 +
                                  [SPECIES["raven"]]), label="Carried")


def test_read_snapshot_any_grade_and_taxon_subtree(world):
  folder = world.write_snapshot("subtree")
  config = snapshot_config(world, folder, snapshots.Filters(
      quality_grades=None, taxon_ids=(PLANTAE, AVES)))
  with TestPipeline() as p:
    ids = p | snapshots.ReadSnapshot(config) | beam.Keys()
    assert_that(ids, equal_to(photo_ids(world, world.raven, world.daisy)))


def test_malformed_lines_are_skipped_and_bad_bytes_replaced(world):
  folder = world.write_snapshot("malformed", extra_lines={
      "photos": ["1\t2", "", "x\t" * 8 + "x"],
      "observations": ["only\ttwo"]})
  raven = world.photos_of(world.raven)[0]
  with open(os.path.join(folder, "photos.csv"), "ab") as f:
    f.write(f"pu\t5555\t{raven.observation_uuid}\t1\tjpg\tcc-by-\xac\t"
            "1\t1\t1\n".encode("utf-8").replace(b"\xc2\xac", b"\xac"))
  config = snapshot_config(world, folder,
                           snapshots.Filters(quality_grades=None))
  with TestPipeline() as p:
    refs = p | snapshots.ReadSnapshot(config)
    assert_that(refs | beam.Keys(), equal_to(
        photo_ids(world, world.raven, world.agaric, world.daisy,
                  world.unknown) + ["5555"]))
    licences = (refs
                | beam.Filter(lambda kv: kv[0] == "5555")
                | beam.Map(lambda kv: dict(kv[1].extra)["license"]))
    assert_that(licences, equal_to(["cc-by-\ufffd"]), label="Replaced")
