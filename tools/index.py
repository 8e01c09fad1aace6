"""The FAISS index of an embeddings table: built, checked and opened.

Decides the index's kind and where it lives.  The index lives next to the
table, in ``OUT/embeddings/<model>/_index/`` (``index.faiss`` and
``index.json``; readers of the table skip folders whose names start with
``_``).  Vectors are scaled to unit length, so the inner product FAISS
ranks by is the cosine similarity.  Below ``EXACT_BELOW_FLOATS`` floats
(rows times dimensions) the index is exact (``IndexFlatIP``); above, it is
an inverted file (``IVF<nlist>,Flat``) whose ``nprobe`` is raised until its
Recall@10 against the exact search, measured on a sample of the table's
own rows, reaches ``TARGET_RECALL``; the recall reached is recorded in
``index.json``.  The inverted file is built out of core and keeps its
lists in ``index.ivfdata`` (tools/index_disk.py).  The index remembers which files (and sizes) it was built
from, in which order; a table rewritten since then is refused with a
message to rebuild (``open_searcher``), which memory-maps the file
(``_read_index``) so that an index larger than memory can be queried.
Without an index, search builds an exact one in memory.

The commands (natvision-index, natvision-search) are tools/search.py's.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from natvision import transforms
from natvision.transforms import models as models_lib
from natvision.transforms import storage
from natvision.tools import index_disk
from natvision.tools import tables as tables_lib

INDEX_DIR = "_index"
INDEX_FILE = "index.faiss"
INDEX_META = "index.json"
# An exact search scans rows x dims floats per query.  Measured with
# benchmarks/index_threshold.py on this project's 2-core machine (clustered
# unit vectors, batches of 200 queries): an exact query cost 5.6 ms at 1e7
# floats, 12 ms at 2e7 and 53 ms at 4.1e7 (64 dims); 7 ms at 3.1e7 and 11 ms
# at 6.1e7 (1536 dims).  An IVF index tuned to Recall@10 0.95 answered in
# 0.04 to 0.35 ms but took 15 to 125 s to build at those sizes.  Below
# 2^25 (3.4e7) floats, e.g. 524k rows of 64 dims or 21.8k rows of 1536,
# exact queries stay around 10 ms or less and need no build, tuning or
# loss of recall; above it they grow past that while the IVF stays under
# 1 ms.
EXACT_BELOW_FLOATS = 2 ** 25
TARGET_RECALL = 0.95
RECALL_QUERIES = 500
RECALL_K = 10
# k-means training rows per inverted list (FAISS wants at least 39).
TRAIN_PER_LIST = 64


class SearchError(ValueError):
  """Flags, tables or indexes that cannot be used; the message says the fix."""


def unit_rows(vectors: np.ndarray) -> np.ndarray:
  """Rows scaled to unit length (zero rows stay zero), float32 C-order."""
  vectors = np.ascontiguousarray(vectors, dtype=np.float32)
  norms = np.linalg.norm(vectors, axis=1, keepdims=True)
  return np.ascontiguousarray(vectors / np.where(norms > 0, norms, 1.0))


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
  k = truth.shape[1]
  return float(np.mean([len(set(f[:k]) & set(t)) / k
                        for f, t in zip(found, truth)]))


def build_approximate(vectors: np.ndarray,
                      target_recall: float = TARGET_RECALL,
                      queries: int = RECALL_QUERIES, seed: int = 0):
  """An IVF index over unit vectors, tuned to reach ``target_recall``.

  nlist is about 4 sqrt(n), trained on up to 64 rows per list (at least
  39 per list); nprobe is
  doubled from 1 until Recall@10 against an exact search of ``queries`` of
  the table's own rows reaches the target (or every list is probed).

  Args:
    vectors: unit rows, float32 ``[n, d]``.

  Returns:
    (index, info): info has nlist, nprobe, recall_at_10 and queries.
  """
  import faiss  # pylint: disable=import-outside-toplevel
  n, d = vectors.shape
  nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
  quantizer = faiss.IndexFlatIP(d)
  index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
  rng = np.random.default_rng(seed)
  train = vectors
  if n > TRAIN_PER_LIST * nlist:
    train = vectors[np.sort(rng.choice(n, TRAIN_PER_LIST * nlist,
                                       replace=False))]
  index.train(train)
  index.add(vectors)
  q = vectors[np.sort(rng.choice(n, min(queries, n), replace=False))]
  exact = faiss.IndexFlatIP(d)
  exact.add(vectors)
  k = min(RECALL_K, n)
  _, truth = exact.search(q, k)
  nprobe, recall = tune_nprobe(index, q, truth, nlist, target_recall)
  return index, {"nlist": nlist, "nprobe": nprobe, "recall_at_10": recall,
                 "queries": int(len(q))}


def tune_nprobe(index, q: np.ndarray, truth: np.ndarray, nlist: int,
                target_recall: float) -> Tuple[int, float]:
  """nprobe doubled from 1 until Recall@k of ``index`` on queries ``q``
  against their exact neighbours ``truth`` ``[len(q), k]`` reaches the
  target, or every list is probed; returns (nprobe, recall)."""
  k = truth.shape[1]
  nprobe, recall = 1, 0.0
  while True:
    index.nprobe = nprobe
    _, found = index.search(q, k)
    recall = _recall(found, truth)
    if recall >= target_recall or nprobe >= nlist:
      return nprobe, recall
    nprobe = min(nprobe * 2, nlist)


def _embedder_table(output_dir: str, model: str) -> tables_lib.ModelTable:
  table = tables_lib.open_model_table(output_dir, model)
  if table.kind != models_lib.EMBEDDER:
    raise SearchError(f"{model} is a {table.kind}; search needs an embedder's "
                      f"table (OUT/embeddings/<model>/)")
  return table


def _file_list(table: tables_lib.ModelTable) -> List[dict]:
  """The table's files with their sizes, for the staleness check."""
  listed = []
  for table_file in table.files:
    match = FileSystems.match([table_file.path])[0].metadata_list
    size = match[0].size_in_bytes if match else None
    listed.append({"path": table_file.path[len(table.root.rstrip("/")) + 1:],
                   "size": size, "partition": table_file.partition})
  return listed


