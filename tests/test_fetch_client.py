"""The http(s) client against misbehaving loopback servers: User-Agent,
redirects, the per-process cap, connections given back, the host's breaker
and pause in one process, and the photo's deadline, which bounds the status
line and headers too (a watchdog shuts the socket)."""

import concurrent.futures
import socket
import threading
import time

import pytest

from tests.http_server import PhotoServer
from tests.slow_servers import SlowHeaders
from tests.fetch_helpers import JPEG, server  # noqa: F401 (server: a fixture)
from tests.fetch_helpers import fetch_recording_sleeps as _fetch
from natvision.transforms import fetch
from natvision.transforms.fetch import client




def test_plain_get_and_user_agent(server):
  config = fetch.FetchConfig(user_agent="mailto:me@example.org")
  assert _fetch(server.url("/a.jpg"), config=config) == JPEG
  assert server.user_agents[-1] == "natvision/0.1.0 (mailto:me@example.org)"
  assert _fetch(server.url("/b.jpg")) == JPEG[::-1]
  assert server.user_agents[-1] == "natvision/0.1.0"

def test_redirects_followed_up_to_the_limit(server):
  server.plan("/old.jpg", ("redirect", "/a.jpg"))
  assert _fetch(server.url("/old.jpg")) == JPEG
  server.plan("/loop.jpg", *[("redirect", "/loop.jpg")] * 10)
  with pytest.raises(fetch.FetchError, match="more than --max_redirects 2"):
    _fetch(server.url("/loop.jpg"), config=fetch.FetchConfig(max_redirects=2))
  assert server.requests["/loop.jpg"] == 3

def test_html_with_200_names_what_came_back(server):
  page = b"<html><head><title>Just a moment...</title></head></html>"
  server.plan("/a.jpg", ("status", 200, {"Content-Type": "text/html"}, page))
  with pytest.raises(fetch.FetchError,
                     match="sent text/html page titled 'Just a moment...', "
                     "not an image") as info:
    _fetch(server.url("/a.jpg"))
  assert not info.value.transient and server.requests["/a.jpg"] == 1
  server.plan("/b.jpg", ("status", 200, {"Content-Type": "application/ld+json"},
                         b'{"@context": "x"}'))
  with pytest.raises(fetch.FetchError, match="application/ld\\+json"):
    _fetch(server.url("/b.jpg"))

def test_oversized_body_refused(server):
  with pytest.raises(fetch.FetchError, match="--max_file_bytes 100"):
    _fetch(server.url("/a.jpg"), max_bytes=100)

