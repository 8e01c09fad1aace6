"""Progress lines for long runs: photos done, of how many, photos per second.

Each run has its own counter, keyed by its run id, that the per-photo stage
ticks; every ``interval`` seconds it logs a line.  A later run in the same
process (a notebook, a test session, a scheduler) starts from zero.

The launcher calls ``start_run`` before running the pipeline.  When the
pipeline runs inside the launcher's process (the DirectRunner, in memory or
with threads) that process sees every photo, and its lines are the job's::

    progress: 1200 of 5000 photos (24%), 41.3 photos/s, elapsed 29s

A worker process that did not launch the run (Dataflow, or the
DirectRunner's ``multi_processing`` mode) sees only its share of the photos,
and says so instead of dividing its count by the whole job's total::

    progress: this worker: 1200 photos, 41.3 photos/s, elapsed 29s

The per-photo stage also tells the counter which photos are being fetched
(``started`` / ``finished``).  A line then names those in flight for more
than 30 s, so that a run waiting on a slow host says so; and while photos
are in flight the stage asks for a line (``tick(0)``) every interval even
when none completes::

    progress: 1200 of 5000 photos (24%), 41.3 photos/s, elapsed 129s;
    2 photo(s) in flight over 30 s, oldest 95 s: https://host/a.jpg

On a terminal (the launcher passes ``start_run`` one when stderr is a
terminal and the pipeline runs in its process) the run's counter draws a
tqdm bar there instead of the lines: photos done of the total (without a
total: done and rate only), rate and time left, and the photos in flight
over 30 s after it::

    photos:  24%|####      | 1200/5000 [00:29<01:32, 41.3photo/s, 2 in flight over 30 s, oldest 95 s: https://host/a.jpg]

Workers never draw one: their counters come from ``for_run``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Dict, Optional, TextIO, Tuple

LOGGER = logging.getLogger("natvision.progress")
DEFAULT_INTERVAL_S = 5.0
# Photos in flight longer than this are named in progress lines.
SLOW_PHOTO_S = 30.0


class Progress:
  """A thread-safe photo counter that reports at most every ``interval`` s.

  Args:
    interval: seconds between lines.
    clock: monotonic time source (injectable for tests).
    emit: where lines go (default: the ``natvision.progress`` logger).
    whole_job: whether this counter sees every photo of the run; when
      False its lines count this worker's photos only, without a share.
    bar: a tqdm bar that ticks update and that shows the slow photos,
      instead of lines (``start_run`` makes it on a terminal).
  """

  def __init__(self, interval: float = DEFAULT_INTERVAL_S,
               clock: Callable[[], float] = time.monotonic,
               emit: Optional[Callable[[str], None]] = None,
               whole_job: bool = True, bar=None):
    self._interval = interval
    self._clock = clock
    self._emit = emit or LOGGER.info
    self._lock = threading.Lock()
    self.whole_job = whole_job
    self.expected_total: Optional[int] = None
    self.done = 0
    self._start: Optional[float] = None
    self._last_report = 0.0
    self._in_flight: Dict[object, Tuple[float, str]] = {}
    self.bar = bar

  def started(self, what: str) -> object:
    """Records that a photo's fetch started; returns its token.

    Args:
      what: the photo's URI, named in lines while it is slow.
    """
    token = object()
    with self._lock:
      self._in_flight[token] = (self._clock(), what)
    return token

  def finished(self, token: object) -> None:
    """Records that the fetch of ``started``'s token ended (either way)."""
    with self._lock:
      self._in_flight.pop(token, None)

  def tick(self, n: int = 1) -> None:
    """Counts ``n`` photos done (0: only report if a line is due)."""
    with self._lock:
      now = self._clock()
      if self._start is None:
        self._start = now
        self._last_report = now
      self.done += n
      if self.bar is not None and n:
        self.bar.update(n)  # tqdm redraws at most every mininterval
      if now - self._last_report < self._interval:
        return
      self._last_report = now
      if self.bar is not None:
        self.bar.set_postfix_str(self.slow_photos(now))
        return
      line = self.line(now)
    self._emit(line)

  def close(self) -> None:
    """Called by the launcher when the pipeline has ended: the bar's last
    state stays on the terminal; without a bar, a last line is logged when
    photos were counted (a short run would otherwise show none)."""
    with self._lock:
      if self.bar is not None:
        self.bar.close()
        return
      line = self.line() if self.done else None
    if line:
      self._emit(line)

  def line(self, now: Optional[float] = None) -> str:
    now = self._clock() if now is None else now
    start = self._start if self._start is not None else now
    elapsed = max(now - start, 1e-9)
    rate = self.done / elapsed
    total = self.expected_total
    if not self.whole_job:
      done = f"this worker: {self.done} photos"
    elif total and self.done <= total:
      done = (f"{self.done} of {total} photos "
              f"({100.0 * self.done / total:.0f}%)")
    elif total:  # bundles retried after a failure count twice
      done = f"{self.done} photos ({total} expected)"
    else:
      done = f"{self.done} photos"
    line = (f"progress: {done}, {rate:.1f} photos/s, "
            f"elapsed {elapsed:.0f}s")
    slow = self.slow_photos(now)
    return f"{line}; {slow}" if slow else line

  def slow_photos(self, now: float) -> str:
    """'N photo(s) in flight over 30 s, oldest S s: URI', or ''."""
    in_flight = list(self._in_flight.values())  # one snapshot
    slow = [t for t, _ in in_flight if now - t > SLOW_PHOTO_S]
    if not slow:
      return ""
    oldest = min(in_flight)
    return (f"{len(slow)} photo(s) in flight over {SLOW_PHOTO_S:.0f} s, "
            f"oldest {now - oldest[0]:.0f} s: {oldest[1]}")


