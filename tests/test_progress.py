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


def test_names_photos_in_flight_over_30_s_even_when_none_completes():
  now = [0.0]
  lines = []
  bar = progress.Progress(interval=5, clock=lambda: now[0], emit=lines.append)
  slow = bar.started("https://slow.example.org/a.jpg")
  now[0] = 10.0
  slower = bar.started("https://slow.example.org/b.jpg")
  quick = bar.started("https://fast.example.org/c.jpg")
  now[0] = 30.0
  bar.finished(quick)
  bar.tick(0)  # what the photo stage does while it waits
  now[0] = 36.0
  bar.tick(0)
  assert len(lines) == 1
  assert lines[0].endswith("; 1 photo(s) in flight over 30 s, oldest 36 s: "
                           "https://slow.example.org/a.jpg"), lines
  now[0] = 95.0
  assert bar.line().endswith("; 2 photo(s) in flight over 30 s, oldest 95 s: "
                             "https://slow.example.org/a.jpg")
  assert bar.done == 0
  bar.finished(slow)
  bar.finished(slower)
  assert "in flight" not in bar.line()
