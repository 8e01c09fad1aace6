"""transforms/snapshots/plan.py: which models still have to see each photo.

``plan_photo`` on hand-made refs (done before, failed, routed, shared by
observations), then ``NewPhotos``, the whole reader, under TestPipeline
against earlier partitions written here: done and exhausted photos are
left out, whatever the current partition holds.
"""

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.snapshot_gen import FUNGI
from tests.snapshot_helpers import (  # noqa: F401  (fixture)
    EMB, FUN, photo_ids, snapshot_config, world, write_ids)
from natvision.transforms import snapshots
from natvision.transforms.records import ImageRef


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


def test_new_photos_leaves_out_done_and_exhausted(world, tmp_path):
  folder = world.write_snapshot("anti-join")
  out = tmp_path / "out"
  raven = str(world.photos_of(world.raven)[0].photo_id)
  agaric1, agaric2 = photo_ids(world, world.agaric)
  # raven: done for EMB.  agaric1: done for FUN, failed 3x before any model.
  # agaric2: failed twice for FUN at inference.
  write_ids(str(out / "embeddings" / EMB / "snapshot_date=2024-01-07"),
            [raven])
  write_ids(str(out / "predictions" / FUN / "snapshot_date=2024-01-07"),
            [agaric1])
  errors = out / "errors"
  for date in ("2024-01-07", "2024-01-14", "2024-01-21"):
    write_ids(str(errors / f"snapshot_date={date}"), [agaric1], errors=True)
  for date in ("2024-01-07", "2024-01-14"):
    write_ids(str(errors / f"snapshot_date={date}"), [agaric2], model=FUN,
              errors=True)
  # The current partition is ignored: these rows would hide agaric2.
  write_ids(str(out / "embeddings" / EMB / "snapshot_date=2024-02-01"),
            [agaric2])
  history = snapshots.find_history(
      [(EMB, str(out / "embeddings" / EMB)),
       (FUN, str(out / "predictions" / FUN))],
      str(errors), "snapshot_date=2024-02-01")
  config = snapshot_config(world, folder, snapshots.Filters(
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
