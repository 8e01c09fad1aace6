"""Both jobs' summaries through one typed reader (tools/report_summary.py):
fields that mean the same are read the same; what only one job counts is
None for the other."""

import json

from natvision.transforms import commit
from natvision.tools import report_summary

DESCRIBED = {"name": "inaturalist_v2", "kind": "embedder", "runtime": "tf",
             "resize": "center_crop", "output_width": 64,
             "precision": "fp32"}
ERRORS = {"by_stage": {"read": 2}, "by_model": {"(before any model)": 2},
          "by_reason": {"read: HTTP 404 for <uri>": 2}, "total": 2,
          "photos": 2}
TIMINGS = {"commit": 0.1, "launch": 1.0, "pipeline": 3.0,
           "model_checks": 2.0}


def _embed():
  """run.json's keys (pipelines/embed_images.py, WriteSummary)."""
  return {"run_id": "r1", "output_dir": "/out", "started": "s",
          "started_ts": 5.0, "ended": "e", "elapsed_s": 4.0, "inputs": 10,
          "images_per_second": 2.5,
          "models": [dict(DESCRIBED, standin=True)],
          "rows": {"embeddings/inaturalist_v2": 8}, "errors": ERRORS,
          "model_loads": {"inaturalist_v2": 1}, "timings": TIMINGS}


def _ingest():
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


def test_both_jobs_read_the_same_where_the_fields_mean_the_same():
  embed = report_summary.RunSummary.from_dict(_embed())
  ingest = report_summary.RunSummary.from_dict(_ingest())
  assert (embed.job, ingest.job) == (report_summary.EMBED,
                                     report_summary.INGEST)
  for a, b in ((embed, ingest),):
    assert a.errors == b.errors and a.errors.total == 2
    assert a.timings == b.timings
    assert list(a.timings) == list(commit.TIMING_PHASES)  # phase order
    assert a.elapsed_s == b.elapsed_s and a.model_loads == b.model_loads
  e, i = embed.models[0], ingest.models[0]
  for field in ("name", "kind", "runtime", "preparation", "output_width",
                "precision", "rows"):
    assert getattr(e, field) == getattr(i, field), field
  assert e.rows == 8 and e.preparation == "center_crop"


def test_what_one_job_counts_is_none_for_the_other():
  embed = report_summary.RunSummary.from_dict(_embed())
  ingest = report_summary.RunSummary.from_dict(_ingest())
  assert (embed.photos, embed.photos_per_second) == (10, 2.5)
  assert (ingest.photos, ingest.photos_per_second) == (None, None)
  assert embed.partition is None
  assert ingest.partition == "snapshot_date=2024-03-03"
  assert (embed.models[0].new, embed.models[0].failed) == (None, None)
  assert (ingest.models[0].new, ingest.models[0].done_before,
          ingest.models[0].failed) == (9, 3, 1)
  assert embed.standin and not ingest.standin


def test_read_summary_reads_a_file_and_none_when_absent(tmp_path):
  path = tmp_path / "run.json"
  assert report_summary.read_summary(str(path)) is None
  path.write_text(json.dumps(_embed()))
  assert report_summary.read_summary(str(path)).run_id == "r1"