def test_per_host_cap_holds_under_load():
  files = {f"/{i}.jpg": JPEG for i in range(24)}
  with PhotoServer(files, latency=0.15,
                   hosts=("127.0.0.1", "127.0.0.2")) as s:
    config = fetch.FetchConfig(fetch_concurrency=16, per_host_concurrency=3)
    urls = [s.url(p, i % 2) for i, p in enumerate(files)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      got = list(pool.map(lambda u: _fetch(u, config=config), urls))
  assert got == [JPEG] * 24
  assert sorted(s.peak.values()) == [3, 3], dict(s.peak)

def test_fetch_pool_is_shared_per_process():
  assert fetch.fetch_pool(5) is fetch.fetch_pool(5)
  config = fetch.FetchConfig(fetch_concurrency=9)
  assert fetch.http_fetcher(config) is fetch.http_fetcher(config)

@pytest.mark.parametrize("failure", [("status", 503, {}, b"busy"),
                                     ("status", 404, {}, b"gone"),
                                     ("reset",)])
def test_failed_requests_give_their_connection_back(failure):
  """More failures on one host than its connection slots: none is lost.

  A response whose body is not read is closed; its connection must still go
  back to the host's pool, which blocks when it has no slot left (so a lost
  slot shows as a thread that never ends).
  """
  files = {f"/{i}.jpg": JPEG for i in range(12)}
  outcomes = []

  def fetch_all(fetcher, server):
    for path in files:
      try:
        fetcher.fetch(server.url(path), 10**6)
        outcomes.append("ok")
      except fetch.FetchError:
        outcomes.append("failed")

  with PhotoServer(files) as s:
    for path in files:
      s.plan(path, failure)
    fetcher = fetch.HttpFetcher(
        fetch.FetchConfig(fetch_concurrency=2, per_host_concurrency=2))
    for _ in range(2):  # every photo fails once, then is served
      worker = threading.Thread(target=fetch_all, args=(fetcher, s),
                                daemon=True)
      worker.start()
      worker.join(timeout=20)
      assert not worker.is_alive(), f"stuck after {len(outcomes)} requests"
  assert outcomes == ["failed"] * len(files) + ["ok"] * len(files)

def test_trickling_server_stops_at_photo_timeout():
  # 4 bytes every 50 ms: never silent for a read timeout, a minute a photo.
  with PhotoServer({"/t.jpg": JPEG}, hosts=("127.0.0.5",),
                   always=("trickle", 4, 0.05)) as s:
    config = fetch.FetchConfig(photo_timeout=1.5, read_timeout=60)
    start = time.monotonic()
    with pytest.raises(fetch.PhotoTimeout) as info:
      _fetch(s.url("/t.jpg"), config=config)
    elapsed = time.monotonic() - start
  assert 1.4 <= elapsed < 3.5, elapsed
  assert str(info.value).startswith(
      "photo_timeout: no complete response within 1.5 s (http://127.0.0.5:")
  assert not info.value.transient and s.requests["/t.jpg"] == 1

def test_breaker_opens_on_a_failing_host_and_closes_after_a_trial():
  files = {f"/{i}.jpg": JPEG for i in range(40)}
  with PhotoServer(files, always=("status", 503, {}, b"down")) as s:
    config = fetch.FetchConfig(host_failure_limit=5, host_quiet_s=0.5)
    errors = []
    for path in files:
      with pytest.raises(fetch.FetchError) as info:
        _fetch(s.url(path), config=config, attempts=4)
      errors.append(str(info.value))
    # Photo 0: 4 attempts, photo 1: one more, then the breaker is open.
    assert sum(s.requests.values()) == 5, dict(s.requests)
    assert "HTTP 503" in errors[0] and "gave up after 4" in errors[0]
    unavailable = [e for e in errors if e.startswith(
        "host unavailable after 5 consecutive failures")]
    assert len(unavailable) == 39
    time.sleep(0.6)  # half-open: one trial, which fails and reopens
    with pytest.raises(fetch.HostUnavailable):
      _fetch(s.url("/0.jpg"), config=config)
    with pytest.raises(fetch.HostUnavailable):
      _fetch(s.url("/1.jpg"), config=config)
    assert sum(s.requests.values()) == 6
    s.always = None  # the host recovers
    time.sleep(0.6)
    assert [_fetch(s.url(p), config=config) for p in list(files)[:3]] == (
        [JPEG] * 3)
    assert sum(s.requests.values()) == 9

def test_breaker_on_a_refusing_host():
  dead = socket.socket()
  dead.bind(("127.0.0.6", 0))
  port = dead.getsockname()[1]
  dead.close()  # nothing listens: connection refused
  config = fetch.FetchConfig(host_failure_limit=3, host_quiet_s=60)
  retries = []
  errors = []
  for i in range(30):
    with pytest.raises(fetch.FetchError) as info:
      fetch.fetch_bytes(f"http://127.0.0.6:{port}/{i}.jpg", 10**6, config,
                        attempts=4, sleep=lambda s: None,
                        on_retry=lambda: retries.append(1))
    errors.append(str(info.value))
  # Three refused attempts open the breaker; nothing more is retried.
  assert len(retries) == 3
  assert all(e.startswith("host unavailable after 3 consecutive failures "
                          f"(connection failures, timeouts or 5xx): "
                          f"127.0.0.6:{port}") for e in errors), errors[:2]

def test_4xx_and_pages_do_not_count_against_the_host():
  files = {f"/{i}.jpg": JPEG for i in range(6)}
  with PhotoServer(files) as s:
    config = fetch.FetchConfig(host_failure_limit=2, host_quiet_s=60)
    for path in files:
      s.plan(path, ("status", 403, {}, b"no"))
      with pytest.raises(fetch.FetchError, match="HTTP 403"):
        _fetch(s.url(path), config=config)
    assert _fetch(s.url("/0.jpg"), config=config) == JPEG

def test_retry_after_pauses_the_host_for_other_photos(server):
  config = fetch.FetchConfig(user_agent="pause-test")
  server.plan("/a.jpg", ("status", 429, {"Retry-After": "5"}, b""))
  with pytest.raises(fetch.FetchError, match="HTTP 429"):
    _fetch(server.url("/a.jpg"), attempts=1, config=config)
  sleeps = []
  assert _fetch(server.url("/b.jpg"), sleeps, attempts=1,
                config=config) == JPEG[::-1]
  assert len(sleeps) == 1 and 4.0 < sleeps[0] <= 5.0, sleeps
  # A pause longer than what is left of the photo's deadline fails it now.
  short = fetch.FetchConfig(user_agent="pause-test", photo_timeout=2)
  server.plan("/a.jpg", ("status", 503, {"Retry-After": "30"}, b""))
  with pytest.raises(fetch.FetchError, match="HTTP 503"):
    _fetch(server.url("/a.jpg"), attempts=1, config=short)
  with pytest.raises(fetch.FetchError, match="asked for a pause of 30s"):
    _fetch(server.url("/b.jpg"), attempts=1, config=short)


@pytest.mark.parametrize("mode,address", [("silent", "127.0.0.31"),
                                          ("trickle", "127.0.0.32")])
def test_headers_are_under_the_photo_deadline(mode, address):
  """A server that never sends headers, or sends them a byte every 0.2 s
  (about 50 s for the whole header block), holds a photo no longer than
  --photo_timeout 1.5 s; the read timeout (60 s) alone would not stop it."""
  with SlowHeaders(address, mode, pause=0.2) as server:
    config = fetch.FetchConfig(photo_timeout=1.5, read_timeout=60,
                               host_failure_limit=0)
    start = time.monotonic()
    with pytest.raises(fetch.PhotoTimeout) as info:
      fetch.fetch_bytes(server.base + "/a.jpg", 10**6, config, attempts=3)
    elapsed = time.monotonic() - start
    time.sleep(0.5)  # the server notices the hang-up
    held = list(server.held_s)
  assert 1.4 <= elapsed < 2.5, elapsed  # 1.5 s, with 1 s of slack
  assert str(info.value).startswith(
      f"photo_timeout: no complete response within 1.5 s ({server.base}")
  assert server.connections == 1 and len(held) == 1
  assert held[0] < 2.5, held


def test_a_photo_on_time_keeps_its_connection():
  """The watch ends with the request: a fetch that beat its deadline does
  not have its (pooled) socket shut down later."""
  jpeg = b"\xff\xd8\xff\xe0" + b"\x00" * 3000
  with PhotoServer({"/a.jpg": jpeg}, hosts=("127.0.0.33",)) as s:
    fetcher = client.HttpFetcher(fetch.FetchConfig(photo_timeout=0.5))
    for _ in range(3):
      deadline = time.monotonic() + 0.5
      assert fetcher.fetch(s.url("/a.jpg"), 10**6, deadline=deadline) == jpeg
      time.sleep(0.6)  # past the deadline of the fetch before
  assert s.requests["/a.jpg"] == 3


def test_retry_after_seconds_and_dates():
  assert client.retry_after_s("7", time.time) == 7.0
  assert client.retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT",
                              lambda: 1445412470.0) == pytest.approx(10.0)
  assert client.retry_after_s("soon", time.time) is None
  assert client.retry_after_s(None, time.time) is None


