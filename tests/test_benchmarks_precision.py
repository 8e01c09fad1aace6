"""benchmarks/precision.py's pieces; no timing is asserted.

The in-run rate is read from the job's progress lines: photos between the
first and the last line over the seconds between them.
"""

from benchmarks import precision

LOG = """\
2026-11-30 08:51:55,000 INFO natvision.progress: progress: 80 of 384 photos (21%), 15.7 photos/s, elapsed 5s
2026-11-30 08:51:57,000 WARNING natvision: something else
2026-11-30 08:52:00,500 INFO natvision.progress: progress: 170 of 384 photos (44%), 15.8 photos/s, elapsed 11s
2026-11-30 08:52:11,000 INFO natvision.progress: progress: 336 of 384 photos (88%), 15.6 photos/s, elapsed 22s
natvision embed_images: 384 photo(s) in 26.7s (14.37 photos/s)
"""


def test_progress_rate_spans_the_first_and_last_line(tmp_path):
  log = tmp_path / "job.log"
  log.write_text(LOG)
  assert precision.progress_rate(str(log)) == (336 - 80) / 16.0
  log.write_text(LOG.splitlines()[0] + "\n")
  assert precision.progress_rate(str(log)) is None
