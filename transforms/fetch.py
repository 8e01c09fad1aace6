"""Fetch: the one place that decides how a photo's bytes come from a URI.

A reader (globs, manifests, Darwin Core archives, snapshots) decides which
photos exist; this module decides how their bytes are fetched, by scheme:

- local paths and ``file://`` URIs, ``gs://`` and ``s3://``: Beam's
  ``FileSystems``.  The Cloud Storage and S3 clients retry transient
  failures themselves (with their own backoff), so a failure they raise
  has already been retried and is not retried again here.
- ``http://`` and ``https://``: one pooled urllib3 client per worker
  process, with connect and read timeouts, a bounded number of redirects, a
  ``User-Agent`` naming natvision (``--user_agent`` adds a contact) and a cap
  on requests in flight per host (``--per_host_concurrency``).  Resets,
  timeouts, 429 and 5xx are retried with exponential backoff (tenacity);
  ``Retry-After`` on 429 and 503 is honoured by the photo's retry and
  pauses the host for the worker process's other photos too.  404 and 410
  mean "not found" and are not retried.
- every http(s) photo has a deadline (``--photo_timeout``): all its
  attempts, backoff waits and redirects together.  The body is read in
  chunks with the deadline checked between them, and each socket read may
  block for at most what is left of it, so a server that trickles bytes
  cannot hold a photo (or the job) for longer.  Status line and headers
  are bounded by ``--read_timeout`` per read only.
- the bytes of a 200 response decide what it is, not its Content-Type: a
  body that starts like an image (``decode.is_image``) is a photo even
  when sent as ``text/plain`` (PHP image proxies, misconfigured buckets);
  an HTML, XML, JSON or text body is refused with its page title or first
  characters, and a binary non-image is described, never quoted as text.
- a per-host circuit breaker: after ``--host_failure_limit`` consecutive
  connection failures, timeouts or 5xx answers from one host, its photos
  fail at once ("host unavailable ...") instead of each paying the retry
  schedule; after a quiet period one trial request is let through, and a
  success closes the breaker again.

The client's per-host semaphore, the breaker and the Retry-After pause hold
per worker process (as the client does).  ``--per_host_concurrency`` is
made a limit for the whole job before photos reach this module: http(s)
photos are keyed by host and slot and fetched one per key at a time
(transforms/hosts.py); the semaphore here then never binds across
processes.  The breaker and the pause stay per process.

Whether an error is transient or means "not found" is decided by its type
(builtins, ``google.api_core``, urllib3, requests, botocore and Beam's S3
client, each imported only when installed), never from its message.

Public S3 buckets are read without credentials: when boto3 finds none,
Beam's S3 client sends unsigned requests (like ``aws --no-sign-request``),
and a client without a configured region uses ``us-east-1``.  An
S3-compatible store is reached through Beam's ``--s3_endpoint_url`` or the
standard ``AWS_ENDPOINT_URL_S3`` variable, which boto3 reads itself.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import email.utils
import functools
import http.client
import logging
import math
import random
import re
import threading
import time
import urllib.parse
import urllib.request
from typing import Callable, Dict, Iterable, Optional, Tuple

import tenacity
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from natvision import transforms
from natvision.transforms import config
from natvision.transforms import decode

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
# Bytes of a body read before deciding what it is (a page title fits).
_HEAD_BYTES = 4096
_CHUNK_BYTES = 64 * 1024
DEFAULT_BASE_DELAY = 0.5
# A Retry-After longer than this is not waited for: the photo fails now
# (with the server's delay in the reason) and a later run retries it.
MAX_RETRY_AFTER_S = 120.0
MAX_BACKOFF_S = 30.0

HTTP_SCHEMES = ("http", "https")
# Schemes read through Beam's FileSystems whose clients retry on their own.
SELF_RETRYING_SCHEMES = ("gs", "s3")
# The pip extra that installs a scheme's filesystem.
SCHEME_EXTRAS = {"gs": "gcp", "s3": "aws"}

_NOT_FOUND_STATUS = (404, 410)
_RETRY_AFTER_STATUS = (429, 503)


class FetchError(Exception):
  """A photo's bytes could not be fetched; the message is the reason.

  Attributes:
    transient: a retry may succeed (reset, timeout, 429, 5xx).
    not_found: storage answered that there is no such photo.
    retry_after: seconds the server asked to wait before retrying.
  """

  def __init__(self, message: str, transient: bool = False,
               not_found: bool = False, retry_after: Optional[float] = None):
    super().__init__(message)
    self.transient = transient
    self.not_found = not_found
    self.retry_after = retry_after


class PhotoTimeout(FetchError):
  """A photo's fetch ran past ``--photo_timeout``; not retried."""


