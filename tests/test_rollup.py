"""tools/rollup.py: share answered per rank and accuracy at that rank."""

import pyarrow as pa
import pytest

from natvision.tools import rollup
from natvision.transforms import taxonomy

TAXA = taxonomy.Taxa(
    kind=taxonomy.INATURALIST,
    rank={1: "kingdom", 2: "genus", 3: "species", 4: "species", 5: "genus"},
    name={1: "Fungi", 2: "Amanita", 3: "Amanita muscaria",
          4: "Amanita pantherina", 5: "Boletus"},
    ancestry={1: (), 2: (1,), 3: (1, 2), 4: (1, 2), 5: (1,)})


def test_share_and_accuracy_by_rank():
  table = pa.table({
      # truth, answer, rank: right species; wrong species; right genus;
      # wrong genus; right kingdom; no answer; a truth not in the taxonomy.
      "taxon": [3, 3, 4, 4, 3, 4, 99],
      "rollup_taxon_id": [3, 4, 2, 5, 1, None, 3],
      "rollup_rank": ["species", "species", "genus", "genus", "kingdom",
                      None, "species"],
  })
  got = rollup.evaluate_rollup(table, "taxon", TAXA)
  assert got["photos"] == 6 and got["skipped"] == 1 and got["answered"] == 5
  assert got["share_by_rank"] == pytest.approx(
      {"species": 2 / 6, "genus": 2 / 6, "kingdom": 1 / 6, "none": 1 / 6},
      abs=1e-12)
  assert got["accuracy_by_rank"] == pytest.approx(
      {"species": 0.5, "genus": 0.5, "kingdom": 1.0}, abs=1e-12)
  assert got["accuracy"] == pytest.approx(3 / 5, abs=1e-12)


def test_a_table_without_rollup_columns_has_no_figures():
  assert rollup.evaluate_rollup(pa.table({"taxon": [3]}), "taxon", TAXA) is None
