"""Run summaries of both jobs for the report's tests
(tests/test_run_summary.py, tests/test_report_sections.py): as the jobs
write them now (``version`` 2, one shape, ``embed_summary`` and
``ingest_summary``), and as they wrote them before (``*_v1``: embed's
``models`` a list with ``rows`` per table, ingest's ``models`` a dict of
counts with ``model_details``), which the readers still read."""

import dataclasses

from natvision.transforms import run_summary

DESCRIBED = {"name": "inaturalist_v2", "kind": "embedder", "runtime": "tf",
             "resize": "center_crop", "output_width": 64,
             "precision": "fp32"}
ERRORS = {"by_stage": {"read": 2}, "by_model": {"(before any model)": 2},
          "by_reason": {"read: HTTP 404 for <uri>": 2}, "total": 2,
          "photos": 2}
TIMINGS = {"commit": 0.1, "launch": 1.0, "pipeline": 3.0,
           "model_checks": 2.0}


def embed_summary_v1():
  """run.json's keys before version 2 (pipelines/embed_images.py)."""
  return {"run_id": "r1", "output_dir": "/out", "started": "s",
          "started_ts": 5.0, "ended": "e", "elapsed_s": 4.0, "inputs": 10,
          "images_per_second": 2.5,
          "models": [dict(DESCRIBED, standin=True)],
          "rows": {"embeddings/inaturalist_v2": 8}, "errors": ERRORS,
          "model_loads": {"inaturalist_v2": 1}, "timings": TIMINGS}


def ingest_summary_v1():
  """runs/<date>.json's keys before version 2."""
  return {"run_id": "r2", "output_dir": "/out", "snapshot_date": "2024-03-03",
          "partition": "snapshot_date=2024-03-03", "started": "s",
          "ended": "e", "elapsed_s": 4.0, "snapshot": {"photos": 12},
          "model_details": [DESCRIBED],
          "models": {"inaturalist_v2": {"table": "embeddings/inaturalist_v2",
                                        "new": 9, "done_before": 3,
                                        "held_back": 0, "rows": 8,
                                        "failed": 1, "route": None}},
          "errors": ERRORS, "model_loads": {"inaturalist_v2": 1},
          "timings": TIMINGS}


MODEL = run_summary.ModelSummary(
    name="inaturalist_v2", kind="embedder", runtime="tf",
    resize="center_crop", output_width=64, precision="fp32",
    table="embeddings/inaturalist_v2", rows=8)


def embed_summary():
  """run.json as natvision-embed writes it (``RunSummary.to_dict()``)."""
  return run_summary.RunSummary(
      job=run_summary.EMBED, run_id="r1", output_dir="/out", started="s",
      started_ts=5.0, ended="e", elapsed_s=4.0, inputs=10,
      images_per_second=2.5,
      models=(dataclasses.replace(MODEL, standin=True),),
      errors=run_summary.ErrorCounts.from_dict(ERRORS),
      model_loads={"inaturalist_v2": 1}, timings=dict(TIMINGS)).to_dict()


def ingest_summary():
  """runs/<date>.json as natvision-ingest writes it."""
  return run_summary.RunSummary(
      job=run_summary.INGEST, run_id="r2", output_dir="/out",
      snapshot_date="2024-03-03", partition="snapshot_date=2024-03-03",
      started="s", ended="e", elapsed_s=4.0, snapshot={"photos": 12},
      models=(dataclasses.replace(MODEL, new=9, done_before=3, held_back=0,
                                  failed=1),),
      errors=run_summary.ErrorCounts.from_dict(ERRORS),
      model_loads={"inaturalist_v2": 1}, timings=dict(TIMINGS)).to_dict()


def table_rows(report: dict) -> dict:
  """Rows per table (``embeddings/<model>``) of a summary's ``models``."""
  return {m["table"]: m["rows"] for m in report["models"].values()}