def file_vectors(table: tables_lib.ModelTable) -> Iterator[np.ndarray]:
  """Each file's unit embeddings, float32 ``[rows, d]``, in table order."""
  for table_file in table.files:
    column = tables_lib.read_files([table_file], ["embedding"]).column(
        "embedding").combine_chunks()
    width = column.type.list_size
    yield unit_rows(column.flatten().to_numpy(zero_copy_only=False).reshape(
        -1, width))


def read_vectors(table: tables_lib.ModelTable) -> Tuple[np.ndarray, List[int]]:
  """Unit embeddings of the whole table, and the row count of each file."""
  parts = list(file_vectors(table))
  return np.concatenate(parts), [len(p) for p in parts]


def build_index(output_dir: str, model: str,
                exact_below: float = EXACT_BELOW_FLOATS,
                target_recall: float = TARGET_RECALL) -> dict:
  """Builds and writes the index of one embeddings table.

  Args:
    exact_below: rows x dims under which the index is exact.
    target_recall: Recall@10 the approximate index must reach.

  Returns:
    The index's description (what index.json holds).
  """
  import faiss  # pylint: disable=import-outside-toplevel
  table = _embedder_table(output_dir, model)
  start = time.perf_counter()
  counts = [tables_lib.file_rows(f.path) for f in table.files]
  n, d = sum(counts), table.schema().field("embedding").type.list_size
  if n == 0:
    raise SearchError(f"the {model} table has no rows to index")
  meta = {
      "model": model, "rows": int(n), "dims": int(d),
      "metric": "cosine (inner product of unit vectors)",
      "exact_below_floats": int(exact_below),
      "files": [dict(f, rows=c) for f, c in zip(_file_list(table), counts)],
      "version": transforms.__version__,
      "built": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
  }
  folder = FileSystems.join(table.root, INDEX_DIR)
  if "://" not in folder and not storage.exists(folder):
    FileSystems.mkdirs(folder)  # object stores need no folders
  if n * d < exact_below:
    vectors, _ = read_vectors(table)
    index = faiss.IndexFlatIP(d)
    index.add(vectors)
    meta.update(kind="exact", factory="Flat", recall_at_10=1.0)
    storage.write_bytes(FileSystems.join(folder, INDEX_FILE),
                        faiss.serialize_index(index).tobytes())
  else:
    workdir = tempfile.mkdtemp(prefix="natvision-index-")
    try:
      index, info = index_disk.build_on_disk(
          lambda: file_vectors(table), counts, d, workdir, target_recall,
          RECALL_QUERIES, TRAIN_PER_LIST, RECALL_K, tune_nprobe)
      faiss.write_index(index, os.path.join(workdir, INDEX_FILE))
      del index  # unmaps index.ivfdata
      for name in (INDEX_FILE, index_disk.IVFDATA_FILE):
        with storage.failing_as("writing", folder), open(
            os.path.join(workdir, name), "rb") as source, FileSystems.create(
                FileSystems.join(folder, name)) as target:
          index_disk.copy_file(source, target)
    finally:
      shutil.rmtree(workdir, ignore_errors=True)
    meta.update(kind="approximate", factory=f"IVF{info['nlist']},Flat",
                nlist=info["nlist"], nprobe=info["nprobe"],
                recall_at_10=round(info["recall_at_10"], 4),
                recall_queries=info["queries"], target_recall=target_recall,
                on_disk=index_disk.IVFDATA_FILE)
  meta["build_seconds"] = round(time.perf_counter() - start, 3)
  with FileSystems.create(FileSystems.join(folder, INDEX_META)) as f:
    f.write(json.dumps(meta, indent=2).encode())
  return meta


