"""Snapshots: finding tables, typed rows, filters, routing, and the anti-join."""

import datetime
import gzip
import itertools
import os

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.snapshot_gen import (AVES, FUNGI, PLANTAE, SPECIES, TAXA,
                                SyntheticINat)
from transforms import licenses, snapshots
from transforms.records import ImageRef
from transforms.snapshots import read

EMB, FUN = "inaturalist_v2", "fungi_mobile_v1"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A raven (research), a fly agaric (research, 2 photos), a daisy
  (needs_id), an observation without taxon (casual)."""
  w = SyntheticINat(str(tmp_path_factory.mktemp("snap")), seed=11)
  w.raven = w.observe(SPECIES["raven"])
  w.agaric = w.observe(SPECIES["fly_agaric"], photos=2, extension="png")
  w.daisy = w.observe(SPECIES["daisy"], quality_grade="needs_id",
                      observed_on=None)
  w.unknown = w.observe(None, quality_grade="casual")
  return w


def _ids(w, *observations):
  return sorted(str(p.photo_id) for o in observations for p in w.photos_of(o))


# --------------------------------------------------------------------------
# Finding the tables.


@pytest.mark.parametrize("fmt", ["csv", "csv.gz", "parquet"])
def test_open_snapshot_finds_each_format(world, fmt):
  folder = world.write_snapshot(f"fmt-{fmt}", fmt=fmt)
  snap = snapshots.open_snapshot(folder, need_taxa=True)
  want = "parquet" if fmt == "parquet" else "tsv"
  assert snap.photos.fmt == snap.observations.fmt == snap.taxa.fmt == want
  assert snap.photos.files == (os.path.join(folder, f"photos.{fmt}"),)
  assert "photo_id" in snap.photos.columns
  assert "ancestry" in snap.taxa.columns


def test_folder_of_parts(tmp_path):
  parts = tmp_path / "photos"
  parts.mkdir()
  header = "photo_uuid\tphoto_id\tobservation_uuid\tlicense\n"
  for i in range(2):
    (parts / f"part-{i}.csv.gz").write_bytes(gzip.compress(
        (header + f"u{i}\t{i}\to{i}\tcc0\n").encode()))
  table = snapshots.find_table(str(tmp_path), "photos")
  assert table.fmt == "tsv" and len(table.files) == 2
  (parts / "part-2.csv.gz").write_bytes(gzip.compress(b"photo_id\n1\n"))
  with pytest.raises(snapshots.SnapshotError, match="must agree"):
    snapshots.find_table(str(tmp_path), "photos")


def test_table_present_twice_is_refused(world, tmp_path):
  folder = world.write_snapshot("twice", fmt="csv")
  pq.write_table(pa.table({"photo_id": [1]}),
                 os.path.join(folder, "photos.parquet"))
  with pytest.raises(snapshots.SnapshotError, match="more than once"):
    snapshots.open_snapshot(folder)
  del tmp_path


def test_missing_tables_and_columns_are_named(world, tmp_path):
  no_taxa = world.write_snapshot("no-taxa", taxa=False)
  assert snapshots.open_snapshot(no_taxa).taxa is None
  with pytest.raises(snapshots.SnapshotError, match="no taxa table"):
    snapshots.open_snapshot(no_taxa, need_taxa=True)
  with pytest.raises(snapshots.SnapshotError, match="no photos table"):
    snapshots.open_snapshot(str(tmp_path))
  (tmp_path / "photos.csv").write_text("photo_id\tobservation_uuid\n")
  (tmp_path / "observations.csv").write_text("observation_uuid\n")
  with pytest.raises(snapshots.SnapshotError) as e:
    snapshots.open_snapshot(str(tmp_path))
  assert "photo_uuid" in str(e.value) and "license" in str(e.value)


def test_comma_separated_file_gets_a_hint(tmp_path):
  (tmp_path / "photos.csv").write_text(
      "photo_uuid,photo_id,observation_uuid,license\n")
  (tmp_path / "observations.csv").write_text("x\n")
  with pytest.raises(snapshots.SnapshotError, match="tab-separated"):
    snapshots.open_snapshot(str(tmp_path))


# --------------------------------------------------------------------------
# The template, the filters and the typed rows.


def test_uri_template_fields_and_format():
  t = snapshots.UriTemplate("gs://m/photos/{photo_id}/medium.{extension}")
  assert t.fields == ("photo_id", "extension")
  assert t.format({"photo_id": "12", "extension": "jpg"}) == (
      "gs://m/photos/12/medium.jpg")
  assert t.format({"photo_id": "12", "extension": None}) == ""
  for bad in ("gs://m/all.jpg", "/p/{photo_id!r}", "/p/{photo_id:08d}",
              "/p/{0}", "/p/{photo_id"):
    with pytest.raises(ValueError, match="--photo_uri_template"):
      snapshots.UriTemplate(bad)


def test_template_sources_prefer_photos(world):
  snap = snapshots.open_snapshot(world.write_snapshot("tpl"))
  t = snapshots.UriTemplate("/s/{observer_id}/{photo_id}-{quality_grade}")
  sources = snapshots.template_sources(t, snap)
  assert sources.photos == ("observer_id", "photo_id")
  assert sources.observations == ("quality_grade",)
  with pytest.raises(snapshots.SnapshotError, match="size"):
    snapshots.template_sources(snapshots.UriTemplate("/{size}/{photo_id}"),
                               snap)


def test_filters_validate():
  f = snapshots.Filters(taxon_ids=(AVES,), routes=((FUN, (FUNGI, PLANTAE)),))
  assert f.roots == (AVES, PLANTAE, FUNGI)
  assert f.needs_taxa
  assert not snapshots.Filters().needs_taxa
  assert f.describe() == {"quality_grade": ["research"], "taxon_id": [AVES],
                          "routes": {FUN: [FUNGI, PLANTAE]}, "license": []}
  kept = snapshots.Filters(licenses=licenses.LicenseFilter(
      keep=frozenset({"cc0", "cc-by-nc"})))
  assert kept.describe()["license"] == ["cc-by-nc", "cc0"]
  with pytest.raises(ValueError, match="--quality_grade"):
    snapshots.Filters(quality_grades=frozenset({"great"}))
  with pytest.raises(ValueError, match="--route"):
    snapshots.Filters(routes=((FUN, (1,)), (FUN, (2,))))


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


def test_subtree_includes_the_taxon_itself():
  roots = frozenset({FUNGI, 47348})
  pairs = {p for row in TAXA for p in snapshots.subtree_pairs(
      snapshots.taxon_from_row({"taxon_id": row[0], "ancestry": row[1]}),
      roots)}
  assert pairs == {(FUNGI, FUNGI), (FUNGI, 47169), (FUNGI, 48715),
                   (FUNGI, 47348), (47348, 47348)}


# --------------------------------------------------------------------------
# Deciding the work for one photo.


def _ref(obs_uuid="b", models=None, image_id="7"):
  return ImageRef(image_id=image_id, uri=f"/p/{image_id}.jpg",
                  extra=(("observation_uuid", obs_uuid),), models=models)


def test_plan_photo_new_done_and_routed():
  plan = snapshots.plan_photo([_ref(models=(EMB,))], [], [], (EMB, FUN), 3)
  assert plan.new == (EMB,) and plan.ref.models == (EMB,)
  plan = snapshots.plan_photo([_ref()], [EMB], [], (EMB, FUN), 3)
  assert plan.new == (FUN,) and plan.done == (EMB,)
  assert plan.ref.models == (FUN,)
  plan = snapshots.plan_photo([_ref()], [EMB, FUN], [], (EMB, FUN), 3)
  assert plan.ref is None and plan.done == (EMB, FUN)
  assert snapshots.plan_photo([], [EMB], [None], (EMB,), 3) is None


def test_plan_photo_counts_attempts():
  # Errors before any model count for every model; inference errors only
  # for their own model.
  failed = [None, None, FUN]
  plan = snapshots.plan_photo([_ref()], [], failed, (EMB, FUN), 3)
  assert plan.new == (EMB,) and plan.held_back == (FUN,)
  plan = snapshots.plan_photo([_ref()], [], failed + [None], (EMB, FUN), 3)
  assert plan.ref is None and plan.held_back == (EMB, FUN)
  plan = snapshots.plan_photo([_ref()], [], failed, (EMB, FUN), 4)
  assert plan.new == (EMB, FUN)


def test_shared_photo_goes_to_every_model_any_observation_qualifies_for():
  # The plant observation sorts first; the fungus one alone qualifies for
  # the fungi model.
  refs = [_ref("a-plant", models=(EMB,)), _ref("b-fungus", models=(FUN,))]
  plan = snapshots.plan_photo(refs, [], [], (EMB, FUN), 3)
  assert plan.new == (EMB, FUN) and plan.ref.models == (EMB, FUN)
  assert plan.ref.extra_dict()["observation_uuid"] == "a-plant"
  plan = snapshots.plan_photo(refs, [EMB], [], (EMB, FUN), 3)  # a later run
  assert plan.new == (FUN,) and plan.done == (EMB,)
  plan = snapshots.plan_photo(refs[:1], [EMB], [], (EMB, FUN), 3)
  assert plan.ref is None and plan.new == ()


def test_plan_photo_picks_one_observation():
  refs = [_ref("b", models=(EMB,)), _ref("a", models=(EMB, FUN))]
  plan = snapshots.plan_photo(refs, [], [], (EMB, FUN), 3)
  assert plan.ref.extra_dict()["observation_uuid"] == "a"
  assert plan.new == (EMB, FUN)


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


# --------------------------------------------------------------------------
# History: listing earlier partitions.


def _write_ids(folder, ids, model=None, errors=False):
  os.makedirs(folder, exist_ok=True)
  columns = {"image_id": pa.array(ids, pa.string())}
  if errors:
    columns["model"] = pa.array([model] * len(ids), pa.string())
  pq.write_table(pa.table(columns),
                 os.path.join(folder, f"part-{len(os.listdir(folder))}"
                              ".parquet"))


def test_find_history_leaves_out_the_current_partition(tmp_path):
  emb = tmp_path / "embeddings" / EMB
  _write_ids(str(emb / "snapshot_date=2024-01-07"), ["1"])
  _write_ids(str(emb / "snapshot_date=2024-01-14"), ["2"])
  _write_ids(str(emb / "snapshot_date=2024-01-21"), ["3"])
  _write_ids(str(emb / "other"), ["4"])
  _write_ids(str(emb / "snapshot_date=2024-01-07" / "nested"), ["5"])
  _write_ids(str(tmp_path / "errors" / "snapshot_date=2024-01-07"), ["6"],
             errors=True)
  history = snapshots.find_history(
      [(EMB, str(emb)), (FUN, str(tmp_path / "predictions" / FUN))],
      str(tmp_path / "errors"), "snapshot_date=2024-01-14")
  assert [os.path.relpath(p, emb) for p in history.files_for(EMB)] == [
      "snapshot_date=2024-01-07/part-0.parquet",
      "snapshot_date=2024-01-21/part-0.parquet"]
  assert history.files_for(FUN) == ()
  assert len(history.errors) == 1
  assert history.partitions == ("2024-01-07", "2024-01-21")


def test_find_history_under_a_relative_output_dir(tmp_path, monkeypatch):
  # Beam's local split makes paths absolute while join keeps them relative:
  # a relative --output_dir once lost every earlier partition.
  monkeypatch.chdir(tmp_path)
  _write_ids(os.path.join("out", "embeddings", EMB, "snapshot_date=2024-01-07"),
             ["1"])
  history = snapshots.find_history(
      [(EMB, os.path.join("out", "embeddings", EMB))],
      os.path.join("out", "errors"), "snapshot_date=2024-01-14")
  assert len(history.files_for(EMB)) == 1
  assert history.partitions == ("2024-01-07",)


# --------------------------------------------------------------------------
# The transforms under TestPipeline.


def _config(world, folder, filters, models=(EMB, FUN)):
  snap = snapshots.open_snapshot(folder, need_taxa=filters.needs_taxa)
  template = snapshots.UriTemplate(world.template)
  return snapshots.SnapshotConfig(
      snapshot=snap, template=template,
      sources=snapshots.template_sources(template, snap), filters=filters,
      models=models)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_read_snapshot_filters_routes_and_joins(world, fmt):
  folder = world.write_snapshot(f"read-{fmt}", fmt=fmt)
  config = _config(world, folder, snapshots.Filters(
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
  config = _config(world, folder, snapshots.Filters(
      quality_grades=None, taxon_ids=(PLANTAE, AVES)))
  with TestPipeline() as p:
    ids = p | snapshots.ReadSnapshot(config) | beam.Keys()
    assert_that(ids, equal_to(_ids(world, world.raven, world.daisy)))


def test_new_photos_leaves_out_done_and_exhausted(world, tmp_path):
  folder = world.write_snapshot("anti-join")
  out = tmp_path / "out"
  raven = str(world.photos_of(world.raven)[0].photo_id)
  agaric1, agaric2 = _ids(world, world.agaric)
  # raven: done for EMB.  agaric1: done for FUN, failed 3x before any model.
  # agaric2: failed twice for FUN at inference.
  _write_ids(str(out / "embeddings" / EMB / "snapshot_date=2024-01-07"),
             [raven])
  _write_ids(str(out / "predictions" / FUN / "snapshot_date=2024-01-07"),
             [agaric1])
  errors = out / "errors"
  for date in ("2024-01-07", "2024-01-14", "2024-01-21"):
    _write_ids(str(errors / f"snapshot_date={date}"), [agaric1], errors=True)
  for date in ("2024-01-07", "2024-01-14"):
    _write_ids(str(errors / f"snapshot_date={date}"), [agaric2], model=FUN,
               errors=True)
  # The current partition is ignored: these rows would hide agaric2.
  _write_ids(str(out / "embeddings" / EMB / "snapshot_date=2024-02-01"),
             [agaric2])
  history = snapshots.find_history(
      [(EMB, str(out / "embeddings" / EMB)),
       (FUN, str(out / "predictions" / FUN))],
      str(errors), "snapshot_date=2024-02-01")
  config = _config(world, folder, snapshots.Filters(
      routes=((FUN, (FUNGI,)),)))
  with TestPipeline() as p:
    for max_attempts, want in (
        (3, [(agaric2, (EMB, FUN))]),
        (2, [(agaric2, (EMB,))]),
        (4, [(agaric1, (EMB,)), (agaric2, (EMB, FUN))])):
      refs = p | f"New{max_attempts}" >> snapshots.NewPhotos(
          config, history, max_attempts)
      assert_that(refs | f"Ids{max_attempts}" >> beam.Map(
          lambda r: (r.image_id, r.models)), equal_to(want),
                  label=f"Check{max_attempts}")


def test_malformed_lines_are_skipped_and_bad_bytes_replaced(world):
  folder = world.write_snapshot("malformed", extra_lines={
      "photos": ["1\t2", "", "x\t" * 8 + "x"],
      "observations": ["only\ttwo"]})
  raven = world.photos_of(world.raven)[0]
  with open(os.path.join(folder, "photos.csv"), "ab") as f:
    f.write(f"pu\t5555\t{raven.observation_uuid}\t1\tjpg\tcc-by-\xac\t"
            "1\t1\t1\n".encode("utf-8").replace(b"\xc2\xac", b"\xac"))
  config = _config(world, folder, snapshots.Filters(quality_grades=None))
  with TestPipeline() as p:
    refs = p | snapshots.ReadSnapshot(config)
    assert_that(refs | beam.Keys(), equal_to(
        _ids(world, world.raven, world.agaric, world.daisy, world.unknown)
        + ["5555"]))
    licences = (refs
                | beam.Filter(lambda kv: kv[0] == "5555")
                | beam.Map(lambda kv: dict(kv[1].extra)["license"]))
    assert_that(licences, equal_to(["cc-by-\ufffd"]), label="Replaced")
