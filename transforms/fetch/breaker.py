"""The circuit breaker and Retry-After pause of one slot of a web host.

A host's photos are keyed ``host#slot`` with ``--per_host_concurrency`` K
slots (transforms/hosts.py), and a slot fetches one photo at a time.  Each
slot keeps, in a ``SlotState``:

- ``failures``: consecutive requests of the slot that got no answer
  (refused, reset, timed out) or a 5xx.  At ``--host_failure_limit`` N the
  slot's breaker opens: its photos become error rows at once ("host
  unavailable ..."), no request sent.  A success resets the count.
- ``opened_at``: when the breaker opened.  After ``host_quiet_s`` seconds
  of quiet, the slot's next request is a trial: a success closes the
  breaker, a failure opens it again for another quiet period.
- ``paused_until``: a 429 (``Retry-After`` or 1 s) or a 503 with
  ``Retry-After`` seen by the slot: no request of the slot starts before
  then.

The host-keyed stateful DoFn (``photos_keyed.HostKeyedReadDecodePrepareFn``)
keeps one ``SlotState`` per key in Beam state, so a slot's breaker and
pause follow the slot from bundle to bundle and worker to worker: they
hold for the whole job, not per worker process.  What "job-wide" means
with slots:

- a dead host costs at most K x N requests in the whole job before every
  slot is open (each slot's N failures; the requests of one slot are
  sequential, so none is in flight when its breaker opens), then at most
  K trial requests per quiet period;
- a Retry-After seen by one slot pauses that slot everywhere; the host's
  other slots learn it from their own next request (each gets its own 429
  and pauses), so during one Retry-After window the host gets at most one
  request per slot, K in all, job-wide.  Within a worker process the other
  slots learn it at once: the process's client pauses the whole host for
  its photos (``client.HttpFetcher``).

Times are wall-clock seconds since the epoch (``time.time``), since a slot
moves between processes and machines whose monotonic clocks differ.

``SlotBreaker`` is also what guards a host in a process where no slot
state exists (the launcher's sample, ``tools/search``): one per host and
process, shared by that process's threads, with a trial flag so only one
trial is in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, Optional, Tuple

from apache_beam import coders

from natvision.transforms.fetch.errors import HostUnavailable
from natvision.transforms.fetch.settings import MAX_RETRY_AFTER_S


@dataclasses.dataclass(frozen=True)
class SlotState:
  """What the job knows of one slot of a host, as kept in Beam state.

  Attributes:
    failures: consecutive failed requests (no answer, or 5xx).
    opened_at: wall-clock seconds the breaker opened or a trial failed;
      0.0 while closed.
    paused_until: wall-clock seconds before which no request of the slot
      starts (429, Retry-After); 0.0 when never paused.
  """

  failures: int = 0
  opened_at: float = 0.0
  paused_until: float = 0.0

  def as_tuple(self) -> Tuple[int, float, float]:
    return (self.failures, self.opened_at, self.paused_until)

  @classmethod
  def from_tuple(cls, value: Optional[Tuple]) -> "SlotState":
    """The state read back; a slot never seen (None) is closed."""
    if value is None:
      return cls()
    failures, opened_at, paused_until = value
    return cls(int(failures), float(opened_at), float(paused_until))


# How a SlotState is stored (a portable coder of primitives).
SLOT_STATE_CODER = coders.TupleCoder(
    [coders.VarIntCoder(), coders.FloatCoder(), coders.FloatCoder()])


class SlotBreaker:
  """The breaker and pause of one slot (or of a host in one process).

  Thread-safe.  Used by the fetch threads around each request (``admit``
  before, ``record`` after) and, between a slot's photos, by the bundle's
  thread (``blocked``, ``wait_s``, ``state``).

  Args:
    host: the host's ``netloc``, for reasons and logs.
    limit: ``--host_failure_limit`` (0: never open).
    quiet_s: seconds after the last failure before a trial request.
    slot: the slot's number, or None for a breaker of a whole host in one
      process.
    slots: the host's number of slots (``--per_host_concurrency``).
    state: what was known of the slot (from Beam state).
    now: wall-clock seconds (tests).
  """

  def __init__(self, host: str, limit: int, quiet_s: float,
               slot: Optional[int] = None, slots: Optional[int] = None,
               state: SlotState = SlotState(),
               now: Callable[[], float] = time.time):
    self.host = host
    self._limit = limit
    self._quiet_s = quiet_s
    self._slot = slot
    self._slots = slots
    self._now = now
    self._lock = threading.Lock()
    self._failures = state.failures
    self._opened_at = state.opened_at
    self._paused_until = state.paused_until
    self._trial = False

  @property
  def state(self) -> SlotState:
    with self._lock:
      return SlotState(self._failures, self._opened_at, self._paused_until)

  def reason(self) -> str:
    """Why the slot's photos fail while its breaker is open."""
    if self._slot is None:
      where, again = "", "this worker process tries it again"
    else:
      where = f" of its slot {self._slot} (of {self._slots})"
      again = "the slot tries it again"
    return (f"host unavailable after {self._limit} consecutive failures "
            f"(connection failures, timeouts or 5xx){where}: {self.host}; "
            f"{again} {self._quiet_s:g} s after its last failure")

  def blocked(self) -> Optional[str]:
    """The reason a photo of the slot fails now without a request (breaker
    open, quiet period not over), or None when it may start."""
    with self._lock:
      if not self._limit or not self._opened_at:
        return None
      if self._now() - self._opened_at >= self._quiet_s and not self._trial:
        return None
    return self.reason()

  def wait_s(self) -> float:
    """Seconds before the slot may send a request (0.0: now)."""
    with self._lock:
      return max(0.0, self._paused_until - self._now())

  def long_pause(self) -> Optional[str]:
    """The reason a photo fails now because the host asked for a pause
    longer than ``MAX_RETRY_AFTER_S`` (it is left for a later run)."""
    wait = self.wait_s()
    if wait <= MAX_RETRY_AFTER_S:
      return None
    return (f"{self.host} asked for a pause of {wait:.0f}s (429 or "
            f"Retry-After), more than {MAX_RETRY_AFTER_S:g} s; no request "
            f"sent, a later run retries it")

  def admit(self) -> bool:
    """Before a request: whether it is the trial of an open breaker.

    Raises:
      HostUnavailable: the breaker is open (or its trial is in flight).
    """
    with self._lock:
      if not self._limit or not self._opened_at:
        return False
      if self._now() - self._opened_at >= self._quiet_s and not self._trial:
        self._trial = True
        return True
    raise HostUnavailable(self.reason())

  def record(self, failed: Optional[bool], trial: bool,
             pause_s: Optional[float] = None) -> None:
    """After a request: its outcome.

    Args:
      failed: True for no answer or a 5xx, False for any other answer,
        None when it never reached the host (nothing is counted).
      trial: what ``admit`` returned for it.
      pause_s: seconds the host asked to be left alone (429, Retry-After).
    """
    with self._lock:
      if trial:
        self._trial = False
      if pause_s:
        self._paused_until = max(self._paused_until, self._now() + pause_s)
      if failed is None:
        return
      if not failed:
        if self._opened_at:
          logging.info("host %s answers again: its photos are fetched",
                       self.host)
        self._failures, self._opened_at = 0, 0.0
        return
      self._failures += 1
      if self._limit and (trial or (not self._opened_at
                                    and self._failures >= self._limit)):
        if not self._opened_at:
          logging.warning("%s", self.reason())
        self._opened_at = self._now()