@dataclasses.dataclass
class Searcher:
  """An embeddings table with its index, ready for queries.

  Attributes:
    table: the table.
    index: a FAISS index over its unit vectors, rows in file order.
    meta: index.json (or a description of the in-memory index).
    counts: rows per file, in the table's file order.
  """

  table: tables_lib.ModelTable
  index: object
  meta: dict
  counts: List[int]

  def search(self, queries: np.ndarray, k: int
             ) -> Tuple[np.ndarray, np.ndarray]:
    """(scores, rows), each ``[q, k]``, best first; rows -1 when fewer."""
    return self.index.search(unit_rows(queries), min(k, self.index.ntotal))

  def rows(self, ids: Sequence[int], columns: Optional[Sequence[str]] = None
           ) -> List[dict]:
    """The table rows at global positions ``ids`` (without embeddings)."""
    ids = [int(i) for i in ids]
    offsets = np.cumsum([0] + self.counts)
    found: Dict[int, dict] = {}
    for f, table_file in enumerate(self.table.files):
      local = [i - offsets[f] for i in ids if offsets[f] <= i < offsets[f + 1]]
      if not local:
        continue
      data = tables_lib.read_files([table_file], columns)
      data = data.drop_columns([c for c in ("embedding",)
                                if c in data.column_names])
      for i, row in zip(local, data.take(pa.array(local)).to_pylist()):
        found[int(i + offsets[f])] = row
    return [found[i] for i in ids]

  def position_of(self, image_id: str) -> Optional[int]:
    offset = 0
    for table_file, count in zip(self.table.files, self.counts):
      ids = tables_lib.read_files([table_file], ["image_id"]).column(
          "image_id").to_pylist()
      if image_id in ids:
        return offset + ids.index(image_id)
      offset += count
    return None

  def vector_at(self, position: int) -> np.ndarray:
    offsets = np.cumsum([0] + self.counts)
    f = int(np.searchsorted(offsets, position, side="right") - 1)
    column = tables_lib.read_files([self.table.files[f]], ["embedding"]).column(
        "embedding")
    return np.asarray(column[int(position - offsets[f])].as_py(), np.float32)


