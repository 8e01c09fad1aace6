"""The http(s) client: one pooled urllib3 client per worker process.

Connect and read timeouts, a bounded number of redirects, a ``User-Agent``
naming natvision (``--user_agent`` adds a contact), a cap on requests in
flight per host per process, and a deadline per photo
(``--photo_timeout``) from the DNS lookup to the last byte.  ``Retry-After`` on 429 and 503 pauses the host for
the process's other photos; 404 and 410 mean "not found".
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import functools
import heapq
import http.client
import socket
import threading
import time
import urllib.parse
from typing import Callable, Dict, Optional

from natvision.transforms.fetch.body import HEAD_BYTES, check_body
from natvision.transforms.fetch.breaker import SlotBreaker
from natvision.transforms.fetch.errors import (NOT_FOUND_STATUS, RETRY_AFTER_STATUS,
                                     FetchError, HttpStatusError, PhotoTimeout,
                                     is_transient, photo_timeout_error,
                                     too_large)
from natvision.transforms.fetch.settings import (DEFAULT_429_PAUSE_S, MAX_RETRY_AFTER_S,
                                       FetchConfig)

_CHUNK_BYTES = 64 * 1024


def retry_after_s(value: Optional[str], now: Callable[[], float]
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

# The deadline watch of the request this thread is making, if any; the
# connection classes below hand it the connection they are sending on.
_THREAD = threading.local()


class _Watch:
  """One request's deadline: its socket is shut down if it is still running
  then, which ends any read blocked on it (status line, headers or body)."""

  def __init__(self, deadline: float, clock: Callable[[], float]):
    self.deadline = deadline
    self.clock = clock
    self._lock = threading.Lock()
    self._conn = None
    self._done = False
    self.fired = False

  def attach(self, conn) -> None:
    """The connection the request now uses (a redirect may change it)."""
    with self._lock:
      if self._done:
        return
      self._conn = conn
      if self.fired:
        _shut(conn)

  def expire(self) -> None:
    with self._lock:
      if self._done:
        return
      self.fired = True
      if self._conn is not None:
        _shut(self._conn)

  def stop(self) -> bool:
    """Ends the watch (before the connection goes back to the pool);
    whether the deadline fired first."""
    with self._lock:
      self._done = True
      return self.fired


def _shut(conn) -> None:
  sock = getattr(conn, "sock", None)
  if sock is None:
    return
  try:  # the plain socket's shutdown, also for TLS: no TLS state is touched
    socket.socket.shutdown(sock, socket.SHUT_RDWR)
  except OSError:
    pass


class _Deadlines:
  """One thread per fetcher that expires watches at their deadlines."""

  def __init__(self, clock: Callable[[], float]):
    self._clock = clock
    self._cond = threading.Condition()
    self._heap = []
    self._count = 0
    self._thread = None

  def watch(self, deadline: float) -> _Watch:
    watch = _Watch(deadline, self._clock)
    with self._cond:
      self._count += 1
      heapq.heappush(self._heap, (deadline, self._count, watch))
      if self._thread is None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="natvision-photo-deadlines")
        self._thread.start()
      self._cond.notify()
    return watch

  def _run(self) -> None:
    while True:
      with self._cond:
        while not self._heap:
          self._cond.wait()
        deadline, _, watch = self._heap[0]
        wait = deadline - self._clock()
        if wait > 0:
          self._cond.wait(wait)
          continue
        heapq.heappop(self._heap)
      watch.expire()


# Name lookups run here so that a photo waits for one no longer than its
# deadline: ``socket.getaddrinfo`` takes no timeout, and a resolver that
# does not answer holds the calling thread for the system's whole retry
# schedule (resolv.conf: 5 s per attempt and nameserver by default).  A
# lookup abandoned at the deadline finishes here, holding one of these
# threads, not a photo's.
_RESOLVER_THREADS = 8
_resolver = concurrent.futures.ThreadPoolExecutor(
    _RESOLVER_THREADS, thread_name_prefix="natvision-dns")


def _resolve(host: str, port: int, watch: "_Watch"):
  """``getaddrinfo`` for a TCP connection, waited for until the deadline.

  Raises:
    socket.gaierror: the name does not resolve.
    socket.timeout: no answer by the photo's deadline.
  """
  future = _resolver.submit(socket.getaddrinfo, host, port, 0,
                            socket.SOCK_STREAM)
  try:
    return future.result(timeout=max(0.0, watch.deadline - watch.clock()))
  except concurrent.futures.TimeoutError as e:
    raise socket.timeout(f"no answer from DNS for {host} by the photo's "
                         f"deadline") from e


def _connect_resolved(conn, watch: "_Watch"):
  """urllib3's ``_new_conn`` with the name lookup under the photo's
  deadline (``_resolve``): the connection is made to each address found in
  turn, as ``create_connection`` does; errors become urllib3's own."""
  import urllib3  # pylint: disable=import-outside-toplevel
  from urllib3.util import connection  # pylint: disable=import-outside-toplevel
  try:
    found = _resolve(conn._dns_host, conn.port, watch)  # pylint: disable=protected-access
  except socket.gaierror as e:
    raise urllib3.exceptions.NameResolutionError(conn.host, conn, e) from e
  except socket.timeout as e:
    raise urllib3.exceptions.ConnectTimeoutError(conn, str(e)) from e
  last = None
  for address in dict.fromkeys(info[4][0] for info in found):
    try:
      return connection.create_connection(
          (address, conn.port), conn.timeout,
          source_address=conn.source_address,
          socket_options=conn.socket_options)
    except socket.timeout as e:
      last = urllib3.exceptions.ConnectTimeoutError(
          conn, f"Connection to {conn.host} timed out. (connect timeout="
          f"{conn.timeout})")
      last.__cause__ = e
    except OSError as e:
      last = urllib3.exceptions.NewConnectionError(
          conn, f"Failed to establish a new connection: {e}")
      last.__cause__ = e
  raise last or urllib3.exceptions.NewConnectionError(
      conn, f"Failed to establish a new connection: no address for "
      f"{conn.host}")


