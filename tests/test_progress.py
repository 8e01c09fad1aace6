"""Progress lines: counted per photo, emitted at most every interval; a bar
on a terminal."""

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from natvision.transforms import commit
from natvision.transforms import progress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_a_bar_takes_the_ticks_and_shows_slow_photos_instead_of_lines():
  now = [0.0]
  lines = []

  class Bar:  # what the counter asks of a tqdm bar
    def __init__(self):
      self.n, self.postfix, self.closed = 0, None, False

    def update(self, n):
      self.n += n

    def set_postfix_str(self, text):
      self.postfix = text

    def close(self):
      self.closed = True

  bar = Bar()
  counter = progress.Progress(interval=5, clock=lambda: now[0],
                              emit=lines.append, bar=bar)
  counter.started("https://slow.example.org/a.jpg")
  for _ in range(3):
    counter.tick()
  now[0] = 40.0
  counter.tick(0)
  counter.tick()
  assert (bar.n, counter.done, lines) == (4, 4, [])
  assert bar.postfix == ("1 photo(s) in flight over 30 s, oldest 40 s: "
                         "https://slow.example.org/a.jpg")
  counter.close()
  assert bar.closed


def test_close_logs_a_last_line_without_a_bar():
  now = [0.0]
  lines = []
  counter = progress.Progress(interval=5, clock=lambda: now[0],
                              emit=lines.append)
  counter.close()
  assert lines == []  # nothing counted, nothing to say
  counter.expected_total = 2
  counter.tick(2)
  now[0] = 1.0
  counter.close()
  assert lines == ["progress: 2 of 2 photos (100%), 2.0 photos/s, elapsed 1s"]


def test_start_run_draws_a_bar_only_on_a_terminal(tmp_path):
  with open(tmp_path / "stderr", "w") as terminal:
    counter = progress.start_run("run-with-bar", 4, terminal=terminal)
    counter.tick(3)
    counter.close()
  assert counter.bar.total == 4 and counter.bar.unit == "photo"
  assert "3/4" in (tmp_path / "stderr").read_text()
  assert progress.start_run("run-with-lines", 4).bar is None
  assert progress.for_run("a-worker's-run").bar is None


def _demo(output_dir, models, on_terminal):
  """Runs ``natvision-embed --demo`` in a child; returns (stderr, stdout).

  On a terminal, stderr is a pseudo-terminal of 100 columns (tqdm draws
  nothing on one of 0 columns, a bare pty's size); else a pipe.
  """
  argv = [sys.executable, "-m", "natvision.pipelines.embed_images", "--demo",
          "--output_dir", output_dir, "--model_root", models,
          "--runtime", "tf"]
  env = dict(os.environ, PYTHONPATH=REPO)
  if not on_terminal:
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True,
                          timeout=300, check=True)
    return done.stderr.decode(), done.stdout.decode()
  master, slave = pty.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
  child = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=slave)
  os.close(slave)
  chunks = []
  while True:
    try:
      chunk = os.read(master, 65536)
    except OSError:  # EIO: the child closed the terminal
      break
    if not chunk:
      break
    chunks.append(chunk)
  os.close(master)
  stdout = child.stdout.read().decode()
  assert child.wait(timeout=300) == 0
  return b"".join(chunks).decode("utf-8", "replace"), stdout


@pytest.mark.slow
def test_demo_draws_a_bar_on_a_terminal_and_lines_on_a_pipe(tiny_models,
                                                            tmp_path):
  terminal, stdout = _demo(str(tmp_path / "tty"), tiny_models, True)
  assert "%|" in terminal and "photo/s" in terminal, terminal
  assert "5/5 [" in terminal, terminal
  assert "progress:" not in terminal
  assert "timings: launch " in stdout
  piped, stdout = _demo(str(tmp_path / "pipe"), tiny_models, False)
  assert "%|" not in piped and "photo/s" not in piped, piped
  # The last line, logged when the pipeline has ended.
  assert "INFO natvision.progress: progress: 5 of 5 photos (100%), " in piped
  assert "timings: launch " in stdout
  with open(tmp_path / "tty" / "run.json") as f:
    timings = json.load(f)["timings"]
  assert sorted(timings) == sorted(commit.TIMING_PHASES)
  assert all(seconds >= 0 for seconds in timings.values()), timings
  assert timings["model_checks"] > 0 and timings["pipeline"] > 0, timings