@pytest.fixture()
def names(monkeypatch):
  """A resolver for names under .natvision.test (the table: name ->
  loopback address, or "" for a name that does not exist; a name not in
  it gets no answer); other names resolve as usual.  A stuck lookup is released at teardown."""
  real = socket.getaddrinfo
  table, release, asked = {}, threading.Event(), []

  def getaddrinfo(host, port, *args, **kwargs):
    if isinstance(host, str) and host.endswith(".natvision.test"):
      asked.append(host)
      address = table.get(host)
      if address == "":
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
      if address is None:
        release.wait(60)
        raise socket.gaierror(socket.EAI_AGAIN, "resolver never answered")
      return real(address, port, *args, **kwargs)
    return real(host, port, *args, **kwargs)

  monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
  yield table, asked
  release.set()


def test_a_name_lookup_that_never_answers_is_under_the_photo_deadline(names):
  """socket.getaddrinfo takes no timeout: a resolver that does not answer
  used to hold the photo for the system's whole retry schedule, past
  --photo_timeout; the lookup is now waited for until the deadline."""
  _, asked = names
  config = fetch.FetchConfig(photo_timeout=1.0, connect_timeout=30,
                             host_failure_limit=0)
  start = time.monotonic()
  with pytest.raises(fetch.FetchError) as info:
    fetch.fetch_bytes("http://stuck.natvision.test:9/a.jpg", 10**6, config,
                      attempts=3, sleep=lambda s: None)
  elapsed = time.monotonic() - start
  assert elapsed < 3.0, elapsed  # the fake resolver answers after 60 s
  assert asked and set(asked) == {"stuck.natvision.test"}
  assert "photo_timeout" in str(info.value) or "DNS" in str(info.value), (
      str(info.value))


def test_a_name_looked_up_under_the_deadline_connects_and_sends_its_host(
    names):
  """The connection made to the looked-up address still speaks to the
  name: the Host header names it (and TLS would verify it)."""
  table, asked = names
  table["photos.natvision.test"] = "127.0.0.35"
  with PhotoServer({"/a.jpg": JPEG}, hosts=("127.0.0.35",)) as s:
    port = s.url("/a.jpg").rsplit(":", 1)[1].split("/")[0]
    url = f"http://photos.natvision.test:{port}/a.jpg"
    fetcher = client.HttpFetcher(fetch.FetchConfig(photo_timeout=5))
    assert fetcher.fetch(url, 10**6,
                         deadline=time.monotonic() + 5) == JPEG
    assert s.requests["/a.jpg"] == 1
    assert list(s.peak) == [f"photos.natvision.test:{port}"]  # Host header
  assert asked == ["photos.natvision.test"]
  table["nowhere.natvision.test"] = ""
  with pytest.raises(fetch.FetchError, match="NameResolution|resolve|DNS"):
    client.HttpFetcher(fetch.FetchConfig(photo_timeout=5)).fetch(
        "http://nowhere.natvision.test/a.jpg", 10**6,
        deadline=time.monotonic() + 0.5)
