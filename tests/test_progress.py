"""Progress lines: counted per photo, emitted at most every interval."""

from transforms import progress


def test_reports_every_interval_with_total_and_rate():
  now = [100.0]
  lines = []
  bar = progress.Progress(interval=5, clock=lambda: now[0], emit=lines.append)
  bar.expected_total = 40
  for _ in range(10):
    bar.tick()
    now[0] += 1.0
  assert len(lines) == 1
  assert lines[0].startswith("progress: 6 of 40 photos (15%)")
  assert "1.2 photos/s" in lines[0]


def test_without_total_says_photos_only():
  now = [0.0]
  bar = progress.Progress(interval=1, clock=lambda: now[0], emit=None)
  bar.tick()
  now[0] = 2.0
  assert bar.line() == "progress: 1 photos, 0.5 photos/s, elapsed 2s"
