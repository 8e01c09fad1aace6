"""Both jobs' summaries through one typed reader (tools/report_summary.py):
fields that mean the same are read the same; what only one job counts is
None for the other."""

import json

from natvision.transforms import commit
from natvision.tools import report_summary
from tests.report_helpers import embed_summary as _embed
from tests.report_helpers import ingest_summary as _ingest

def test_both_jobs_read_the_same_where_the_fields_mean_the_same():
  embed = report_summary.RunSummary.from_dict(_embed())
  ingest = report_summary.RunSummary.from_dict(_ingest())
  assert (embed.job, ingest.job) == (report_summary.EMBED,
                                     report_summary.INGEST)
  assert embed.errors == ingest.errors and embed.errors.total == 2
  assert embed.timings == ingest.timings
  assert list(embed.timings) == list(commit.TIMING_PHASES)  # phase order
  assert embed.elapsed_s == ingest.elapsed_s
  assert embed.model_loads == ingest.model_loads
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
