"""natvision-index and natvision-search: nearest photos in an embeddings table.

    natvision-index  --output_dir OUT --model inaturalist_v2
    natvision-search --output_dir OUT --model inaturalist_v2 \\
        (--photo PATH_OR_URI | --image_id ID) [--k 10] [--json]
    natvision-search --output_dir OUT --model inaturalist_v2 \\
        --duplicates --threshold 0.98

The index lives next to the table, in ``OUT/embeddings/<model>/_index/``
(``index.faiss`` and ``index.json``; readers of the table skip folders whose
names start with ``_``).  Vectors are scaled to unit length, so the inner
product FAISS ranks by is the cosine similarity.  Below
``EXACT_BELOW_FLOATS`` floats (rows times dimensions) the index is exact
(``IndexFlatIP``); above, it is an inverted file (``IVF<nlist>,Flat``) whose
``nprobe`` is raised until its Recall@10 against the exact search, measured
on a sample of the table's own rows, reaches ``TARGET_RECALL``; the recall
reached is recorded in ``index.json``.  The index remembers which files (and
sizes) it was built from, in which order; a table rewritten since then is
refused with a message to rebuild.  Without an index, search builds an exact
one in memory.

A ``--photo`` is embedded exactly as the table's recorded run spec
(``transforms.spec.RunSpec``, in each file's metadata) says: read, decoded
and prepared by ``transforms.photos`` with the run's colour handling and the
model's preparation, and run by ``transforms.inference`` on the recorded
runtime and precision (TensorFlow, ONNX Runtime in fp32, or the job's own
int8 file); the model is found where the spec says, or under
``--model_root`` / ``--model_handle``, and must have the recorded
fingerprint.  A table without a spec is not searched by photo.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from natvision import transforms
from natvision.transforms import console
from natvision.transforms import extras
from natvision.transforms import helptext
from natvision.transforms import models as models_lib
from natvision.transforms import sinks
from natvision.transforms import spec as spec_lib
from natvision.transforms import storage
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
SEARCH_CHUNK = 4096


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
  nprobe, recall = 1, 0.0
  while True:
    index.nprobe = nprobe
    _, found = index.search(q, k)
    recall = _recall(found, truth)
    if recall >= target_recall or nprobe >= nlist:
      break
    nprobe = min(nprobe * 2, nlist)
  return index, {"nlist": nlist, "nprobe": nprobe, "recall_at_10": recall,
                 "queries": int(len(q))}


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


def read_vectors(table: tables_lib.ModelTable) -> Tuple[np.ndarray, List[int]]:
  """Unit embeddings of the whole table, and the row count of each file."""
  parts, counts = [], []
  for table_file in table.files:
    column = tables_lib.read_files([table_file], ["embedding"]).column(
        "embedding").combine_chunks()
    width = column.type.list_size
    parts.append(column.flatten().to_numpy(zero_copy_only=False).reshape(
        -1, width))
    counts.append(len(column))
  return unit_rows(np.concatenate(parts)), counts


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
  vectors, counts = read_vectors(table)
  n, d = vectors.shape
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
  if n * d < exact_below:
    index = faiss.IndexFlatIP(d)
    index.add(vectors)
    meta.update(kind="exact", factory="Flat", recall_at_10=1.0)
  else:
    index, info = build_approximate(vectors, target_recall)
    meta.update(kind="approximate", factory=f"IVF{info['nlist']},Flat",
                nlist=info["nlist"], nprobe=info["nprobe"],
                recall_at_10=round(info["recall_at_10"], 4),
                recall_queries=info["queries"], target_recall=target_recall)
  meta["build_seconds"] = round(time.perf_counter() - start, 3)
  folder = FileSystems.join(table.root, INDEX_DIR)
  if "://" not in folder and not storage.exists(folder):
    FileSystems.mkdirs(folder)  # object stores need no folders
  with FileSystems.create(FileSystems.join(folder, INDEX_FILE)) as f:
    f.write(faiss.serialize_index(index).tobytes())
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
  data = storage.read_bytes(FileSystems.join(folder, INDEX_FILE))
  index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
  if meta.get("nprobe"):
    index.nprobe = int(meta["nprobe"])
  return Searcher(table, index, meta, [f["rows"] for f in meta["files"]])


def table_spec(table: tables_lib.ModelTable) -> spec_lib.RunSpec:
  """The run spec the table's first file records.

  Raises:
    SearchError: the table records no spec (an older natvision wrote it)
      or one that cannot be read.
  """
  try:
    run = sinks.recorded_spec(table.schema())
  except spec_lib.SpecError as e:
    raise SearchError(f"the {table.name} table's run spec in "
                      f"{table.files[0].path} cannot be read: {e}") from e
  if run is None:
    raise SearchError(
        f"the {table.name} table ({table.files[0].path}) records no run spec "
        f"(an older natvision wrote it), so how its rows were made is not "
        f"known; run natvision-embed again to search it by photo")
  return run


def embed_photo(uri: str, table: tables_lib.ModelTable,
                model_root: Optional[str] = None,
                handles: Optional[Dict[str, str]] = None,
                runtime: Optional[str] = None) -> np.ndarray:
  """Embeds one photo exactly as the table's recorded run spec says.

  The photo is read, decoded (with the run's colour-profile handling and
  size limits) and prepared (the model's policy and input size) by
  ``transforms.photos.read_decode_prepare``, and run by
  ``transforms.inference.load_shared`` on the recorded runtime and
  precision: TensorFlow, ONNX Runtime in fp32 (found by the model files'
  fingerprint, checked against TensorFlow as a job's launcher checks it),
  or the very int8 file the job ran (its precision and fingerprint checked).
  The model's files, where they are read (fp32), must have the recorded
  fingerprint.  The result equals the photo's row in the table within the
  spec's ``tolerance`` (``runtimes.output_difference``).

  Args:
    uri: the photo's path or URI.
    table: the embeddings table.
    model_root, handles: where to find the model instead of the recorded
      location (``--model_root``, ``--model_handle``).
    runtime: ``tf`` or ``onnx`` in fp32 instead of the recorded runtime
      and precision (the result is then the fp32 model's, not the table's).

  Returns:
    float32 ``[width]``, the model's raw output.

  Raises:
    SearchError: the table records no spec; the photo cannot be read,
      decoded or prepared; the model cannot be found, loaded or is not the
      one that made the table; the recorded int8 file cannot be found or
      is not that file (the message names it).
  """
  # pylint: disable=import-outside-toplevel
  from natvision.transforms import decode as decode_lib
  from natvision.transforms import inference
  from natvision.transforms import photos
  from natvision.transforms import runtimes
  from natvision.transforms.records import ErrorRecord, ImageRef
  from natvision.transforms.runtimes import base
  from natvision.transforms.runtimes import chooser
  # pylint: enable=import-outside-toplevel
  run = table_spec(table)
  decided = run.model(table.name)
  handles = dict(handles or {})
  if table.name not in handles and not model_root:
    handles[table.name] = decided.location
  # An explicit runtime runs fp32; otherwise the recorded runtime and
  # precision.
  int8 = runtime is None and decided.precision == runtimes.INT8
  runtime = runtime or decided.runtime
  try:
    resolved = models_lib.resolve_models(
        [table.name], model_root, handles=handles, resize=decided.resize,
        requested_runtime=runtime)[0]
  except models_lib.ModelError as e:
    raise SearchError(str(e)) from e
  if resolved.spec.input_size != decided.input_size:
    raise SearchError(
        f"the {table.name} table was made at input size {decided.input_size}, "
        f"the registry's {table.name} takes {resolved.spec.input_size}")
  config = photos.PhotoConfig(
      policies=(decided.resize,), size=decided.input_size,
      color_profile=run.color_profile, max_file_bytes=run.max_file_bytes,
      max_pixels=run.max_pixels)
  min_side = decode_lib.decoded_size_needed(config.policies, config.size)
  prepared, _ = photos.read_decode_prepare(
      ImageRef(image_id="query", uri=uri), config, min_side)
  if isinstance(prepared, ErrorRecord):
    raise SearchError(f"--photo {uri}: {prepared.stage} failed: "
                      f"{prepared.error}")
  try:
    if int8:
      # The int8 file the job ran: OnnxRuntime opens it and refuses it
      # unless it records int8 and the table's fingerprint.
      resolved = resolved.with_decision(runtimes.RuntimeDecision(
          runtimes.RUNTIME_ONNX, note="int8, as the table's spec records",
          precision=runtimes.INT8, onnx_path=decided.int8_file,
          onnx_source="recorded", fingerprint=decided.fingerprint))
    else:
      found = base.model_fingerprint(models_lib.stage_locally(resolved.path))
      if found != decided.fingerprint:
        raise SearchError(
            f"the model files at {resolved.path} (fingerprint {found}) are "
            f"not those that made the {table.name} table (fingerprint "
            f"{decided.fingerprint}); pass --model_root or --model_handle "
            f"{table.name}=PATH naming them")
      if runtime == runtimes.RUNTIME_TF:
        resolved = resolved.with_decision(runtimes.RuntimeDecision(
            runtimes.RUNTIME_TF, note="TensorFlow, as the table's spec "
            "records", fingerprint=found))
      else:
        resolved = chooser.decided(resolved, timing_runs=0)
    model = inference.load_shared(resolved).model
  except models_lib.ModelError as e:
    if int8:
      raise SearchError(
          f"the {table.name} table was made in int8 by {decided.int8_file}, "
          f"which cannot be used here: {e}") from e
    raise SearchError(f"{e} (pass --model_root or --model_handle "
                      f"{table.name}=PATH)") from e
  return model.predict(prepared.arrays[decided.resize][None])[0]


@dataclasses.dataclass(frozen=True)
class Hit:
  """One result: its rank, cosine score and table row (no embedding)."""

  rank: int
  score: float
  row: dict


def search_photo(searcher: Searcher, k: int, image_id: Optional[str] = None,
                 vector: Optional[np.ndarray] = None) -> List[Hit]:
  """The k rows nearest to a table row (by image_id) or to a vector.

  A query by image_id puts that photo first (an approximate index that
  missed it, or an identical photo that tied with it, cannot push it down).

  Raises:
    SearchError: no row with that image_id.
  """
  own = None
  if image_id is not None:
    own = searcher.position_of(image_id)
    if own is None:
      raise SearchError(f"no row with image_id {image_id!r} in the "
                        f"{searcher.table.name} table")
    vector = searcher.vector_at(own)
  scores, ids = searcher.search(np.asarray(vector, np.float32)[None], k)
  pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
  if own is not None:
    own_score = float(unit_rows(vector[None])[0] @ unit_rows(vector[None])[0])
    pairs = [(own, own_score)] + [p for p in pairs if p[0] != own]
    pairs = pairs[:k]
  rows = searcher.rows([i for i, _ in pairs])
  return [Hit(rank=r + 1, score=s, row=row)
          for r, ((_, s), row) in enumerate(zip(pairs, rows))]


def find_duplicates(searcher: Searcher, threshold: float
                    ) -> List[Tuple[float, dict, dict]]:
  """Pairs of photos whose cosine similarity is at least ``threshold``.

  Returns:
    (score, row_a, row_b) with row_a before row_b in the table, highest
    score first.
  """
  import faiss  # pylint: disable=import-outside-toplevel
  vectors, _ = read_vectors(searcher.table)
  pairs = []
  for start in range(0, len(vectors), SEARCH_CHUNK):
    chunk = vectors[start:start + SEARCH_CHUNK]
    if isinstance(searcher.index, faiss.IndexIVF):
      searcher.index.nprobe = max(searcher.index.nprobe,
                                  int(searcher.meta.get("nprobe") or 1))
    lims, dist, ids = searcher.index.range_search(chunk, float(threshold))
    for q in range(len(chunk)):
      a = start + q
      for j in range(lims[q], lims[q + 1]):
        b = int(ids[j])
        if b > a:
          pairs.append((float(dist[j]), a, b))
  pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
  rows = searcher.rows(sorted({i for _, a, b in pairs for i in (a, b)}))
  by_id = dict(zip(sorted({i for _, a, b in pairs for i in (a, b)}), rows))
  return [(s, by_id[a], by_id[b]) for s, a, b in pairs]


# --------------------------------------------------------------------------
# Output.


def _plain(value):
  if isinstance(value, (datetime.date, datetime.datetime)):
    return value.isoformat()
  if isinstance(value, float):
    return round(value, 6)
  return value


def hit_record(hit: Hit) -> dict:
  record = {"rank": hit.rank, "image_id": hit.row.get("image_id"),
            "uri": hit.row.get("uri"), "score": round(hit.score, 6)}
  for name, value in hit.row.items():
    if name not in record and name not in tables_lib.MODEL_COLUMNS:
      record[name] = _plain(value)
  return record


def format_rows(records: Sequence[dict]) -> str:
  """Records as an aligned text table (one header line)."""
  if not records:
    return "(no results)"
  names = list(records[0])
  cells = [[("" if r.get(n) is None else
             f"{r[n]:.4f}" if isinstance(r.get(n), float) else str(r[n]))
            for n in names] for r in records]
  widths = [max(len(n), *(len(c[i]) for c in cells))
            for i, n in enumerate(names)]
  lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths))]
  lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths))
            for row in cells]
  return "\n".join(line.rstrip() for line in lines)


def _emit(records: Sequence[dict], as_json: bool) -> None:
  if as_json:
    for record in records:
      print(json.dumps(record, ensure_ascii=False, default=str))
  else:
    print(format_rows(records))


# --------------------------------------------------------------------------
# Commands.


OUTPUT_DIR_HELP = ("the --output_dir of the natvision-embed or natvision-ingest "
                   "run whose tables are searched (local or gs://)")


def index_parser() -> argparse.ArgumentParser:
  """natvision-index's flags."""
  p = argparse.ArgumentParser(
      prog="natvision-index",
      formatter_class=helptext.HelpFormatter,
      description="Build a nearest-neighbour index of one model's embeddings "
      "table, next to the table (OUT/embeddings/<model>/_index/), so that "
      "natvision-search answers from it instead of scanning every row. A "
      "small table gets an exact index; a large one an approximate index "
      "tuned to reach --target_recall.",
      epilog=helptext.epilog([
          "natvision-index --output_dir out --model inaturalist_v2"]))
  p.add_argument("--output_dir", required=True, help=OUTPUT_DIR_HELP)
  p.add_argument("--model", required=True, help="an embedder's name")
  p.add_argument("--exact_below", type=float, default=EXACT_BELOW_FLOATS,
                 help="rows x dims under which the index is exact (a "
                 "measured threshold)")
  p.add_argument("--target_recall", type=float, default=TARGET_RECALL,
                 help="Recall@10 an approximate index must reach")
  return p


def index_main(argv: Optional[Sequence[str]] = None) -> int:
  """natvision-index: builds OUT/embeddings/<model>/_index/."""
  args = index_parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  status = extras.check_command("tools", "natvision-index")
  if status is not None:
    return status
  try:
    meta = build_index(args.output_dir, args.model, args.exact_below,
                       args.target_recall)
  except (SearchError, tables_lib.TableError) as e:
    print(f"natvision-index: error: {e}", file=sys.stderr)
    return 2
  recall = ("" if meta["kind"] == "exact" else
            f", nprobe {meta['nprobe']}, Recall@10 {meta['recall_at_10']:.3f} "
            f"on {meta['recall_queries']} queries")
  print(f"{args.model}: {meta['kind']} index ({meta['factory']}) of "
        f"{meta['rows']} rows x {meta['dims']} dims{recall}, built in "
        f"{meta['build_seconds']:.1f}s")
  return 0


def parser() -> argparse.ArgumentParser:
  """natvision-search's flags."""
  p = argparse.ArgumentParser(
      prog="natvision-search",
      formatter_class=helptext.HelpFormatter,
      description="Print the k rows of an embeddings table nearest to a "
      "photo (cosine similarity), or pairs of near-duplicate photos. The "
      "query is a photo, embedded here with the model the table records, "
      "or a row of the table; the answer comes from the table's index "
      "(natvision-index) when there is one, else from every row. One of "
      "--photo, --image_id and --duplicates is required.",
      epilog=helptext.epilog([
          "natvision-search --output_dir out --model inaturalist_v2 "
          "--photo cat.jpg --k 5",
          "natvision-search --output_dir out --model inaturalist_v2 "
          "--duplicates --threshold 0.98"]))
  p.add_argument("--output_dir", required=True, help=OUTPUT_DIR_HELP)
  p.add_argument("--model", required=True, help="an embedder's name")
  query = p.add_mutually_exclusive_group(required=True)
  query.add_argument("--photo", help="a photo file or URI to embed and "
                     "search (one of the three is required)")
  query.add_argument("--image_id", help="a row of the table to search from "
                     "(one of the three is required)")
  query.add_argument("--duplicates", action="store_true",
                     help="list pairs with cosine similarity >= --threshold "
                     "(one of the three is required)")
  p.add_argument("--threshold", type=float,
                 help="with --duplicates: the cosine similarity, e.g. 0.98")
  p.add_argument("--k", type=int, default=10, help="rows to print")
  p.add_argument("--json", action="store_true",
                 help="one JSON object per line")
  p.add_argument("--model_root",
                 help="with --photo: folder holding <model>/ (default: where "
                 "the table's metadata says the model was)")
  p.add_argument("--model_handle", action="append", default=[],
                 metavar="NAME=PATH", help="with --photo: the model's folder")
  p.add_argument("--runtime", choices=("tf", "onnx"),
                 help="with --photo: run the model in fp32 on this runtime "
                 "instead of the runtime and precision the table records")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  """natvision-search: the nearest rows to a photo, or duplicate pairs."""
  console.configure_logging()  # the jobs' quiet console
  p = parser()
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # --photo loads TF
  if args.k < 1:
    p.error("--k must be at least 1")
  if args.duplicates and args.threshold is None:
    p.error("--duplicates needs --threshold (a cosine similarity, e.g. 0.98)")
  status = extras.check_command("tools", "natvision-search")
  if status is not None:
    return status
  try:
    searcher = open_searcher(args.output_dir, args.model)
    if args.duplicates:
      records = [
          {"score": round(s, 6), "image_id_a": a.get("image_id"),
           "uri_a": a.get("uri"), "image_id_b": b.get("image_id"),
           "uri_b": b.get("uri")}
          for s, a, b in find_duplicates(searcher, args.threshold)]
    else:
      vector = None
      if args.photo:
        handles = {}
        for value in args.model_handle:
          name, sep, path = value.partition("=")
          if not sep:
            raise SearchError(f"--model_handle takes NAME=PATH, got {value!r}")
          handles[name.strip()] = path.strip()
        vector = embed_photo(args.photo, searcher.table, args.model_root,
                             handles, args.runtime)
      records = [hit_record(h) for h in search_photo(
          searcher, args.k, image_id=args.image_id, vector=vector)]
  except (SearchError, tables_lib.TableError) as e:
    print(f"natvision-search: error: {e}", file=sys.stderr)
    return 2
  _emit(records, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
