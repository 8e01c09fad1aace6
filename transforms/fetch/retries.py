"""Retries, and the one entry point: a photo's bytes by its URI.

``fetch_bytes`` picks the way a scheme is read (``client`` for http(s),
``schemes.read_filesystem`` otherwise) and ``with_retries`` retries
transient failures with exponential backoff and jitter (tenacity), the
server's ``Retry-After`` instead when it sent one, all within the photo's
deadline for http(s).  gs:// and s3:// are tried once here: their clients
have already retried what they raise.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from typing import Callable, Optional

import tenacity

from natvision.transforms.fetch import client as client_lib
from natvision.transforms.fetch.breaker import SlotBreaker
from natvision.transforms.fetch.errors import FetchError, photo_timeout_error
from natvision.transforms.fetch.schemes import (HTTP_SCHEMES, SELF_RETRYING_SCHEMES,
                                      read_filesystem, scheme_of)
from natvision.transforms.fetch.settings import (DEFAULT_ATTEMPTS, DEFAULT_BASE_DELAY,
                                       MAX_BACKOFF_S, MAX_RETRY_AFTER_S,
                                       FetchConfig)

def _backoff(base_delay: float):
  """A tenacity wait: the server's Retry-After when it sent one, else
  exponential backoff with jitter (base, 2 x base, ... times 0.5 to 1.5)."""

  def wait(state: tenacity.RetryCallState) -> float:
    error = state.outcome.exception() if state.outcome else None
    if isinstance(error, FetchError) and error.retry_after is not None:
      return error.retry_after
    delay = base_delay * (2 ** (state.attempt_number - 1))
    return min(delay * (0.5 + random.random()), MAX_BACKOFF_S)

  return wait


def _retryable(e: BaseException) -> bool:
  return (isinstance(e, FetchError) and e.transient
          and (e.retry_after is None or e.retry_after <= MAX_RETRY_AFTER_S))


def with_retries(attempt: Callable[[], bytes], uri: str, attempts: int,
                 base_delay: float = DEFAULT_BASE_DELAY,
                 sleep: Callable[[float], None] = time.sleep,
                 on_retry: Optional[Callable[[], None]] = None,
                 deadline: Optional[float] = None,
                 timeout_s: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic) -> bytes:
  """Calls ``attempt`` until it succeeds, fails for good, or ``attempts``
  tries have failed transiently.

  Args:
    attempt: one try; raises FetchError.
    uri: for log lines.
    attempts: total tries, at least 1.
    base_delay: seconds before the first retry without Retry-After.
    sleep: injectable for tests.
    on_retry: called before each retry (to count them).
    deadline: monotonic time past which no retry starts: when the wait
      before the next try would reach it, the photo fails now.
    timeout_s: the seconds ``deadline`` stands for, for the reason.
    clock: monotonic seconds (tests).

  Raises:
    FetchError: the last failure; "(gave up after N attempts)" added when
      every try failed transiently; ``PhotoTimeout`` (naming the last
      failure) when the deadline stopped the retries.
  """
  out_of_time = []

  def stop(state: tenacity.RetryCallState) -> bool:
    if state.attempt_number >= attempts:
      return True
    if deadline is not None and clock() + state.upcoming_sleep >= deadline:
      out_of_time.append(True)
      return True
    return False

  def before_sleep(state: tenacity.RetryCallState) -> None:
    if on_retry is not None:
      on_retry()
    logging.warning("transient read failure for %s (%s); retrying in %.1fs",
                    uri, state.outcome.exception(),
                    state.next_action.sleep if state.next_action else 0)

  retrying = tenacity.Retrying(
      stop=stop,
      wait=_backoff(base_delay),
      retry=tenacity.retry_if_exception(_retryable),
      sleep=sleep, before_sleep=before_sleep, reraise=True)
  try:
    return retrying(attempt)
  except FetchError as e:
    if out_of_time:
      raise photo_timeout_error(
          timeout_s if timeout_s is not None else 0, uri,
          f"last attempt: {e}") from e
    if e.transient and attempts > 1 and _retryable(e):
      raise FetchError(f"{e} (gave up after {attempts} attempts)",
                       transient=True) from e
    raise


def fetch_bytes(uri: str, max_bytes: int, config: Optional[FetchConfig] = None,
                attempts: int = DEFAULT_ATTEMPTS,
                base_delay: float = DEFAULT_BASE_DELAY,
                sleep: Callable[[float], None] = time.sleep,
                on_retry: Optional[Callable[[], None]] = None,
                opener: Optional[Callable] = None,
                guard: Optional[SlotBreaker] = None) -> bytes:
  """A photo's bytes, fetched the way its scheme needs.

  http(s) is fetched by the process's pooled client, retrying transient
  failures, all within ``config.photo_timeout`` (every attempt, wait and
  redirect, the headers included); gs:// and s3:// go through Beam's
  FileSystems, whose clients have already retried what they raise, so they
  are tried once here; other paths are retried like http(s).

  Args:
    uri: where the photo is.
    max_bytes: larger photos are refused (not retried).
    config: the fetch flags; defaults when None.
    attempts, base_delay, sleep, on_retry: see ``with_retries``.
    opener: replaces FileSystems.open for non-http URIs (tests).
    guard: the breaker of the photo's slot (``breaker.SlotBreaker``) that
      admits each http(s) attempt and counts its outcome; None: the host's
      breaker in this worker process.

  Raises:
    FetchError: the reason the photo could not be fetched.
  """
  if not uri:
    raise FetchError("empty uri")
  scheme = scheme_of(uri)
  if scheme in HTTP_SCHEMES and opener is None:
    config = config or FetchConfig()
    fetcher = client_lib.http_fetcher(config)
    deadline = time.monotonic() + config.photo_timeout
    tries = []

    def attempt() -> bytes:
      tries.append(1)  # only a first try waits out a pause of its host
      return fetcher.fetch(uri, max_bytes, deadline=deadline,
                           wait_for_host=len(tries) == 1, sleep=sleep,
                           guard=guard)

    return with_retries(attempt, uri, attempts, base_delay, sleep, on_retry,
                        deadline=deadline, timeout_s=config.photo_timeout)
  attempt = functools.partial(read_filesystem, uri, max_bytes, opener)
  if scheme in SELF_RETRYING_SCHEMES:
    attempts = 1
  return with_retries(attempt, uri, attempts, base_delay, sleep, on_retry)

