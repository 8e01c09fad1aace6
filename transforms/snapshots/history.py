"""What earlier runs did: the committed partitions of the output tables.

At launch ``find_history`` lists (never reads) the Parquet files of each
model's table and of the errors table outside the partition being run.
Inside the pipeline ``ReadHistory`` reads only the ``image_id`` column of
each model's files and the ``image_id`` and ``model`` columns of the errors
files, so the launcher never holds the tens of millions of ids already
processed.  A failed listing is an error, never an empty history, which
would mean reprocessing everything.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import storage
from natvision.transforms.snapshots.tables import match_paths

PARTITION_KEY = "snapshot_date"


def partition_name(date: datetime.date) -> str:
  """The Hive-style folder of one run: ``snapshot_date=YYYY-MM-DD``."""
  return f"{PARTITION_KEY}={date.isoformat()}"


@dataclasses.dataclass(frozen=True)
class History:
  """The committed files of earlier partitions (listed, not read).

  Attributes:
    done: (model, Parquet files of that model's table outside the current
      partition).
    errors: Parquet files of the errors table outside the current partition.
    partitions: the partition dates seen in any of these tables.
  """

  done: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
  errors: Tuple[str, ...] = ()
  partitions: Tuple[str, ...] = ()

  def files_for(self, model: str) -> Tuple[str, ...]:
    return dict(self.done).get(model, ())


def partition_files(table_root: str, exclude: Optional[str] = None
                    ) -> Dict[str, List[str]]:
  """Parquet files of ``table_root/snapshot_date=*/``, by partition folder.

  Args:
    exclude: a partition folder name to leave out (the date being run).
  """
  found: Dict[str, List[str]] = {}
  for path in match_paths(FileSystems.join(table_root, PARTITION_KEY + "=*",
                                      "*.parquet")):
    parent, _ = FileSystems.split(path)
    folder = FileSystems.split(parent)[1]
    if not storage.same_folder(path, FileSystems.join(table_root, folder)):
      continue  # deeper than one partition level
    if not folder.startswith(PARTITION_KEY + "=") or folder == exclude:
      continue
    found.setdefault(folder, []).append(path)
  return found


def unpartitioned_files(table_root: str) -> List[str]:
  """Parquet files directly in a table folder (an embed_images table)."""
  return match_paths(FileSystems.join(table_root, "*.parquet"))


def find_history(model_tables: Sequence[Tuple[str, str]], errors_root: str,
                 current: str) -> History:
  """Lists what earlier partitions hold, leaving out partition ``current``.

  Args:
    model_tables: (model name, table root such as DIR/embeddings/<model>).
    errors_root: DIR/errors.
    current: the partition folder of this run (``snapshot_date=...``).
  """
  done = []
  partitions = set()
  for model, root in model_tables:
    files = partition_files(root, exclude=current)
    partitions.update(files)
    done.append((model, tuple(p for f in sorted(files) for p in files[f])))
  errors = partition_files(errors_root, exclude=current)
  partitions.update(errors)
  return History(
      done=tuple(done),
      errors=tuple(p for f in sorted(errors) for p in errors[f]),
      partitions=tuple(sorted(f.split("=", 1)[1] for f in partitions)))


def _ids_with(table: pa.Table, model: str) -> Iterator[Tuple[str, str]]:
  for image_id in table.column("image_id").to_pylist():
    yield image_id, model


def _error_pairs(table: pa.Table) -> Iterator[Tuple[str, Optional[str]]]:
  yield from zip(table.column("image_id").to_pylist(),
                 table.column("model").to_pylist())


class ReadHistory(beam.PTransform):
  """PBegin -> {"done": (image_id, model), "failed": (image_id, model|None)}.

  Reads only the id column of each model's earlier partitions, and the id
  and model columns of the errors table's.
  """

  def __init__(self, history: History, models: Sequence[str]):
    super().__init__()
    self._history = history
    self._models = tuple(models)

  def expand(self, pbegin):
    done = []
    for model in self._models:
      done.append(
          pbegin
          | f"DoneFiles[{model}]" >> beam.Create(
              list(self._history.files_for(model)))
          | f"ReadDone[{model}]" >> beam.io.ReadAllFromParquetBatched(
              columns=["image_id"])
          | f"DoneIds[{model}]" >> beam.FlatMap(_ids_with, model))
    failed = (pbegin
              | "ErrorFiles" >> beam.Create(list(self._history.errors))
              | "ReadErrors" >> beam.io.ReadAllFromParquetBatched(
                  columns=["image_id", "model"])
              | "FailedIds" >> beam.FlatMap(_error_pairs))
    return {"done": tuple(done) | "AllDone" >> beam.Flatten(),
            "failed": failed}
