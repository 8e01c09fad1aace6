"""A slot's breaker and pause, on a fake clock: opening after N failures,
the quiet period and its trial, Retry-After pauses, and the state's form
in Beam."""

import pytest

from natvision.transforms import fetch
from natvision.transforms.fetch import breaker


class _Clock:
  def __init__(self, t=1_700_000_000.0):
    self.t = t

  def __call__(self):
    return self.t


def _slot(clock, state=breaker.SlotState(), limit=3, quiet_s=60.0):
  return breaker.SlotBreaker("photos.example.org", limit, quiet_s, slot=1,
                             slots=2, state=state, now=clock)


def test_opens_after_n_failures_and_closes_after_a_good_trial():
  clock = _Clock()
  slot = _slot(clock)
  for _ in range(3):
    trial = slot.admit()
    assert not trial and slot.blocked() is None
    slot.record(True, trial)
  reason = slot.blocked()
  assert reason == (
      "host unavailable after 3 consecutive failures (connection failures, "
      "timeouts or 5xx) of its slot 1 (of 2): photos.example.org; the slot "
      "tries it again 60 s after its last failure")
  with pytest.raises(fetch.HostUnavailable, match="^host unavailable after 3"):
    slot.admit()
  clock.t += 59.9
  assert slot.blocked() is not None
  clock.t += 0.2  # quiet for 60 s: one trial, which fails and reopens
  assert slot.blocked() is None
  assert slot.admit() is True
  with pytest.raises(fetch.HostUnavailable):
    slot.admit()  # the trial is in flight
  slot.record(True, True)
  assert slot.blocked() is not None and slot.state.opened_at == clock.t
  clock.t += 60.0
  assert slot.admit() is True
  slot.record(False, True)  # it answers: closed, count reset
  assert slot.blocked() is None and slot.state == breaker.SlotState(0, 0.0,
                                                                    0.0)


def test_an_answer_resets_the_count_and_unreached_attempts_count_nothing():
  slot = _slot(_Clock())
  for failed in (True, True, False, True, True, None, None):
    slot.record(failed, False)
  assert slot.state.failures == 2 and slot.blocked() is None


def test_retry_after_pauses_the_slot():
  clock = _Clock()
  slot = _slot(clock)
  slot.record(False, False, pause_s=5.0)
  assert slot.wait_s() == pytest.approx(5.0, abs=1e-9)
  assert slot.long_pause() is None
  clock.t += 4.0
  assert slot.wait_s() == pytest.approx(1.0, abs=1e-9)
  slot.record(False, False, pause_s=1000.0)
  assert slot.long_pause().startswith(
      "photos.example.org asked for a pause of 1000s (429 or Retry-After), "
      "more than 120 s")


def test_state_survives_its_coder_and_a_new_breaker():
  clock = _Clock()
  slot = _slot(clock)
  for _ in range(3):
    slot.record(True, False)
  slot.record(None, False, pause_s=2.0)
  coder = breaker.SLOT_STATE_CODER
  stored = coder.decode(coder.encode(slot.state.as_tuple()))
  again = _slot(clock, breaker.SlotState.from_tuple(stored))
  assert again.state == slot.state
  assert again.blocked() is not None and again.wait_s() == pytest.approx(
      2.0, abs=1e-9)
  assert breaker.SlotState.from_tuple(None) == breaker.SlotState()


def test_limit_zero_never_opens():
  slot = _slot(_Clock(), limit=0)
  for _ in range(100):
    slot.record(True, slot.admit())
  assert slot.blocked() is None
