"""Progress lines for long runs: photos done, of how many, photos per second.

Each worker process keeps one counter that the per-photo stage ticks; every
``interval`` seconds the process logs a line such as::

    progress: 1200 of 5000 photos (24%), 41.3 photos/s, elapsed 29s

On the DirectRunner there is one process, so these lines are the job's
progress; on Dataflow each worker logs its own share.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

LOGGER = logging.getLogger("natvision.progress")
DEFAULT_INTERVAL_S = 5.0


class Progress:
  """A thread-safe photo counter that reports at most every ``interval`` s."""

  def __init__(self, interval: float = DEFAULT_INTERVAL_S,
               clock: Callable[[], float] = time.monotonic,
               emit: Optional[Callable[[str], None]] = None):
    self._interval = interval
    self._clock = clock
    self._emit = emit or LOGGER.info
    self._lock = threading.Lock()
    self.expected_total: Optional[int] = None
    self.done = 0
    self._start: Optional[float] = None
    self._last_report = 0.0

  def tick(self, n: int = 1) -> None:
    with self._lock:
      now = self._clock()
      if self._start is None:
        self._start = now
        self._last_report = now
      self.done += n
      if now - self._last_report < self._interval:
        return
      self._last_report = now
      line = self.line(now)
    self._emit(line)

  def line(self, now: Optional[float] = None) -> str:
    now = self._clock() if now is None else now
    start = self._start if self._start is not None else now
    elapsed = max(now - start, 1e-9)
    rate = self.done / elapsed
    if self.expected_total:
      share = 100.0 * self.done / self.expected_total
      of = f" of {self.expected_total} photos ({share:.0f}%)"
    else:
      of = " photos"
    return (f"progress: {self.done}{of}, {rate:.1f} photos/s, "
            f"elapsed {elapsed:.0f}s")


_PROCESS_PROGRESS = Progress()


def set_expected_total(total: Optional[int]) -> None:
  if total:
    _PROCESS_PROGRESS.expected_total = total


def tick(n: int = 1) -> None:
  _PROCESS_PROGRESS.tick(n)