class HostUnavailable(FetchError):
  """The photo's host has its circuit breaker open; no request was sent."""


def photo_timeout_error(seconds: float, url: str,
                        detail: str = "") -> PhotoTimeout:
  """The error of a photo with no complete response within ``seconds``."""
  more = f"; {detail}" if detail else ""
  return PhotoTimeout(f"photo_timeout: no complete response within "
                      f"{seconds:g} s ({url}){more}")


class HttpStatusError(Exception):
  """An HTTP response whose status is not 200."""

  def __init__(self, status: int, reason: str, url: str,
               retry_after: Optional[float] = None):
    super().__init__(f"HTTP {status} {reason} from {url}")
    self.status = status
    self.retry_after = retry_after


class SchemeError(config.ConfigError):
  """A URI scheme that nothing installed can read; says what to install."""


# --------------------------------------------------------------------------
# Configuration


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
        help="consecutive connection failures, timeouts or 5xx from one host "
        "after which its photos fail at once, per worker process, until a "
        "trial request succeeds (0: never)")
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


# --------------------------------------------------------------------------
# Schemes


def scheme_of(uri: str) -> str:
  """The URI's scheme in lower case; ``""`` for a local path (or file://)."""
  match = re.match(r"^([A-Za-z][-A-Za-z0-9+.]*)://", uri)
  if not match:
    return ""
  scheme = match.group(1).lower()
  return "" if scheme == "file" else scheme


def local_path(uri: str) -> str:
  """A ``file://`` URI as a local path; any other URI unchanged."""
  if uri[:7].lower() != "file://":
    return uri
  parsed = urllib.parse.urlsplit(uri)
  if parsed.netloc not in ("", "localhost"):
    return uri
  return urllib.request.url2pathname(parsed.path)


def check_scheme(uri: str) -> None:
  """Checks that something installed can read ``uri``; no I/O.

  Raises:
    SchemeError: naming the scheme and the extra to install.
  """
  scheme = scheme_of(uri)
  if scheme in ("",) + HTTP_SCHEMES:
    return
  try:
    FileSystems.get_filesystem(f"{scheme}://x/y")
  except ValueError:
    extra = SCHEME_EXTRAS.get(scheme)
    if extra:
      raise SchemeError(
          f"{scheme}:// needs the {extra} extra: pip install "
          f"'natvision[{extra}]' (found in {uri})") from None
    raise SchemeError(
        f"no installed filesystem reads {scheme}:// (found in {uri}); "
        f"natvision reads local paths, file://, http(s)://, gs:// "
        f"(natvision[gcp]) and s3:// (natvision[aws])") from None


def check_schemes(uris: Iterable[str]) -> None:
  """``check_scheme`` once per distinct scheme of ``uris``.

  Raises:
    SchemeError: the first scheme nothing installed reads.
  """
  seen = set()
  for uri in uris:
    scheme = scheme_of(uri)
    if scheme not in seen:
      seen.add(scheme)
      check_scheme(uri)


# --------------------------------------------------------------------------
# Typed predicates


@functools.lru_cache(maxsize=None)
def _transient_types() -> Tuple[type, ...]:
  """Exception types that mean "try again", from what is installed."""
  kinds = [ConnectionError, TimeoutError, http.client.IncompleteRead]
  try:
    from google.api_core import exceptions as gexc  # pylint: disable=import-outside-toplevel
    kinds += [gexc.TooManyRequests, gexc.InternalServerError,
              gexc.BadGateway, gexc.ServiceUnavailable, gexc.GatewayTimeout,
              gexc.DeadlineExceeded]
  except ImportError:
    pass
  try:
    import urllib3.exceptions as uexc  # pylint: disable=import-outside-toplevel
    kinds += [uexc.ProtocolError, uexc.TimeoutError, uexc.NewConnectionError,
              uexc.IncompleteRead]
  except ImportError:
    pass
  try:
    import requests.exceptions as rexc  # pylint: disable=import-outside-toplevel
    kinds += [rexc.ConnectionError, rexc.Timeout, rexc.ChunkedEncodingError]
  except ImportError:
    pass
  try:
    import botocore.exceptions as bexc  # pylint: disable=import-outside-toplevel
    kinds += [bexc.ConnectionError, bexc.HTTPClientError,
              bexc.IncompleteReadError]
    if hasattr(bexc, "ResponseStreamingError"):
      kinds.append(bexc.ResponseStreamingError)
  except ImportError:
    pass
  return tuple(kinds)


