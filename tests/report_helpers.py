"""Run summaries of both jobs, as their code writes them, for the report's
tests (tests/test_report_summary.py, tests/test_report_sections.py)."""

DESCRIBED = {"name": "inaturalist_v2", "kind": "embedder", "runtime": "tf",
             "resize": "center_crop", "output_width": 64,
             "precision": "fp32"}
ERRORS = {"by_stage": {"read": 2}, "by_model": {"(before any model)": 2},
          "by_reason": {"read: HTTP 404 for <uri>": 2}, "total": 2,
          "photos": 2}
TIMINGS = {"commit": 0.1, "launch": 1.0, "pipeline": 3.0,
           "model_checks": 2.0}


def embed_summary():
  """run.json's keys (pipelines/embed_images.py, WriteSummary)."""
  return {"run_id": "r1", "output_dir": "/out", "started": "s",
          "started_ts": 5.0, "ended": "e", "elapsed_s": 4.0, "inputs": 10,
          "images_per_second": 2.5,
          "models": [dict(DESCRIBED, standin=True)],
          "rows": {"embeddings/inaturalist_v2": 8}, "errors": ERRORS,
          "model_loads": {"inaturalist_v2": 1}, "timings": TIMINGS}


def ingest_summary():
  """runs/<date>.json's keys (pipelines/ingest_observations.py)."""
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