# The counters of the most recent runs in this process, by run id, newest
# last; older runs' counters are dropped.
_KEPT_RUNS = 8
_RUNS: "collections.OrderedDict[str, Progress]" = collections.OrderedDict()
_RUNS_LOCK = threading.Lock()


def _keep(run_id: str, bar: Progress) -> Progress:
  _RUNS[run_id] = bar
  _RUNS.move_to_end(run_id)
  while len(_RUNS) > _KEPT_RUNS:
    _RUNS.popitem(last=False)
  return bar


def start_run(run_id: str, expected_total: Optional[int] = None,
              terminal: Optional[TextIO] = None) -> Progress:
  """Called by the launcher: a fresh counter for ``run_id``, seeing all of it.

  Args:
    run_id: the run's id.
    expected_total: number of inputs when known.
    terminal: where to draw a progress bar instead of logging lines
      (the launcher's stderr when it is a terminal); None: lines.

  Returns:
    The run's counter; a pipeline that runs in this process ticks it.
    The launcher closes it when the pipeline has ended.
  """
  with _RUNS_LOCK:
    counter = Progress(whole_job=True, bar=_bar(terminal, expected_total))
    counter.expected_total = expected_total or None
    return _keep(run_id, counter)


def _bar(terminal: Optional[TextIO], total: Optional[int]):
  if terminal is None:
    return None
  import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm.tqdm(total=total or None, unit="photo", desc="photos",
                   file=terminal, dynamic_ncols=True, mininterval=0.5)


def for_run(run_id: str, expected_total: Optional[int] = None) -> Progress:
  """The counter of ``run_id`` in this process, made on first use.

  Args:
    run_id: the run's id.
    expected_total: number of inputs when known.

  Returns:
    The launcher's counter when this process launched the run, else a
    counter of this worker's photos.
  """
  with _RUNS_LOCK:
    bar = _RUNS.get(run_id)
    if bar is None:
      bar = _keep(run_id, Progress(whole_job=False))
    if expected_total and not bar.expected_total:
      bar.expected_total = expected_total
    return bar
