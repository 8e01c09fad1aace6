"""Where an approximate FAISS index starts to pay: the size natvision-index uses.

    python -m benchmarks.index_threshold [--dims 64,1536] [--max_floats 3e8]

For tables of n unit vectors of d dimensions (clustered random data, like
embeddings of many species), measures per-query latency of an exact search
(``IndexFlatIP``) and of an inverted-file index (``IVF<nlist>,Flat`` with
nlist about 4 sqrt(n), nprobe raised until Recall@10 against the exact
search reaches 0.95), and the IVF's training and adding time.  An exact
search costs n*d multiply-adds per query, so the crossing point is reported
in floats scanned (n*d): ``tools.index.EXACT_BELOW_FLOATS`` is set from it.

Prints one line per (d, n) and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from natvision.tools import index as index_lib


def clustered(n: int, d: int, seed: int) -> np.ndarray:
  """n unit vectors around sqrt(n) random centres, float32 ``[n, d]``."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((max(8, int(math.sqrt(n))), d))
  x = centres[rng.integers(0, len(centres), n)] + 1.2 * rng.standard_normal(
      (n, d))
  return index_lib.unit_rows(x)


def per_query_seconds(index, queries: np.ndarray, k: int = 10,
                      repeats: int = 3) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    index.search(queries, k)
    best = min(best, time.perf_counter() - start)
  return best / len(queries)


def measure(n: int, d: int, queries: int = 200) -> dict:
  import faiss  # pylint: disable=import-outside-toplevel
  x = clustered(n, d, seed=n + d)
  q = x[np.random.default_rng(1).choice(n, queries, replace=False)]
  flat = faiss.IndexFlatIP(d)
  flat.add(x)
  exact_s = per_query_seconds(flat, q)
  start = time.perf_counter()
  ivf, info = index_lib.build_approximate(x, target_recall=0.95)
  build_s = time.perf_counter() - start
  approx_s = per_query_seconds(ivf, q)
  return {"n": n, "d": d, "floats": n * d, "exact_ms": 1e3 * exact_s,
          "approx_ms": 1e3 * approx_s, "speedup": exact_s / approx_s,
          "build_s": build_s, "nlist": info["nlist"],
          "nprobe": info["nprobe"], "recall_at_10": info["recall_at_10"]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.index_threshold")
  p.add_argument("--dims", default="64,1536")
  p.add_argument("--max_floats", type=float, default=3e8,
                 help="largest n*d measured (memory: 4 bytes each, twice)")
  args = p.parse_args(argv)
  rows = []
  for d in (int(x) for x in args.dims.split(",")):
    n = 10_000
    while n * d <= args.max_floats:
      row = measure(n, d)
      rows.append(row)
      print(f"d={d:5d} n={n:8d} n*d={n * d:.1e}: exact {row['exact_ms']:.3f} "
            f"ms/query, IVF{row['nlist']} nprobe {row['nprobe']} "
            f"{row['approx_ms']:.3f} ms/query (x{row['speedup']:.1f}, "
            f"recall@10 {row['recall_at_10']:.3f}), build {row['build_s']:.1f}"
            f" s", flush=True)
      n *= 2
  print(json.dumps(rows, indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