@functools.lru_cache(maxsize=None)
def _not_found_types() -> Tuple[type, ...]:
  kinds = [FileNotFoundError]
  try:
    from google.api_core import exceptions as gexc  # pylint: disable=import-outside-toplevel
    kinds.append(gexc.NotFound)
  except ImportError:
    pass
  return tuple(kinds)


def _status_of(err: BaseException) -> Optional[int]:
  """The HTTP status a typed storage error carries, if any."""
  if isinstance(err, HttpStatusError):
    return err.status
  try:
    from apache_beam.io.aws.clients.s3 import messages  # pylint: disable=import-outside-toplevel
    if isinstance(err, messages.S3ClientError):
      return err.code if isinstance(err.code, int) else None
  except ImportError:
    pass
  try:
    import botocore.exceptions as bexc  # pylint: disable=import-outside-toplevel
    if isinstance(err, bexc.ClientError):
      return err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
  except ImportError:
    pass
  try:
    from google.api_core import exceptions as gexc  # pylint: disable=import-outside-toplevel
    if isinstance(err, gexc.GoogleAPICallError):
      return err.code if isinstance(err.code, int) else None
  except ImportError:
    pass
  return None


def _chain(e: Optional[BaseException]):
  """The exception, its causes and wrapped reasons, each once."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    reason = getattr(e, "reason", None)  # urllib3's MaxRetryError
    if isinstance(reason, BaseException):
      yield from _chain(reason)
    details = getattr(e, "exception_details", None)  # Beam's BeamIOError
    if isinstance(details, dict):
      for inner in details.values():
        if isinstance(inner, BaseException):
          yield from _chain(inner)
    e = e.__cause__ or e.__context__


def is_transient(e: BaseException) -> bool:
  """Whether a storage or HTTP error is worth retrying (5xx, 429, resets,
  timeouts), by the types of the exception and its causes."""
  for err in _chain(e):
    if isinstance(err, FetchError):
      return err.transient
    if isinstance(err, FileNotFoundError):
      return False
    status = _status_of(err)
    if status is not None:
      return status == 429 or 500 <= status < 600
    if isinstance(err, _transient_types()):
      return True
  return False


def is_not_found(e: BaseException) -> bool:
  """Whether storage answered that there is no such file (404, 410,
  ENOENT), by the types of the exception and its causes."""
  for err in _chain(e):
    if isinstance(err, FetchError):
      return err.not_found
    if isinstance(err, _not_found_types()):
      return True
    if _status_of(err) in _NOT_FOUND_STATUS:
      return True
  return False


# --------------------------------------------------------------------------
# Fetchers


def _too_large(max_bytes: int) -> FetchError:
  return FetchError(f"file is larger than --max_file_bytes {max_bytes}; raise "
                    f"the flag to process it")


def read_filesystem(uri: str, max_bytes: int,
                    opener: Optional[Callable] = None) -> bytes:
  """Reads a photo through Beam's FileSystems (local, file://, gs://, s3://).

  Args:
    uri: where the photo is.
    max_bytes: larger files are refused without being read whole.
    opener: opens a URI for reading; Beam's FileSystems by default.

  Raises:
    FetchError: missing, too large, or a storage failure.
  """
  path = local_path(uri)
  if scheme_of(uri) == "s3":
    _ensure_filesystem_options()
  try:
    if opener is None:
      f = FileSystems.open(path,
                           compression_type=CompressionTypes.UNCOMPRESSED)
    else:
      f = opener(path)
    with f:
      data = f.read(max_bytes + 1)
  except FetchError:
    raise
  except Exception as e:  # noqa: BLE001 - classified by type below
    if is_not_found(e):
      raise FetchError(f"file not found: {uri}", not_found=True) from e
    scheme = scheme_of(uri)
    if isinstance(e, ValueError) and scheme and scheme not in HTTP_SCHEMES:
      try:
        check_scheme(uri)
      except SchemeError as missing:
        raise FetchError(str(missing)) from e
    raise FetchError(f"{type(e).__name__}: {e}",
                     transient=is_transient(e)) from e
  if len(data) > max_bytes:
    raise _too_large(max_bytes)
  return data


def _ensure_filesystem_options() -> None:
  """Gives Beam's FileSystems default options when none were set.

  Beam's S3 filesystem refuses to work without pipeline options, even when
  every S3 option is at its default; a pipeline sets them, a plain call
  (a test, a tool) may not have.
  """
  if FileSystems._pipeline_options is None:  # pylint: disable=protected-access
    from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
    FileSystems.set_options(PipelineOptions([]))


def _retry_after(value: Optional[str], now: Callable[[], float]
                 ) -> Optional[float]:
  """Seconds of a Retry-After header (seconds or an HTTP date)."""
  if not value:
    return None
  value = value.strip()
  if value.isdigit():
    return float(value)
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  if when is None:
    return None
  return max(0.0, when.timestamp() - now())


_NOT_AN_IMAGE = re.compile(
    r"^(text/|application/(json|[-.\w]*\+json|xml|[-.\w]*\+xml|xhtml|"
    r"javascript|pdf))", re.I)
# What decode.sniff_format calls a body that is text, not an image.
_TEXT_KINDS = ("HTML", "XML", "JSON", "text")


def _describe_text(label: str, head: bytes) -> str:
  """A text body for the error row: its page title or first characters."""
  text = head.decode("utf-8", "replace")
  title = re.search(r"<title[^>]*>([^<]{1,120})", text, re.I)
  if title:
    return f"{label} page titled {title.group(1).strip()!r}"
  snippet = " ".join(text.split())[:80]
  return f"{label} ({snippet!r})" if snippet else label


def _describe_binary(head: bytes, length: Optional[int]) -> str:
  """A binary body that is no image, described (never quoted as text)."""
  kind = decode.sniff_format(head)
  size = (f"{length:,} bytes" if length is not None
          else f"{len(head):,} bytes or more" if len(head) >= _HEAD_BYTES
          else f"{len(head):,} bytes")
  start = " ".join(f"0x{b:02x}" for b in head[:4])
  named = f" ({kind})" if kind else ""
  return f"binary body{named}, {size}, starts {start}"


def check_body(content_type: str, head: bytes, length: Optional[int],
               url: str) -> None:
  """Refuses a 200 body that is not a photo; its bytes decide, not its label.

  Args:
    content_type: the response's media type, lower case, no parameters.
    head: the body's first bytes (up to 4096: enough to sniff a format and
      find a page title).
    length: the body's declared length in bytes, when known.
    url: for the reason.

  Raises:
    FetchError: an HTML, XML, JSON or text body (with its title or first
      characters), or, under a non-image Content-Type, a binary body that
      is not an image (described by size and first bytes).  A body that
      starts like an image passes whatever its Content-Type; so does an
      unrecognised binary body labelled as an image, for the decoder to
      name.
  """
  if decode.is_image(head):
    return
  kind = decode.sniff_format(head)
  labelled = content_type or "no Content-Type"
  if kind in _TEXT_KINDS:
    label = (content_type if _NOT_AN_IMAGE.match(content_type)
             else f"{kind} body labelled {labelled}")
    raise FetchError(f"the server sent {_describe_text(label, head)}, not an "
                     f"image: {url}")
  if _NOT_AN_IMAGE.match(content_type):
    what = _describe_binary(head, length) if head else "an empty body"
    raise FetchError(f"the server sent {content_type}: {what}, not an image: "
                     f"{url}")


@dataclasses.dataclass
class _Host:
  """What the fetcher knows of one host (guarded by the fetcher's lock).

  Attributes:
    slot: ``per_host_concurrency`` slots for requests in flight.
    failures: consecutive connection failures, timeouts and 5xx.
    opened_at: monotonic time the breaker opened (or a trial failed);
      None while closed.
    trial: a half-open trial request is in flight.
    not_before: monotonic time before which no first attempt starts
      (Retry-After, 429).
  """

  slot: threading.BoundedSemaphore
  failures: int = 0
  opened_at: Optional[float] = None
  trial: bool = False
  not_before: float = 0.0


class HttpFetcher:
  """Fetches http(s) photos through one pooled urllib3 client.

  One per worker process and configuration (``http_fetcher``); thread-safe.
  Each attempt holds one of ``per_host_concurrency`` slots of its host.
  Per host, it also keeps the circuit breaker (``host_failure_limit``,
  ``host_quiet_s``) and the pause a 429 or Retry-After asked for.  All of
  this is per process: each worker process of a job keeps its own.

  Args:
    config: the fetch flags.
    now: wall-clock seconds (for Retry-After dates).
    clock: monotonic seconds (deadlines, breaker, pauses).
  """

  def __init__(self, config: FetchConfig,
               now: Callable[[], float] = time.time,
               clock: Callable[[], float] = time.monotonic):
    import urllib3  # pylint: disable=import-outside-toplevel
    self._config = config
    self._now = now
    self._clock = clock
    self._pool = urllib3.PoolManager(
        num_pools=256, maxsize=config.per_host_concurrency, block=True,
        headers={"User-Agent": config.user_agent_header},
        timeout=urllib3.Timeout(connect=config.connect_timeout,
                                read=config.read_timeout),
        retries=urllib3.Retry(total=None, connect=0, read=0, status=0,
                              other=0, redirect=config.max_redirects,
                              raise_on_redirect=True,
                              raise_on_status=False))
    self._lock = threading.Lock()
    self._hosts: Dict[str, _Host] = {}
    self._in_flight: Dict[str, int] = {}
    self.peak_in_flight: Dict[str, int] = {}

  def _host(self, host: str) -> _Host:
    with self._lock:
      if host not in self._hosts:
        self._hosts[host] = _Host(threading.BoundedSemaphore(
            self._config.per_host_concurrency))
      return self._hosts[host]

  def _count(self, host: str, delta: int) -> None:
    with self._lock:
      now = self._in_flight.get(host, 0) + delta
      self._in_flight[host] = now
      self.peak_in_flight[host] = max(self.peak_in_flight.get(host, 0), now)

  def _remaining(self, deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else deadline - self._clock()

  def fetch(self, url: str, max_bytes: int, deadline: Optional[float] = None,
            wait_for_host: bool = True,
            sleep: Callable[[float], None] = time.sleep) -> bytes:
    """One attempt at a photo's bytes.

    Args:
      url: the photo's http(s) URL.
      max_bytes: larger bodies are refused.
      deadline: monotonic time by which the photo must be complete; None:
        no deadline beyond the connect and read timeouts.
      wait_for_host: wait out a pause the host asked for (a first attempt;
        a retry has waited in its own schedule).
      sleep: how that wait is slept (tests).

    Raises:
      FetchError: with ``transient``, ``not_found`` and ``retry_after`` set
        from the response or the failure's type; ``PhotoTimeout`` past the
        deadline; ``HostUnavailable`` while the host's breaker is open.
    """
    host = (urllib.parse.urlsplit(url).netloc or url).lower()
    state = self._host(host)
    if wait_for_host:
      self._wait_for_host(host, state, url, deadline, sleep)
    trial = self._admit(host, state)
    failed = None  # no answer and no failure yet: the breaker is told nothing
    try:
      remaining = self._remaining(deadline)
      if not state.slot.acquire(timeout=None if remaining is None
                                else max(remaining, 0)):
        raise photo_timeout_error(self._config.photo_timeout, url,
                                  f"waited for one of the "
                                  f"{self._config.per_host_concurrency} "
                                  f"request slots of {host}")
      try:
        self._count(host, 1)
        data = self._attempt(url, max_bytes, deadline)
        failed = False
        return data
      except FetchError as e:
        failed = isinstance(e, PhotoTimeout)
        raise
      except Exception as e:  # noqa: BLE001 - classified by type below
        self._pause(state, e)
        remaining = self._remaining(deadline)
        if remaining is not None and remaining <= 0:
          failed = True
          # Most often the socket's read, bounded by what was left.
          raise photo_timeout_error(self._config.photo_timeout, url) from e
        failed = _host_failed(e)
        raise self._failure(url, e) from e
      finally:
        self._count(host, -1)
        state.slot.release()
    finally:
      self._record(host, state, failed, trial)

  def _wait_for_host(self, host: str, state: _Host, url: str,
                     deadline: Optional[float],
                     sleep: Callable[[float], None]) -> None:
    with self._lock:
      wait = state.not_before - self._clock()
    if wait <= 0:
      return
    remaining = self._remaining(deadline)
    if remaining is not None and wait >= remaining:
      raise FetchError(f"{host} asked for a pause of {wait:.0f}s (429 or "
                       f"Retry-After), longer than what is left of "
                       f"--photo_timeout {self._config.photo_timeout:g}: "
                       f"{url}")
    sleep(wait)

  def _pause(self, state: _Host, e: BaseException) -> None:
    """A 429 or a Retry-After pauses the host's next first attempts."""
    if not isinstance(e, HttpStatusError) or (
        e.status not in _RETRY_AFTER_STATUS):
      return
    pause = e.retry_after
    if pause is None and e.status == 429:
      pause = DEFAULT_429_PAUSE_S
    if pause:
      with self._lock:
        state.not_before = max(state.not_before, self._clock() +
                               min(pause, MAX_RETRY_AFTER_S))

  def _admit(self, host: str, state: _Host) -> bool:
    """Whether this attempt is the half-open trial of an open breaker.

    Raises:
      HostUnavailable: the breaker is open (or its trial is in flight).
    """
    limit = self._config.host_failure_limit
    with self._lock:
      if not limit or state.opened_at is None:
        return False
      if (self._clock() - state.opened_at >= self._config.host_quiet_s
          and not state.trial):
        state.trial = True
        return True
    raise HostUnavailable(
        f"host unavailable after {limit} consecutive failures (connection "
        f"failures, timeouts or 5xx): {host}; this worker process tries it "
        f"again {self._config.host_quiet_s:g} s after its last failure")

  def _record(self, host: str, state: _Host, failed: Optional[bool],
              trial: bool) -> None:
    """Counts an attempt's outcome towards the host's breaker (None: the
    attempt never reached the host)."""
    limit = self._config.host_failure_limit
    with self._lock:
      if trial:
        state.trial = False
      if failed is None:
        return
      if not failed:
        if state.opened_at is not None:
          logging.info("host %s answers again: its photos are fetched", host)
        state.failures, state.opened_at = 0, None
        return
      state.failures += 1
      if limit and (trial or (state.opened_at is None
                              and state.failures >= limit)):
        if state.opened_at is None:
          logging.warning(
              "host %s unavailable after %d consecutive failures: its photos "
              "fail at once for %g s", host, state.failures,
              self._config.host_quiet_s)
        state.opened_at = self._clock()

  def _attempt(self, url: str, max_bytes: int,
               deadline: Optional[float]) -> bytes:
    import urllib3  # pylint: disable=import-outside-toplevel
    timeout = None
    remaining = self._remaining(deadline)
    if remaining is not None:
      if remaining <= 0:
        raise photo_timeout_error(self._config.photo_timeout, url)
      timeout = urllib3.Timeout(
          connect=min(self._config.connect_timeout, remaining),
          read=min(self._config.read_timeout, remaining))
    resp = self._pool.request("GET", url, preload_content=False,
                              redirect=True, timeout=timeout)
    done = False
    try:
      if resp.status != 200:
        raise HttpStatusError(
            resp.status, http.client.responses.get(resp.status, ""), url,
            _retry_after(resp.headers.get("Retry-After"), self._now)
            if resp.status in _RETRY_AFTER_STATUS else None)
      content_type = (resp.headers.get("Content-Type") or "").split(";")[0]
      content_type = content_type.strip().lower()
      length = resp.headers.get("Content-Length")
      length = int(length) if length and length.isdigit() else None
      if length is not None and length > max_bytes:
        raise _too_large(max_bytes)
      head = self._read(resp, min(_HEAD_BYTES, max_bytes + 1), deadline, url)
      check_body(content_type, head, length, url)
      data = head
      if len(head) == min(_HEAD_BYTES, max_bytes + 1):  # more may follow
        data += self._read(resp, max_bytes + 1 - len(head), deadline, url)
      if len(data) > max_bytes:
        raise _too_large(max_bytes)
      done = True
      return data
    finally:
      if not done:
        # A body left unread (an error status, a page, a photo too large)
        # makes the connection unusable: close it.  Either way it goes back
        # to the pool, whose slots are otherwise lost for good (the pool
        # blocks when it has none left: a few failures would hang the job).
        resp.close()
      resp.release_conn()

  def _read(self, resp, limit: int, deadline: Optional[float],
            url: str) -> bytes:
    """Up to ``limit`` bytes of the body, fewer only at its end.

    Read in chunks of what the server has sent; before each, the deadline
    is checked and the socket may block for at most what is left of it.

    Raises:
      PhotoTimeout: the deadline passed; urllib3's errors otherwise.
    """
    chunks, size = [], 0
    while size < limit:
      remaining = self._remaining(deadline)
      if remaining is not None:
        if remaining <= 0:
          raise photo_timeout_error(
              self._config.photo_timeout, url,
              f"{size:,} bytes of the body read by then")
        sock = getattr(resp.connection, "sock", None)
        if sock is not None:
          sock.settimeout(min(self._config.read_timeout, remaining))
      chunk = resp.read1(min(_CHUNK_BYTES, limit - size))
      if not chunk:
        break
      chunks.append(chunk)
      size += len(chunk)
    return b"".join(chunks)

  def _failure(self, url: str, e: BaseException) -> FetchError:
    import urllib3.exceptions as uexc  # pylint: disable=import-outside-toplevel
    if isinstance(e, HttpStatusError):
      if e.status in _NOT_FOUND_STATUS:
        return FetchError(f"not found (HTTP {e.status}): {url}",
                          not_found=True)
      wait = ""
      if e.retry_after is not None:
        wait = f"; the server asked to retry after {e.retry_after:.0f}s"
      return FetchError(f"{e}{wait}", transient=is_transient(e),
                        retry_after=e.retry_after)
    if isinstance(e, uexc.MaxRetryError) and isinstance(
        e.reason, uexc.ResponseError):
      return FetchError(f"more than --max_redirects "
                        f"{self._config.max_redirects} redirects: {url}")
    reason = e
    if isinstance(e, uexc.MaxRetryError) and e.reason is not None:
      reason = e.reason
    return FetchError(f"{type(reason).__name__}: {reason} ({url})",
                      transient=is_transient(e))


def _host_failed(e: BaseException) -> bool:
  """Whether an attempt's failure counts against its host's breaker: 5xx,
  or no answer at all (refused, reset, timed out); a 4xx or too many
  redirects is an answer."""
  import urllib3.exceptions as uexc  # pylint: disable=import-outside-toplevel
  if isinstance(e, HttpStatusError):
    return 500 <= e.status < 600
  if isinstance(e, uexc.MaxRetryError) and isinstance(
      e.reason, uexc.ResponseError):
    return False
  return True


_SHARED_LOCK = threading.Lock()
_HTTP_FETCHERS: Dict[FetchConfig, HttpFetcher] = {}
_FETCH_POOLS: Dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def http_fetcher(config: FetchConfig) -> HttpFetcher:
  """The worker process's HTTP fetcher for ``config`` (made once)."""
  with _SHARED_LOCK:
    if config not in _HTTP_FETCHERS:
      _HTTP_FETCHERS[config] = HttpFetcher(config)
    return _HTTP_FETCHERS[config]


def fetch_pool(concurrency: int) -> concurrent.futures.ThreadPoolExecutor:
  """The worker process's pool of ``concurrency`` fetch threads, shared by
  every DoFn instance in the process (made once per size)."""
  with _SHARED_LOCK:
    if concurrency not in _FETCH_POOLS:
      _FETCH_POOLS[concurrency] = concurrent.futures.ThreadPoolExecutor(
          concurrency, thread_name_prefix="natvision-fetch")
    return _FETCH_POOLS[concurrency]


# --------------------------------------------------------------------------
# Retries


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
                opener: Optional[Callable] = None) -> bytes:
  """A photo's bytes, fetched the way its scheme needs.

  http(s) is fetched by the process's pooled client, retrying transient
  failures, all within ``config.photo_timeout``; gs:// and s3:// go through Beam's FileSystems, whose clients
  have already retried what they raise, so they are tried once here; other
  paths are retried like http(s).

  Args:
    uri: where the photo is.
    max_bytes: larger photos are refused (not retried).
    config: the fetch flags; defaults when None.
    attempts, base_delay, sleep, on_retry: see ``with_retries``.
    opener: replaces FileSystems.open for non-http URIs (tests).

  Raises:
    FetchError: the reason the photo could not be fetched.
  """
  if not uri:
    raise FetchError("empty uri")
  scheme = scheme_of(uri)
  if scheme in HTTP_SCHEMES and opener is None:
    config = config or FetchConfig()
    fetcher = http_fetcher(config)
    deadline = time.monotonic() + config.photo_timeout
    tries = []

    def attempt() -> bytes:
      tries.append(1)  # only a first try waits out a pause of its host
      return fetcher.fetch(uri, max_bytes, deadline=deadline,
                           wait_for_host=len(tries) == 1, sleep=sleep)

    return with_retries(attempt, uri, attempts, base_delay, sleep, on_retry,
                        deadline=deadline, timeout_s=config.photo_timeout)
  attempt = functools.partial(read_filesystem, uri, max_bytes, opener)
  if scheme in SELF_RETRYING_SCHEMES:
    attempts = 1
  return with_retries(attempt, uri, attempts, base_delay, sleep, on_retry)


