"""natvision-index and natvision-search: nearest photos in an embeddings table.

    natvision-index  --output_dir OUT --model inaturalist_v2
    natvision-search --output_dir OUT --model inaturalist_v2 \\
        (--photo PATH_OR_URI | --image_id ID) [--k 10] [--json]
    natvision-search --output_dir OUT --model inaturalist_v2 \\
        --duplicates --threshold 0.98

The index (its kind, where it lives, when it is stale) is tools/index.py's;
how a ``--photo`` is embedded (as the table's recorded run spec says) is
tools/query.py's.  This module decides the commands: their flags, a query
by image id (that photo first), duplicates above a threshold, and the
output (an aligned table, or JSON lines).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np

from natvision.transforms import console
from natvision.transforms import extras
from natvision.transforms import helptext
from natvision.tools import tables as tables_lib
from natvision.tools.index import (EXACT_BELOW_FLOATS, TARGET_RECALL, SearchError,
                         Searcher, build_index, open_searcher, read_vectors,
                         unit_rows)
from natvision.tools.query import embed_photo

SEARCH_CHUNK = 4096


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
  p = helptext.ArgumentParser(
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
  p = helptext.ArgumentParser(
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
