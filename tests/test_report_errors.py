"""The errors table aggregated for the report in bounded memory
(tools/report_errors.py): the same counts as a whole-table count, read a
batch at a time, and, with a 1,000,000-row table, about the peak memory of
a 10,000-row one."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from natvision.transforms import summary as summary_lib
from natvision.tools import report_errors
from natvision.transforms import run_summary
from natvision.tools import tables as tables_lib

STAGES = ("read", "decode", "prepare", "inference")


def _write_errors(folder, rows, rows_per_file=100_000, row_group=10_000):
  """An errors table of ``rows`` rows in files of ``rows_per_file``, row
  groups of ``row_group`` (as the sinks write a bundle's rows), made with
  pyarrow's vectorised kernels.  Row i: stage STAGES[i % 4], four reasons
  per stage (i % 16), the URI in the message; the last row has a reason of
  its own.  Returns the TableFiles."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  for start in range(0, rows, rows_per_file):
    n = min(rows_per_file, rows - start)
    i = np.arange(start, start + n)
    ids = pc.binary_join_element_wise("id", pa.array(i.astype(str)), "")
    uris = pc.binary_join_element_wise("https://h.example.org/p/", ids,
                                       ".jpg", "")
    stage = pa.array(np.array(STAGES)[i % 4])
    codes = pa.array((i % 16).astype(str))
    error = pc.binary_join_element_wise("failure ", codes, " of ", uris, "")
    if start + n == rows:
      error = pa.concat_arrays([error.slice(0, n - 1),
                                pa.array(["the last one"])])
    model = pa.array(np.where(i % 2 == 0, "m1", None), pa.string())
    table = pa.table({"image_id": ids, "uri": uris, "model": model,
                      "stage": stage, "error": error})
    path = os.path.join(folder, f"part-{start:08d}.parquet")
    with pq.ParquetWriter(path, table.schema) as writer:
      for at in range(0, n, row_group):
        writer.write_table(table.slice(at, row_group))
    paths.append(path)
  return [tables_lib.TableFile(p) for p in paths]


def _naive(files):
  """Whole-table counts (the way the report counted before), to compare."""
  rows = pa.concat_tables(pq.read_table(f.path) for f in files).to_pylist()
  by_stage = collections.Counter(r["stage"] for r in rows)
  by_reason = collections.Counter(
      summary_lib.reason_of(r["stage"], r["error"], r["uri"]) for r in rows)
  by_model = collections.Counter(r["model"] or summary_lib.BEFORE_ANY_MODEL
                                 for r in rows)
  return rows, by_stage, by_reason, by_model


def test_a_scan_without_summary_counts_as_the_whole_table(tmp_path,
                                                          monkeypatch):
  files = _write_errors(str(tmp_path / "errors"), 2_000, rows_per_file=700,
                        row_group=300)
  rows, by_stage, by_reason, by_model = _naive(files)
  batches = []
  real = report_errors.iter_batches

  def spy(*args, **kwargs):
    for batch in real(*args, **kwargs):
      batches.append(batch.num_rows)
      yield batch

  monkeypatch.setattr(report_errors, "iter_batches", spy)
  got = report_errors.aggregate_errors(files, None, shown=5, batch_rows=128)
  assert max(batches) <= 128 and sum(batches) == len(rows)
  assert got.total == len(rows) and got.rows_scanned == len(rows)
  assert got.photos is None and not got.from_summary
  assert got.by_stage == dict(sorted(by_stage.items(),
                                     key=lambda kv: (-kv[1], kv[0])))
  assert got.by_model == dict(by_model)
  ranked = sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
  assert [(f"{r.stage}: {r.reason}", r.rows) for r in got.reasons] == (
      ranked[:5])
  assert got.more_reasons == len(ranked) - 5
  first = next(r for r in rows if summary_lib.reason_of(
      r["stage"], r["error"], r["uri"]) == ranked[0][0])
  assert got.reasons[0].examples[0].startswith(first["uri"])
  assert len(got.reasons[0].examples) == report_errors.EXAMPLES_PER_REASON


def test_with_a_summary_the_scan_stops_once_every_reason_has_examples(
    tmp_path):
  files = _write_errors(str(tmp_path / "errors"), 3_000, rows_per_file=1_000,
                        row_group=500)
  rows, by_stage, by_reason, by_model = _naive(files)
  counts = run_summary.ErrorCounts(
      total=len(rows), photos=len({r["image_id"] for r in rows}),
      by_stage=dict(by_stage), by_model=dict(by_model),
      by_reason=dict(by_reason.most_common(summary_lib.TOP_REASONS)))
  got = report_errors.aggregate_errors(files, counts, shown=4,
                                       batch_rows=100)
  assert got.from_summary and got.photos == len(rows)
  assert got.rows_scanned < len(rows)  # 4 reasons x 3 examples come early
  assert all(len(r.examples) == 3 for r in got.reasons)
  assert sum(by_stage.values()) == got.total


def _peak_in_child(folder, with_summary):
  """Peak RSS (bytes), peak traced Python memory and pyarrow's peak pool
  memory of one aggregate, in a fresh process."""
  code = f"""
import json, glob, resource, tracemalloc
import pyarrow as pa
from natvision.tools import report_errors
from natvision.transforms import run_summary
from natvision.tools import tables as tables_lib
files = [tables_lib.TableFile(p) for p in sorted(glob.glob({folder!r} + "/*.parquet"))]
counts = None
if {with_summary!r}:
  counts = run_summary.ErrorCounts(total=0, photos=0, by_stage={{}},
      by_model={{}}, by_reason={{"read: failure 0 of <uri>": 1,
                                "read: the last one": 1}})
  counts = counts.__class__(**dict(counts.__dict__, total=1))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
tracemalloc.start()
got = report_errors.aggregate_errors(files, counts)
traced = tracemalloc.get_traced_memory()[1]
print(json.dumps({{"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   "before": before, "traced": traced,
                   "pool": pa.default_memory_pool().max_memory(),
                   "scanned": got.rows_scanned, "total": got.total}}))
"""
  out = subprocess.run([sys.executable, "-c", code], check=True,
                       capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                           sys.path)))
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("with_summary", [False, True],
                         ids=["scan", "summary"])
def test_a_million_rows_take_about_the_memory_of_ten_thousand(
    tmp_path, with_summary):
  small = str(tmp_path / "small")
  large = str(tmp_path / "large")
  _write_errors(small, 10_000)
  _write_errors(large, 1_000_000)
  a = _peak_in_child(small, with_summary)
  b = _peak_in_child(large, with_summary)
  # Both read every row: the summary's rarest reason is the last row's.
  assert a["scanned"] == 10_000 and b["scanned"] == 1_000_000, (a, b)
  if not with_summary:
    assert b["total"] == 1_000_000
  mib = 1 << 20
  print(f"peak RSS {a['rss'] / mib:.0f} vs {b['rss'] / mib:.0f} MiB, "
        f"traced {a['traced'] / mib:.1f} vs {b['traced'] / mib:.1f} MiB, "
        f"pyarrow pool {a['pool'] / mib:.1f} vs {b['pool'] / mib:.1f} MiB")
  # Whole-table reading would hold the million rows: hundreds of MiB.
  assert b["rss"] - a["rss"] < 24 * mib, (a, b)
  assert b["traced"] < 1.5 * a["traced"] + mib, (a, b)
  assert b["pool"] < 2 * a["pool"] + 4 * mib, (a, b)