# --------------------------------------------------------------------------
# S3 without credentials


_S3_CLIENTS: Dict[Tuple, object] = {}


def _s3_client(kwargs: dict):
  """A boto3 S3 client for Beam's options, made once per process.

  Unsigned (like ``aws --no-sign-request``) when neither the options nor
  boto3's usual chain (environment, config files, instance metadata) give
  credentials; in us-east-1 when no region is configured anywhere.  boto3
  clients are thread-safe, and credentials that expire (roles, instance
  profiles) are refreshed by the client itself.
  """
  import boto3  # pylint: disable=import-outside-toplevel
  from botocore import UNSIGNED  # pylint: disable=import-outside-toplevel
  from botocore.config import Config  # pylint: disable=import-outside-toplevel
  key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
  with _SHARED_LOCK:
    if key in _S3_CLIENTS:
      return _S3_CLIENTS[key]
  session = boto3.session.Session()
  kwargs = dict(kwargs)
  if kwargs.get("aws_access_key_id") is None and (
      session.get_credentials() is None):
    logging.info("no AWS credentials found: s3:// is read unsigned (public "
                 "buckets only)")
    config = Config(signature_version=UNSIGNED)
    if kwargs.get("config") is not None:
      config = kwargs["config"].merge(config)
    kwargs["config"] = config
  if not kwargs.get("region_name") and not session.region_name:
    kwargs["region_name"] = "us-east-1"
  client = session.client(**kwargs)
  with _SHARED_LOCK:
    return _S3_CLIENTS.setdefault(key, client)


def _install_unsigned_s3() -> None:
  """Makes Beam's S3 client read public buckets without credentials.

  Beam builds a new boto3 session and client for every S3 call, from its
  ``--s3_*`` options; boto3 then signs every request and fails with
  NoCredentialsError when it finds no credentials (after a probe of the
  instance metadata service, on every call).  What Beam's client module
  calls ``boto3`` is replaced by a shim whose sessions hand out one client
  per process and options, made by ``_s3_client``.
  """
  try:
    from apache_beam.io.aws.clients.s3 import boto3_client  # pylint: disable=import-outside-toplevel
    import boto3  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return
  if getattr(boto3_client, "_natvision_shared_clients", False):
    return

  class _Session:
    """What Beam's client calls ``boto3.session.Session()``."""

    def client(self, **kwargs):
      return _s3_client(kwargs)

  class _Boto3:
    """What Beam's client module calls ``boto3``."""
    session = type("session", (), {"Session": _Session})

  boto3_client.boto3 = _Boto3()
  boto3_client._natvision_shared_clients = True  # pylint: disable=protected-access


_install_unsigned_s3()
