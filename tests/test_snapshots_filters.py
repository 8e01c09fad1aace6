"""transforms/snapshots/filters.py: which observations a run keeps.

The filters' checks and description (quality grades, taxa, routes,
licences), and the taxonomy subtrees a taxon belongs to, itself included.
"""

import pytest

from tests.snapshot_gen import AVES, FUNGI, PLANTAE, TAXA
from tests.snapshot_helpers import FUN
from natvision.transforms import licenses, snapshots


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


def test_subtree_includes_the_taxon_itself():
  roots = frozenset({FUNGI, 47348})
  pairs = {p for row in TAXA for p in snapshots.subtree_pairs(
      snapshots.taxon_from_row({"taxon_id": row[0], "ancestry": row[1]}),
      roots)}
  assert pairs == {(FUNGI, FUNGI), (FUNGI, 47169), (FUNGI, 48715),
                   (FUNGI, 47348), (47348, 47348)}
