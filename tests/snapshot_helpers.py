"""Shared by the snapshot tests: a small synthetic world and output tables.

The tests of transforms/snapshots/ (test_snapshots_<module>.py) read
snapshots written by tests/snapshot_gen.py.  ``world`` is one such world,
made once per test module that imports the fixture by name (pytest finds
fixtures among a module's globals).
"""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.snapshot_gen import SPECIES, SyntheticINat
from natvision.transforms import snapshots

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


def photo_ids(w, *observations):
  """The sorted image ids (photo ids as text) of ``observations`` in ``w``."""
  return sorted(str(p.photo_id) for o in observations for p in w.photos_of(o))


def write_ids(folder, ids, model=None, errors=False):
  """Writes one more Parquet file of ``ids`` (and ``model`` for errors)."""
  os.makedirs(folder, exist_ok=True)
  columns = {"image_id": pa.array(ids, pa.string())}
  if errors:
    columns["model"] = pa.array([model] * len(ids), pa.string())
  pq.write_table(pa.table(columns),
                 os.path.join(folder, f"part-{len(os.listdir(folder))}"
                              ".parquet"))


def snapshot_config(world, folder, filters, models=(EMB, FUN)):
  """The SnapshotConfig of the snapshot in ``folder`` with ``filters``."""
  snap = snapshots.open_snapshot(folder, need_taxa=filters.needs_taxa)
  template = snapshots.UriTemplate(world.template)
  return snapshots.SnapshotConfig(
      snapshot=snap, template=template,
      sources=snapshots.template_sources(template, snap), filters=filters,
      models=models)
