"""Peak memory of the report's size and model sections against table rows.

    python -m benchmarks.report_memory [--rows 100000,400000,1200000] [--dims 256]

For each row count it writes a classifier table (uri, label, score, source
sizes) and an embedder table (``--dims`` floats per row) in files of
100,000 rows (row groups of 10,000), then, each in a fresh process,
measures the peak RSS of

* ``bounded``: the sections as the report runs them
  (``report_sections.section_sizes``, ``report_models.section_classifier``
  and ``section_embedder``, tools/report_scan.py underneath);
* ``whole``: reading the same columns whole (``tables.read_files``), what
  the sections did before they read record batches — the baseline.

It prints one JSON line per measurement and the ratio of the largest to the
smallest table's peak for each, so the figures compare within one session
on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROWS_PER_FILE = 100_000
# Row groups of a bundle's size, as the sinks write them (a reader decodes
# a row group's column chunks at once, whatever its batch size).
ROW_GROUP_ROWS = 10_000

CHILD = """
import json, resource, sys
from natvision.tools import report_models, report_plots, report_sections
from natvision.tools import tables as tables_lib
out, mode = sys.argv[1], sys.argv[2]
c = tables_lib.open_model_table(out, "c")
e = tables_lib.open_model_table(out, "e")
if mode == "bounded":
  plots = report_plots.Plots()
  report_sections.section_sizes({"c": c}, plots, 200)
  report_models.section_classifier(c, plots)
  report_models.section_embedder(e, plots, None)
else:
  tables_lib.read_files(c.files, ["image_id", "uri", "source_width",
                                  "source_height"])
  tables_lib.read_files(c.files, ["uri", "label", "score"])
  tables_lib.read_files(e.files, ["embedding", "uri"])
print(json.dumps({"rss_mib": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_tables(out: str, rows: int, dims: int) -> None:
  rng = np.random.default_rng(0)
  for name, folder in (("c", "predictions"), ("e", "embeddings")):
    os.makedirs(os.path.join(out, folder, name), exist_ok=True)
  for start in range(0, rows, ROWS_PER_FILE):
    n = min(ROWS_PER_FILE, rows - start)
    ids = pc.binary_join_element_wise(
        "p", pa.array(np.arange(start, start + n).astype(str)), "")
    uris = pc.binary_join_element_wise("https://h.example.org/", ids, ".jpg",
                                       "")
    common = {"image_id": ids, "uri": uris,
              "source_width": rng.integers(100, 6000, n).astype(np.int32),
              "source_height": rng.integers(100, 6000, n).astype(np.int32)}
    labels = pa.array(np.char.add("label ", (rng.zipf(1.3, n) % 5000)
                                  .astype(str)))
    pq.write_table(pa.table(dict(common, label=labels,
                                 label_id=rng.integers(0, 5000, n),
                                 score=rng.random(n))),
                   os.path.join(out, "predictions", "c",
                                f"part-{start:09d}.parquet"),
                   row_group_size=ROW_GROUP_ROWS)
    flat = pa.array(rng.normal(size=n * dims).astype(np.float32))
    pq.write_table(pa.table(dict(common, embedding=pa.FixedSizeListArray
                                 .from_arrays(flat, dims))),
                   os.path.join(out, "embeddings", "e",
                                f"part-{start:09d}.parquet"),
                   row_group_size=ROW_GROUP_ROWS)


def measure(out: str, mode: str) -> float:
  done = subprocess.run([sys.executable, "-c", CHILD, out, mode], check=True,
                        capture_output=True, text=True,
                        env=dict(os.environ,
                                 PYTHONPATH=os.pathsep.join(sys.path)))
  return json.loads(done.stdout.strip().splitlines()[-1])["rss_mib"]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", default="100000,400000,1200000",
                      help="row counts, comma-separated")
  parser.add_argument("--dims", type=int, default=256,
                      help="floats per embedding")
  args = parser.parse_args(argv)
  counts = [int(r) for r in args.rows.split(",")]
  peaks = {"bounded": [], "whole": []}
  with tempfile.TemporaryDirectory() as work:
    for rows in counts:
      out = os.path.join(work, str(rows))
      write_tables(out, rows, args.dims)
      for mode in peaks:
        peak = measure(out, mode)
        peaks[mode].append(peak)
        print(json.dumps({"rows": rows, "dims": args.dims, "mode": mode,
                          "peak_rss_mib": round(peak, 1)}), flush=True)
  for mode, values in peaks.items():
    print(f"{mode}: peak RSS {values[0]:.0f} -> {values[-1]:.0f} MiB "
          f"({values[-1] / values[0]:.2f}x for {counts[-1] / counts[0]:.0f}x "
          f"the rows)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
