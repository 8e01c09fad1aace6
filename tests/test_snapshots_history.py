"""transforms/snapshots/history.py: earlier partitions, listed at launch.

``find_history`` lists every partition of each model's table and of the
errors table except the current one, under an absolute or a relative
output folder.
"""

import os

from tests.snapshot_helpers import EMB, FUN, write_ids
from natvision.transforms import snapshots


def test_find_history_leaves_out_the_current_partition(tmp_path):
  emb = tmp_path / "embeddings" / EMB
  write_ids(str(emb / "snapshot_date=2024-01-07"), ["1"])
  write_ids(str(emb / "snapshot_date=2024-01-14"), ["2"])
  write_ids(str(emb / "snapshot_date=2024-01-21"), ["3"])
  write_ids(str(emb / "other"), ["4"])
  write_ids(str(emb / "snapshot_date=2024-01-07" / "nested"), ["5"])
  write_ids(str(tmp_path / "errors" / "snapshot_date=2024-01-07"), ["6"],
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
  write_ids(os.path.join("out", "embeddings", EMB, "snapshot_date=2024-01-07"),
            ["1"])
  history = snapshots.find_history(
      [(EMB, os.path.join("out", "embeddings", EMB))],
      os.path.join("out", "errors"), "snapshot_date=2024-01-14")
  assert len(history.files_for(EMB)) == 1
  assert history.partitions == ("2024-01-07",)
