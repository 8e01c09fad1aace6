"""An IVF index built without holding the table's vectors in memory.

tools/index.py chooses an inverted-file index for a large table; this
module builds it out of core, with FAISS's on-disk inverted lists:

1. one pass over the table, a file at a time, keeps a seeded sample of rows
   to train the coarse quantizer on (64 a list, as ``build_approximate``)
   and the rows whose exact neighbours measure the recall;
2. a second pass adds each file's vectors to an empty copy of the trained
   index, written as a shard to a local work folder, and merges each file's
   exact neighbours of the recall queries into a running top-k
   (``faiss.ResultHeap``);
3. the shards' lists are merged into one ``index.ivfdata`` file
   (``faiss.contrib.ondisk.merge_ondisk``, which maps the shards rather
   than reading them), ``nprobe`` is tuned as ``build_approximate`` tunes
   it, and ``index.faiss`` is written: the quantizer and a reference to
   ``index.ivfdata`` in the same folder.

Memory holds one file's vectors, the training sample (64 rows a list: 65
MB at 1M rows of 64 dimensions) and the quantizer; the lists cost local
disk (the vectors' size, twice while the shards are merged) and page cache.
Opening the index (tools/index.py ``_read_index``) maps ``index.ivfdata``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
from typing import Callable, Iterator, List, Tuple

import numpy as np

IVFDATA_FILE = "index.ivfdata"


def build_on_disk(chunks: Callable[[], Iterator[np.ndarray]], counts:
                  List[int], d: int, workdir: str, target_recall: float,
                  queries: int, train_per_list: int, recall_k: int,
                  tune: Callable, seed: int = 0) -> Tuple[object, dict]:
  """Builds the IVF index in ``workdir`` (module docstring).

  Args:
    chunks: called once per pass; yields each file's unit vectors, float32
      ``[rows, d]``, in the table's order (``counts`` rows each).
    counts: rows per file.
    d: dimensions.
    workdir: a local folder; ``index.ivfdata`` is left there.
    tune: tools/index.py's nprobe tuning, ``(index, q, truth, nlist,
      target) -> (nprobe, recall)``.

  Returns:
    (index, info) as ``build_approximate``: the index's lists are
    ``workdir/index.ivfdata``.
  """
  import faiss  # pylint: disable=import-outside-toplevel
  from faiss.contrib.ondisk import merge_ondisk  # pylint: disable=import-outside-toplevel
  n = int(sum(counts))
  nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
  rng = np.random.default_rng(seed)
  train_at = np.arange(n) if n <= train_per_list * nlist else np.sort(
      rng.choice(n, train_per_list * nlist, replace=False))
  query_at = np.sort(rng.choice(n, min(queries, n), replace=False))
  train, q = _pick(chunks(), counts, [train_at, query_at], d)
  index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist,
                             faiss.METRIC_INNER_PRODUCT)
  index.train(train)
  del train
  k = min(recall_k, n)
  heap = faiss.ResultHeap(len(q), k, keep_max=True)
  shards, offset = [], 0
  empty = faiss.serialize_index(index)
  for f, vectors in enumerate(chunks()):
    shard = faiss.deserialize_index(empty)
    # Global row positions as ids (merge_ondisk's shift_ids was seen to
    # shift a second shard by one row too few).
    shard.add_with_ids(vectors, np.arange(offset, offset + len(vectors),
                                          dtype=np.int64))
    shards.append(os.path.join(workdir, f"shard-{f:05d}.faiss"))
    faiss.write_index(shard, shards[-1])
    del shard
    scores, rows = faiss.knn(q, vectors, min(k, len(vectors)),
                             metric=faiss.METRIC_INNER_PRODUCT)
    heap.add_result(scores, np.where(rows >= 0, rows + offset, -1))
    offset += len(vectors)
  heap.finalize()
  with quiet_stdout():  # FAISS prints each resize of the lists' file
    merge_ondisk(index, shards, os.path.join(workdir, IVFDATA_FILE))
  for shard in shards:
    os.unlink(shard)
  nprobe, recall = tune(index, q, heap.I, nlist, target_recall)
  return index, {"nlist": nlist, "nprobe": nprobe, "recall_at_10": recall,
                 "queries": int(len(q))}


def _pick(chunks: Iterator[np.ndarray], counts: List[int],
          positions: List[np.ndarray], d: int) -> List[np.ndarray]:
  """The rows at each array of sorted global ``positions``, in one pass."""
  out = [np.empty((len(p), d), np.float32) for p in positions]
  filled = [0] * len(positions)
  start = 0
  for vectors, count in zip(chunks, counts):
    for i, at in enumerate(positions):
      local = at[(at >= start) & (at < start + count)] - start
      out[i][filled[i]:filled[i] + len(local)] = vectors[local]
      filled[i] += len(local)
    start += count
  return out


@contextlib.contextmanager
def quiet_stdout():
  """File descriptor 1 sent to /dev/null for the block: FAISS's C++ code
  prints progress of on-disk lists with printf, which no flag silences."""
  sys.stdout.flush()
  saved = os.dup(1)
  try:
    with open(os.devnull, "wb") as null:
      os.dup2(null.fileno(), 1)
    yield
  finally:
    os.dup2(saved, 1)
    os.close(saved)


def copy_file(source, target, chunk: int = 1 << 24) -> None:
  """Copies between two open binary files, a chunk at a time."""
  shutil.copyfileobj(source, target, chunk)
