"""natvision-label against a large reference: memory and recall per index.

    python -m benchmarks.label [--rows 1000000] [--dims 64] [--queries 1000]
        [--workdir /tmp/natvision_label_bench] [--out benchmarks/label.json]

Writes a synthetic reference run (``--rows`` clustered unit vectors of
``--dims`` float32 in Parquet files of 100k rows, each row carrying its
cluster's species as ``taxon_id``; 10 species a genus) and a query run of
``--queries`` new photos of the same species, then labels the queries with
``tools.label.label_run`` once per way of holding the reference's vectors,
each in a fresh process:

* ``flat_heap``: no index, the exact one built in memory (the baseline: all
  vectors in the process's heap);
* ``flat_mmap``: an exact index written by ``build_index`` and memory-mapped;
* ``ivf_heap``: the IVF index ``build_index`` tunes to Recall@10 0.95, its
  inverted lists copied into memory;
* ``ivf_mmap``: the same index with its lists mapped (what ``open_searcher``
  does).

The two builds run in a fresh process too, with their peak anonymous
memory (the IVF one is built out of core, tools/index_disk.py).

Per variant: peak RSS (``VmHWM``: heap and touched file pages), the
peak of its anonymous part (``RssAnon`` sampled every 5 ms: the memory the
process cannot hand back), seconds, and Recall@10 of its neighbours against
``flat_heap``'s; the label agreement with the exact search and the share
labelled right at species and genus.  ``--data_limit_mb`` also runs
``flat_heap`` and ``ivf_mmap`` under ``RLIMIT_DATA`` (which counts the heap
and private mappings, not a read-only file mapping; 0 sets it to
``ivf_mmap``'s peak ``VmData`` plus half the vectors' size), below what the
flat vectors need: the flat one fails, the mapped one runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

MODEL = "bench_embedder"
FILE_ROWS = 100_000
SPECIES_PER_GENUS = 10
NOISE = 1.0
VARIANTS = ("flat_heap", "flat_mmap", "ivf_heap", "ivf_mmap")


def _clusters(rng, n, d, centres):
  species = rng.integers(0, len(centres), n)
  x = centres[species] + NOISE * rng.standard_normal((n, d))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(np.float32), species


def _write_run(run, ids, vectors, taxon_ids=None, start=0):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  folder = os.path.join(run, "embeddings", MODEL)
  os.makedirs(folder, exist_ok=True)
  d = vectors.shape[1]
  data = {"image_id": ids, "uri": [f"/photos/{i}.jpg" for i in ids],
          "model": [MODEL] * len(ids),
          "embedding": pa.FixedSizeListArray.from_arrays(
              pa.array(vectors.reshape(-1), pa.float32()), d)}
  if taxon_ids is not None:
    data["taxon_id"] = pa.array(taxon_ids, pa.int64())
  pq.write_table(pa.table(data), os.path.join(
      folder, f"part-{start // FILE_ROWS:05d}.parquet"))


def _species_taxon(s):
  return 100_000 + int(s)


def write_data(workdir, rows, dims, queries, seed=0):
  """The reference, its copy for the flat index, the queries, the taxa."""
  rng = np.random.default_rng(seed)
  n_species = max(SPECIES_PER_GENUS, int(np.sqrt(rows)))
  centres = rng.standard_normal((n_species, dims))
  ref = os.path.join(workdir, "ref_ivf")
  for start in range(0, rows, FILE_ROWS):
    n = min(FILE_ROWS, rows - start)
    x, species = _clusters(rng, n, dims, centres)
    _write_run(ref, [f"r{start + i}" for i in range(n)], x,
               [_species_taxon(s) for s in species], start)
  # The same files for the exact index (one index per table folder).
  for name in ("ref_flat", "ref_none"):
    folder = os.path.join(workdir, name, "embeddings", MODEL)
    os.makedirs(folder)
    for f in sorted(os.listdir(os.path.join(ref, "embeddings", MODEL))):
      os.symlink(os.path.join(ref, "embeddings", MODEL, f),
                 os.path.join(folder, f))
  x, species = _clusters(rng, queries, dims, centres)
  _write_run(os.path.join(workdir, "query"),
             [f"q{i}" for i in range(queries)], x)
  np.save(os.path.join(workdir, "query_species.npy"), species)
  lines = ["taxon_id\tancestry\trank_level\trank\tname\tactive",
           "1\t\t100\tstateofmatter\tLife\ttrue"]
  for g in range(-(-n_species // SPECIES_PER_GENUS)):
    lines.append(f"{10_000 + g}\t1\t20\tgenus\tGenus{g}\ttrue")
  for s in range(n_species):
    lines.append(f"{_species_taxon(s)}\t1/{10_000 + s // SPECIES_PER_GENUS}"
                 f"\t10\tspecies\tGenus{s // SPECIES_PER_GENUS} s{s}\ttrue")
  with open(os.path.join(workdir, "taxa.tsv"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def build_indexes(workdir):
  """Both indexes, each build's peak anon memory sampled (in this process:
  run it in a fresh one, ``--child build``)."""
  from natvision.tools import index as index_lib  # pylint: disable=import-outside-toplevel
  importlib.import_module("faiss")  # in anon_before_mb, as in child()
  out = {}
  for name, exact_below in (("ref_ivf", 0), ("ref_flat", 2 ** 62)):
    with _PeakAnon() as peak:
      meta = index_lib.build_index(os.path.join(workdir, name), MODEL,
                                   exact_below=exact_below)
    folder = os.path.join(workdir, name, "embeddings", MODEL, "_index")
    out[name] = dict(
        {k: meta.get(k) for k in ("factory", "nlist", "nprobe",
                                  "recall_at_10", "build_seconds")},
        peak_anon_mb=round(peak.peak / 1024, 1),
        anon_before_mb=round(peak.before / 1024, 1),
        index_mb=round(sum(os.path.getsize(os.path.join(folder, f))
                           for f in os.listdir(folder)) / 2 ** 20, 1))
  print(json.dumps(out))


class _PeakAnon:
  """Samples RssAnon every 5 ms in a thread while the block runs."""

  def __enter__(self):
    self.before = self.peak = _status_kb("RssAnon")
    self._done = threading.Event()

    def sample():
      while not self._done.wait(0.005):
        self.peak = max(self.peak, _status_kb("RssAnon"))
    self._thread = threading.Thread(target=sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._done.set()
    self._thread.join()
    self.peak = max(self.peak, _status_kb("RssAnon"))


def _status_kb(field):
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return 0


def child(variant, workdir):
  """One variant in this process; prints its JSON line."""
  import faiss  # pylint: disable=import-outside-toplevel
  from natvision.tools import index as index_lib  # pylint: disable=import-outside-toplevel
  from natvision.tools import label  # pylint: disable=import-outside-toplevel
  from natvision.tools import tables as tables_lib  # pylint: disable=import-outside-toplevel
  if variant == "ivf_heap":
    mapped = index_lib._read_index  # pylint: disable=protected-access

    def in_memory(path, on_disk=None):
      """The mapped lists copied into memory (ArrayInvertedLists)."""
      index = mapped(path, on_disk)
      lists = faiss.ArrayInvertedLists(index.nlist, index.code_size)
      for i in range(index.nlist):
        size = index.invlists.list_size(i)
        if size:
          lists.add_entries(i, size, index.invlists.get_ids(i),
                            index.invlists.get_codes(i))
      index.replace_invlists(lists, True)
      lists.this.disown()
      return index
    index_lib._read_index = in_memory  # pylint: disable=protected-access
  reference = os.path.join(workdir, {"flat_heap": "ref_none",
                                     "flat_mmap": "ref_flat"}.get(
                                         variant, "ref_ivf"))
  peak = {"anon": _status_kb("RssAnon"), "data": _status_kb("VmData")}
  done = threading.Event()

  def sample():
    while not done.wait(0.005):
      peak["anon"] = max(peak["anon"], _status_kb("RssAnon"))
      peak["data"] = max(peak["data"], _status_kb("VmData"))
  threading.Thread(target=sample, daemon=True).start()
  # The libraries the run imports on the way, imported first so that
  # anon_before_mb holds them and the rest is the run's own.
  for name in ("scipy.sparse", "pyarrow.compute",
               "natvision.transforms.taxonomy"):
    importlib.import_module(name)
  tables_lib.find_models(workdir)  # Beam's filesystems, loaded
  base_anon = _status_kb("RssAnon")
  start = time.perf_counter()
  out = os.path.join(workdir, f"labels_{variant}.parquet")
  summary = label.label_run(os.path.join(workdir, "query"), reference, MODEL,
                            os.path.join(workdir, "taxa.tsv"), k=10, out=out)
  seconds = time.perf_counter() - start
  done.set()
  peak["anon"] = max(peak["anon"], _status_kb("RssAnon"))
  # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child
  # would report its parent's peak.
  peak_rss = _status_kb("VmHWM")
  # The neighbours themselves, for Recall@10 against the exact search.
  searcher = index_lib.open_searcher(reference, MODEL)
  vectors = tables_lib.open_model_table(
      os.path.join(workdir, "query"), MODEL).read(["embedding"]).column(
          "embedding").combine_chunks()
  vectors = vectors.flatten().to_numpy().reshape(len(vectors), -1)
  _, rows = searcher.search(vectors, 10)
  np.save(os.path.join(workdir, f"neighbours_{variant}.npy"), rows)
  print(json.dumps({
      "variant": variant, "seconds": round(seconds, 2),
      "peak_rss_mb": round(peak_rss / 1024, 1),
      "peak_anon_mb": round(peak["anon"] / 1024, 1),
      "anon_before_mb": round(base_anon / 1024, 1),
      "peak_vmdata_mb": round(peak["data"] / 1024, 1),
      "answered": summary["answered"], "photos": summary["photos"],
      "index": summary["index"]}))


def _run_child(variant, workdir, data_limit_mb=None):
  env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="2")
  limit = int(data_limit_mb or 0) << 20
  pre = (lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
         ) if limit else None
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.label", "--child", variant,
       "--workdir", workdir], capture_output=True, text=True, env=env,
      preexec_fn=pre, check=False)
  if proc.returncode != 0 or variant == "build":
    if variant == "build" and proc.returncode == 0:
      return json.loads(proc.stdout.strip().splitlines()[-1])
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"variant": variant, "failed": tail[:200],
            "data_limit_mb": data_limit_mb}
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  if data_limit_mb:
    result["data_limit_mb"] = data_limit_mb
  return result


def _recall(found, truth):
  return float(np.mean([len(set(f) & set(t)) / truth.shape[1]
                        for f, t in zip(found, truth)]))


def compare(workdir, results):
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  truth = np.load(os.path.join(workdir, "neighbours_flat_heap.npy"))
  species = np.load(os.path.join(workdir, "query_species.npy"))
  exact = pq.read_table(os.path.join(
      workdir, "labels_flat_heap.parquet")).to_pylist()
  for result in results:
    variant = result["variant"]
    if "failed" in result or "data_limit_mb" in result:
      continue
    result["recall_at_10_vs_exact"] = round(_recall(np.load(os.path.join(
        workdir, f"neighbours_{variant}.npy")), truth), 4)
    rows = pq.read_table(os.path.join(
        workdir, f"labels_{variant}.parquet")).to_pylist()
    result["same_label_as_exact"] = round(float(np.mean(
        [a["taxon_id"] == b["taxon_id"] for a, b in zip(rows, exact)])), 4)
    want = {f"q{i}": _species_taxon(s) for i, s in enumerate(species)}
    genus = {f"q{i}": 10_000 + s // SPECIES_PER_GENUS
             for i, s in enumerate(species)}
    result["right_at_species"] = round(float(np.mean(
        [r["taxon_id"] == want[r["image_id"]] for r in rows])), 4)
    result["right_at_genus_or_species"] = round(float(np.mean(
        [r["taxon_id"] in (want[r["image_id"]], genus[r["image_id"]])
         for r in rows])), 4)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=1_000_000)
  p.add_argument("--dims", type=int, default=64)
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--workdir", default="/tmp/natvision_label_bench")
  p.add_argument("--out", default="benchmarks/label.json")
  p.add_argument("--data_limit_mb", type=int,
                 help="also run flat_heap and ivf_mmap under this RLIMIT_DATA "
                 "(0: ivf_mmap's peak VmData plus half the vectors' size)")
  p.add_argument("--reuse", action="store_true",
                 help="keep the data and indexes of an earlier run")
  p.add_argument("--child", choices=VARIANTS + ("build",),
                 help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child == "build":
    build_indexes(args.workdir)
    return 0
  if args.child:
    child(args.child, args.workdir)
    return 0
  if not args.reuse:
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    start = time.perf_counter()
    write_data(args.workdir, args.rows, args.dims, args.queries)
    print(f"data written in {time.perf_counter() - start:.0f}s", flush=True)
    built = _run_child("build", args.workdir)
    if "failed" in built:
      raise RuntimeError(f"building the indexes failed: {built['failed']}")
    with open(os.path.join(args.workdir, "built.json"), "w") as f:
      json.dump(built, f)
  with open(os.path.join(args.workdir, "built.json")) as f:
    built = json.load(f)
  print(json.dumps(built), flush=True)
  results = []
  for variant in VARIANTS:
    results.append(_run_child(variant, args.workdir))
    print(json.dumps(results[-1]), flush=True)
  if args.data_limit_mb is not None:
    limit = args.data_limit_mb or int(
        results[-1]["peak_vmdata_mb"] + args.rows * args.dims * 2 / 2 ** 20)
    for variant in ("flat_heap", "ivf_mmap"):
      results.append(_run_child(variant, args.workdir, limit))
      print(json.dumps(results[-1]), flush=True)
  compare(args.workdir, results)
  report = {"rows": args.rows, "dims": args.dims, "queries": args.queries,
            "vectors_mb": round(args.rows * args.dims * 4 / 2 ** 20, 1),
            "load": os.getloadavg(), "cpus": os.cpu_count(),
            "built": built, "results": results}
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  for r in results:
    print(json.dumps(r))
  return 0


if __name__ == "__main__":
  sys.exit(main())