def _watched(base):
  """``base`` (urllib3's HTTP or HTTPS connection) telling the thread's
  watch which connection its request is on, and looking its host's name
  up under the photo's deadline."""

  class Watched(base):

    def _new_conn(self):
      watch = getattr(_THREAD, "watch", None)
      from urllib3.util.ssl_ import is_ipaddress  # pylint: disable=import-outside-toplevel
      if (watch is None or is_ipaddress(self._dns_host.strip("[]"))  # pylint: disable=protected-access
          or getattr(self, "proxy", None) is not None):
        return super()._new_conn()
      return _connect_resolved(self, watch)

    def connect(self):
      super().connect()
      watch = getattr(_THREAD, "watch", None)
      if watch is not None:
        watch.attach(self)

    def request(self, *args, **kwargs):  # pylint: disable=arguments-differ
      watch = getattr(_THREAD, "watch", None)
      if watch is not None:
        watch.attach(self)
      return super().request(*args, **kwargs)

  Watched.__name__ = f"Watched{base.__name__}"
  return Watched


@functools.lru_cache(maxsize=None)
def _pool_classes() -> Dict[str, type]:
  import urllib3  # pylint: disable=import-outside-toplevel

  class Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = _watched(urllib3.connection.HTTPConnection)

  class TlsPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _watched(urllib3.connection.HTTPSConnection)

  return {"http": Pool, "https": TlsPool}


@dataclasses.dataclass
class _Host:
  """What the fetcher knows of one host (guarded by the fetcher's lock).

  Attributes:
    slot: ``per_host_concurrency`` slots for requests in flight.
    not_before: monotonic time before which no first attempt starts
      (Retry-After, 429).
    breaker: the host's breaker in this process, for photos fetched with
      no slot state of their own (see ``HttpFetcher.fetch``).
  """

  slot: threading.BoundedSemaphore
  breaker: SlotBreaker
  not_before: float = 0.0


