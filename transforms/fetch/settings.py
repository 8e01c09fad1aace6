"""``FetchConfig``: how photos are fetched, and the flags that say so.

Defaults, checks and flags of the fetch layer (concurrency, the per-host
cap, timeouts, redirects, the per-photo deadline, the per-slot circuit
breaker, the User-Agent).
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from natvision import transforms
from natvision.transforms import config

DEFAULT_FETCH_CONCURRENCY = 32
DEFAULT_PER_HOST_CONCURRENCY = 8
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_MAX_REDIRECTS = 5
DEFAULT_ATTEMPTS = 4
# The most one http(s) photo may take, all attempts and waits together.
DEFAULT_PHOTO_TIMEOUT = 120.0
# Consecutive connection failures, timeouts or 5xx from one host that open
# its circuit breaker (0: never), and the quiet seconds before a trial.
DEFAULT_HOST_FAILURE_LIMIT = 20
DEFAULT_HOST_QUIET_S = 60.0
# A 429 without Retry-After pauses its host this long.
DEFAULT_429_PAUSE_S = 1.0
DEFAULT_BASE_DELAY = 0.5
# A Retry-After longer than this is not waited for: the photo fails now
# (with the server's delay in the reason) and a later run retries it.
MAX_RETRY_AFTER_S = 120.0
MAX_BACKOFF_S = 30.0

@dataclasses.dataclass(frozen=True)
class FetchConfig:
  """How photos are fetched; owns its flags.

  Attributes:
    fetch_concurrency: requests in flight per worker process.
    per_host_concurrency: requests in flight per host, for the whole job
      (transforms/hosts.py; the client also caps it per process).
    connect_timeout: seconds to open a connection.
    read_timeout: seconds without a byte from the server.
    max_redirects: redirects followed before a photo fails.
    user_agent: a contact (URL or e-mail) added to natvision's User-Agent.
    photo_timeout: seconds one http(s) photo may take, all attempts,
      waits and redirects together.
    host_failure_limit: consecutive connection failures, timeouts or 5xx
      from one host after which its photos fail at once (0: never).
    host_quiet_s: seconds after a host's last failure before one trial
      request may go to it again (no flag; tests shorten it).
  """

  fetch_concurrency: int = DEFAULT_FETCH_CONCURRENCY
  per_host_concurrency: int = DEFAULT_PER_HOST_CONCURRENCY
  connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
  read_timeout: float = DEFAULT_READ_TIMEOUT
  max_redirects: int = DEFAULT_MAX_REDIRECTS
  user_agent: str = ""
  photo_timeout: float = DEFAULT_PHOTO_TIMEOUT
  host_failure_limit: int = DEFAULT_HOST_FAILURE_LIMIT
  host_quiet_s: float = DEFAULT_HOST_QUIET_S

  def __post_init__(self):
    if self.fetch_concurrency < 1:
      raise config.ConfigError("--fetch_concurrency must be at least 1 (requests in "
                       f"flight per worker process, default "
                       f"{DEFAULT_FETCH_CONCURRENCY})")
    if self.per_host_concurrency < 1:
      raise config.ConfigError("--per_host_concurrency must be at least 1 (default "
                       f"{DEFAULT_PER_HOST_CONCURRENCY})")
    if self.per_host_concurrency > self.fetch_concurrency:
      raise config.ConfigError(
          f"--per_host_concurrency {self.per_host_concurrency} is more than "
          f"--fetch_concurrency {self.fetch_concurrency}; lower it or raise "
          f"--fetch_concurrency")
    if not self.connect_timeout > 0 or not self.read_timeout > 0:
      raise config.ConfigError("--connect_timeout and --read_timeout must be positive "
                       "numbers of seconds")
    if self.max_redirects < 0:
      raise config.ConfigError("--max_redirects must be 0 (follow none) or more")
    if not (self.photo_timeout > 0 and math.isfinite(self.photo_timeout)):
      raise config.ConfigError(
          f"--photo_timeout must be a positive number of seconds (the most "
          f"one http(s) photo may take, default {DEFAULT_PHOTO_TIMEOUT:g}); "
          f"got {self.photo_timeout:g}")
    if self.host_failure_limit < 0:
      raise config.ConfigError(
          "--host_failure_limit must be 0 (never give up on a host) or more "
          f"(default {DEFAULT_HOST_FAILURE_LIMIT})")
    if not self.host_quiet_s > 0:
      raise config.ConfigError("host_quiet_s must be a positive number of "
                               "seconds")
    if any(c in self.user_agent for c in "\r\n") or not self.user_agent.isprintable():
      raise config.ConfigError("--user_agent must be one line of printable text, e.g. "
                       "'mailto:me@example.org'")

  @property
  def user_agent_header(self) -> str:
    base = f"natvision/{transforms.__version__}"
    return f"{base} ({self.user_agent})" if self.user_agent else base

  @staticmethod
  def add_flags(parser: argparse.ArgumentParser) -> None:
    """Adds the fetch flags to a job's parser."""
    parser.add_argument(
        "--fetch_concurrency", type=int, default=DEFAULT_FETCH_CONCURRENCY,
        help="photo requests in flight per worker process, apart from the "
        "decode threads")
    parser.add_argument(
        "--per_host_concurrency", type=int,
        default=DEFAULT_PER_HOST_CONCURRENCY,
        help="http(s) requests in flight to one host, for the whole job: "
        "across every worker process and machine")
    parser.add_argument(
        "--connect_timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
        help="seconds to connect to an http(s) server")
    parser.add_argument(
        "--read_timeout", type=float, default=DEFAULT_READ_TIMEOUT,
        help="seconds an http(s) server may stay silent")
    parser.add_argument(
        "--max_redirects", type=int, default=DEFAULT_MAX_REDIRECTS,
        help="redirects followed per photo")
    parser.add_argument(
        "--photo_timeout", type=float, default=DEFAULT_PHOTO_TIMEOUT,
        help="seconds one http(s) photo may take, all attempts, waits and "
        "redirects together; past it the photo is an error row")
    parser.add_argument(
        "--host_failure_limit", type=int, default=DEFAULT_HOST_FAILURE_LIMIT,
        help="consecutive connection failures, timeouts or 5xx on one of a "
        "host's --per_host_concurrency slots after which that slot's photos "
        "fail at once, for the whole job, until a trial request after 60 s "
        "of quiet succeeds (0: never)")
    parser.add_argument(
        "--user_agent", default="",
        help="a contact (URL or e-mail) added to the User-Agent natvision "
        "sends, as photo hosts ask of crawlers")

  @classmethod
  def from_args(cls, args: argparse.Namespace) -> "FetchConfig":
    """The config of parsed flags.

    Raises:
      ValueError: a value that cannot work, naming the flag.
    """
    return cls(fetch_concurrency=args.fetch_concurrency,
               per_host_concurrency=args.per_host_concurrency,
               connect_timeout=args.connect_timeout,
               read_timeout=args.read_timeout,
               max_redirects=args.max_redirects,
               user_agent=args.user_agent.strip(),
               photo_timeout=args.photo_timeout,
               host_failure_limit=args.host_failure_limit)

