"""tools/recall.py: Recall@k figures (the command is tests/test_evaluate.py's)."""

import numpy as np
import pyarrow as pa
import pytest

from natvision.tools import recall


def test_classifier_recall_at_k_by_name_with_a_hand_count():
  labelmap = ["Amanita muscaria", "Boletus edulis", "Russula emetica"]
  table = pa.table({
      "top_k_label_ids": [[0, 1], [2, 1], [2, 0], [1, 2]],
      "species": ["amanita  MUSCARIA", "Boletus edulis", "Boletus edulis",
                  "not in the labelmap"]})
  got = recall.evaluate_classifier(table, "species", labelmap, (1, 2))
  # Photo 1: top-1 right; photo 2: right at 2; photo 3: wrong at 2.
  assert got["photos"] == 3 and got["skipped"] == 1
  assert got["recall_at_k"]["1"] == pytest.approx(1 / 3, abs=1e-12)
  assert got["recall_at_k"]["2"] == pytest.approx(2 / 3, abs=1e-12)


def test_nearest_neighbours_leave_the_query_out():
  vectors = np.eye(3, dtype=np.float32)
  vectors[1] = [0.9, 0.1, 0.0]
  vectors = recall.unit_rows(vectors)
  found = recall.nearest_neighbours(vectors, np.array([0]), 1)
  assert found.tolist() == [[1]]
