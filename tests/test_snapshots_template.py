"""transforms/snapshots/template.py: ``--photo_uri_template``.

Its fields and the URIs it formats, the templates it refuses, and which
table each field is read from (photos first).
"""

import pytest

from tests.snapshot_helpers import world  # noqa: F401  (fixture)
from natvision.transforms import snapshots


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