def _read_index(path: str, on_disk: Optional[str] = None):
  """The index file, memory-mapped rather than read into memory.

  An exact index is read with FAISS's ``IO_FLAG_MMAP_IFC``: its vectors stay
  in the file and the operating system pages in what a query touches.  An
  approximate one keeps its inverted lists in ``on_disk`` (``index.ivfdata``,
  tools/index_disk.py) next to ``index.faiss``, which FAISS maps when it
  opens the index (``IO_FLAG_ONDISK_SAME_DIR``).  Either way the process's
  memory holds the quantizer and bookkeeping and the vectors cost page
  cache, which the kernel can drop, not heap (benchmarks/label.py measures
  it).  Files in a bucket are first copied to a local temporary folder, in
  chunks, which is removed once they are mapped.  A FAISS without
  ``IO_FLAG_MMAP_IFC`` reads an exact index into memory.

  Raises:
    storage.StorageError: the read or the copy failed.
  """
  import faiss  # pylint: disable=import-outside-toplevel
  flag = (faiss.IO_FLAG_ONDISK_SAME_DIR if on_disk else
          getattr(faiss, "IO_FLAG_MMAP_IFC", None))
  if flag is None:
    data = storage.read_bytes(path)
    return faiss.deserialize_index(np.frombuffer(data, np.uint8))
  if "://" not in path:
    try:
      with index_disk.quiet_stdout():  # "updating ondisk filename"
        return faiss.read_index(path, flag)
    except RuntimeError as e:
      raise storage.StorageError(f"reading {path} failed: {e}") from e
  workdir = tempfile.mkdtemp(prefix="natvision-index-")
  try:
    folder = path.rsplit("/", 1)[0]
    for name in (INDEX_FILE,) + ((on_disk,) if on_disk else ()):
      with storage.failing_as("reading", FileSystems.join(folder, name)):
        with FileSystems.open(FileSystems.join(folder, name)) as source, open(
            os.path.join(workdir, name), "wb") as target:
          index_disk.copy_file(source, target)
    with index_disk.quiet_stdout():
      return faiss.read_index(os.path.join(workdir, INDEX_FILE), flag)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)  # the mappings outlive names


def open_searcher(output_dir: str, model: str) -> Searcher:
  """The table's index, or an exact one built in memory when there is none.

  Raises:
    SearchError: the index was built from other files than the table has
      now (rebuild it with natvision-index).
  """
  import faiss  # pylint: disable=import-outside-toplevel
  table = _embedder_table(output_dir, model)
  folder = FileSystems.join(table.root, INDEX_DIR)
  meta_path = FileSystems.join(folder, INDEX_META)
  if not storage.exists(meta_path):
    logging.warning("no index of %s under %s: searching exactly in memory "
                    "(run natvision-index --output_dir %s --model %s once)",
                    model, table.root, output_dir, model)
    vectors, counts = read_vectors(table)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return Searcher(table, index, {"kind": "exact", "factory": "Flat",
                                   "in_memory": True}, counts)
  meta = json.loads(storage.read_bytes(meta_path))
  now = [(f["path"], f["size"]) for f in _file_list(table)]
  then = [(f["path"], f["size"]) for f in meta["files"]]
  if now != then:
    raise SearchError(
        f"the index in {folder} was built from other files than the {model} "
        f"table holds now (a later run rewrote or added to it); rebuild it: "
        f"natvision-index --output_dir {output_dir} --model {model}")
  index = _read_index(FileSystems.join(folder, INDEX_FILE),
                      meta.get("on_disk"))
  if meta.get("nprobe"):
    index.nprobe = int(meta["nprobe"])
  return Searcher(table, index, meta, [f["rows"] for f in meta["files"]])