class HttpFetcher:
  """Fetches http(s) photos through one pooled urllib3 client.

  One per worker process and configuration (``http_fetcher``); thread-safe.
  Each attempt holds one of ``per_host_concurrency`` slots of its host (a
  cap per process; the job-wide cap is transforms/hosts.py's).  Per host
  and process, it keeps the pause a 429 or Retry-After asked for, which
  every photo of the host in the process waits out, and a circuit breaker
  for photos fetched without one of their own (the slots' breakers,
  ``breaker.SlotBreaker``, are kept in Beam state by the host-keyed DoFn).

  A photo's deadline bounds each attempt whole: the connection (connect
  timeout at most what is left), then every read of the status line, the
  headers and the body: a watchdog thread shuts the socket down at the
  deadline, so a server that never sends its headers, or sends them a byte
  at a time, is cut off then.  Name resolution is not bounded by it.

  Args:
    config: the fetch flags.
    now: wall-clock seconds (for Retry-After dates and breakers).
    clock: monotonic seconds (deadlines, pauses).
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
    self._pool.pool_classes_by_scheme = _pool_classes()
    self._deadlines = _Deadlines(clock)
    self._lock = threading.Lock()
    self._hosts: Dict[str, _Host] = {}
    self._in_flight: Dict[str, int] = {}
    self.peak_in_flight: Dict[str, int] = {}

  def _host(self, host: str) -> _Host:
    with self._lock:
      if host not in self._hosts:
        self._hosts[host] = _Host(
            threading.BoundedSemaphore(self._config.per_host_concurrency),
            SlotBreaker(host, self._config.host_failure_limit,
                        self._config.host_quiet_s, now=self._now))
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
            sleep: Callable[[float], None] = time.sleep,
            guard: Optional[SlotBreaker] = None) -> bytes:
    """One attempt at a photo's bytes.

    Args:
      url: the photo's http(s) URL.
      max_bytes: larger bodies are refused.
      deadline: monotonic time by which the photo must be complete; None:
        no deadline beyond the connect and read timeouts.
      wait_for_host: wait out a pause the host asked for in this process
        (a first attempt; a retry has waited in its own schedule).
      sleep: how that wait is slept (tests).
      guard: the breaker that admits the attempt and is told its outcome
        (the photo's slot); None: the host's breaker in this process.

    Raises:
      FetchError: with ``transient``, ``not_found`` and ``retry_after`` set
        from the response or the failure's type; ``PhotoTimeout`` past the
        deadline; ``HostUnavailable`` while the guard's breaker is open.
    """
    host = (urllib.parse.urlsplit(url).netloc or url).lower()
    state = self._host(host)
    guard = guard if guard is not None else state.breaker
    if wait_for_host:
      self._wait_for_host(host, state, url, deadline, sleep)
    trial = guard.admit()
    failed = None  # no answer and no failure yet: the breaker is told nothing
    pause = None
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
        pause = self._pause(state, e)
        remaining = self._remaining(deadline)
        if remaining is not None and remaining <= 0:
          failed = True
          # A read cut off at the deadline (by its timeout or the watchdog).
          raise photo_timeout_error(self._config.photo_timeout, url) from e
        failed = _host_failed(e)
        raise self._failure(url, e) from e
      finally:
        self._count(host, -1)
        state.slot.release()
    finally:
      guard.record(failed, trial, pause)

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

  def _pause(self, state: _Host, e: BaseException) -> Optional[float]:
    """A 429 or a Retry-After pauses the host's next first attempts in this
    process; the seconds asked for (None: no pause)."""
    if not isinstance(e, HttpStatusError) or (
        e.status not in RETRY_AFTER_STATUS):
      return None
    pause = e.retry_after
    if pause is None and e.status == 429:
      pause = DEFAULT_429_PAUSE_S
    if pause:
      with self._lock:
        state.not_before = max(state.not_before, self._clock() +
                               min(pause, MAX_RETRY_AFTER_S))
    return pause or None

  def _attempt(self, url: str, max_bytes: int,
               deadline: Optional[float]) -> bytes:
    import urllib3  # pylint: disable=import-outside-toplevel
    timeout = None
    watch = None
    remaining = self._remaining(deadline)
    if remaining is not None:
      if remaining <= 0:
        raise photo_timeout_error(self._config.photo_timeout, url)
      timeout = urllib3.Timeout(
          connect=min(self._config.connect_timeout, remaining),
          read=min(self._config.read_timeout, remaining))
      watch = self._deadlines.watch(deadline)
    _THREAD.watch = watch
    try:
      resp = self._pool.request("GET", url, preload_content=False,
                                redirect=True, timeout=timeout)
      done = False
      try:
        data = self._body(resp, url, max_bytes, deadline)
        if watch is not None and watch.stop():
          # The socket was shut down at the deadline: the body may be cut.
          raise photo_timeout_error(self._config.photo_timeout, url)
        done = True
        return data
      finally:
        if not done:
          # A body left unread (an error status, a page, a photo too
          # large, a deadline) makes the connection unusable: close it.
          # Either way it goes back to the pool, whose slots are otherwise
          # lost for good (the pool blocks when it has none left: a few
          # failures would hang the job).
          resp.close()
        resp.release_conn()
    finally:
      _THREAD.watch = None
      if watch is not None:
        watch.stop()

  def _body(self, resp, url: str, max_bytes: int,
            deadline: Optional[float]) -> bytes:
    """The photo's bytes from a response whose headers are in.

    Raises:
      HttpStatusError: a status other than 200.
      FetchError: a body too large or that is not a photo.
    """
    if resp.status != 200:
      raise HttpStatusError(
          resp.status, http.client.responses.get(resp.status, ""), url,
          retry_after_s(resp.headers.get("Retry-After"), self._now)
          if resp.status in RETRY_AFTER_STATUS else None)
    content_type = (resp.headers.get("Content-Type") or "").split(";")[0]
    content_type = content_type.strip().lower()
    length = resp.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if length is not None and length > max_bytes:
      raise too_large(max_bytes)
    head = self._read(resp, min(HEAD_BYTES, max_bytes + 1), deadline, url)
    check_body(content_type, head, length, url)
    data = head
    if len(head) == min(HEAD_BYTES, max_bytes + 1):  # more may follow
      data += self._read(resp, max_bytes + 1 - len(head), deadline, url)
    if len(data) > max_bytes:
      raise too_large(max_bytes)
    return data

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
      if e.status in NOT_FOUND_STATUS:
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

