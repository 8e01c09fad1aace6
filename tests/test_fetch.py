"""The fetch layer: http(s) against a misbehaving loopback server, retries
with an injected sleep, typed error predicates, and schemes."""

import argparse
import concurrent.futures
import io
import os
import socket
import threading
import time

import pytest

from tests.http_server import PhotoServer
from natvision.transforms import fetch

JPEG = b"\xff\xd8\xff\xe0" + os.urandom(5000)


def _fetch(url, sleeps=None, attempts=4, config=None, max_bytes=10**6):
  sleeps = [] if sleeps is None else sleeps
  return fetch.fetch_bytes(url, max_bytes, config or fetch.FetchConfig(),
                           attempts=attempts, base_delay=1.0,
                           sleep=sleeps.append)


@pytest.fixture()
def server():
  with PhotoServer({"/a.jpg": JPEG, "/b.jpg": JPEG[::-1]}) as s:
    yield s


def test_plain_get_and_user_agent(server):
  config = fetch.FetchConfig(user_agent="mailto:me@example.org")
  assert _fetch(server.url("/a.jpg"), config=config) == JPEG
  assert server.user_agents[-1] == "natvision/0.1.0 (mailto:me@example.org)"
  assert _fetch(server.url("/b.jpg")) == JPEG[::-1]
  assert server.user_agents[-1] == "natvision/0.1.0"


@pytest.mark.parametrize("code", [404, 410])
def test_not_found_is_not_retried(server, code):
  server.plan("/a.jpg", ("status", code, {}, b"gone"))
  sleeps = []
  with pytest.raises(fetch.FetchError, match=f"not found \\(HTTP {code}\\)"
                     ) as info:
    _fetch(server.url("/a.jpg"), sleeps)
  assert info.value.not_found and not info.value.transient
  assert server.requests["/a.jpg"] == 1 and sleeps == []


def test_429_waits_for_retry_after(server):
  server.plan("/a.jpg", ("status", 429, {"Retry-After": "7"}, b""),
              ("status", 503, {"Retry-After": "3"}, b""))
  sleeps = []
  assert _fetch(server.url("/a.jpg"), sleeps) == JPEG
  assert sleeps == [7.0, 3.0] and server.requests["/a.jpg"] == 3


def test_retry_after_too_long_fails_now(server):
  server.plan("/a.jpg", ("status", 429, {"Retry-After": "3600"}, b""))
  sleeps = []
  with pytest.raises(fetch.FetchError, match="retry after 3600s"):
    _fetch(server.url("/a.jpg"), sleeps)
  assert sleeps == [] and server.requests["/a.jpg"] == 1


def test_5xx_retried_with_backoff_then_success(server):
  server.plan("/a.jpg", ("status", 503, {}, b"busy"),
              ("status", 500, {}, b"oops"))
  sleeps = []
  assert _fetch(server.url("/a.jpg"), sleeps) == JPEG
  assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 1.5 and 1 <= sleeps[1] <= 3


def test_5xx_gives_up_after_attempts(server):
  server.plan("/a.jpg", *[("status", 502, {}, b"")] * 5)
  with pytest.raises(fetch.FetchError, match="HTTP 502.*gave up after 3"):
    _fetch(server.url("/a.jpg"), attempts=3)
  assert server.requests["/a.jpg"] == 3


def test_other_4xx_is_not_retried(server):
  server.plan("/a.jpg", ("status", 403, {}, b"no"))
  with pytest.raises(fetch.FetchError, match="HTTP 403 Forbidden"):
    _fetch(server.url("/a.jpg"))
  assert server.requests["/a.jpg"] == 1


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


@pytest.mark.parametrize("kind", ["reset", "short"])
def test_broken_bodies_are_retried(server, kind):
  server.plan("/a.jpg", (kind,))
  sleeps = []
  assert _fetch(server.url("/a.jpg"), sleeps) == JPEG
  assert server.requests["/a.jpg"] == 2 and len(sleeps) == 1
  server.plan("/b.jpg", *[(kind,)] * 3)
  with pytest.raises(fetch.FetchError, match="gave up after 3") as info:
    _fetch(server.url("/b.jpg"), attempts=3)
  assert info.value.transient


def test_read_timeout_is_transient():
  with PhotoServer({"/slow.jpg": JPEG}, latency=0.5) as slow:
    config = fetch.FetchConfig(read_timeout=0.1)
    with pytest.raises(fetch.FetchError, match="(?i)timed out.*gave up after 2"
                       ):
      _fetch(slow.url("/slow.jpg"), attempts=2, config=config)


def test_connection_refused_is_transient():
  with PhotoServer({}) as gone:
    url = gone.url("/a.jpg")
  with pytest.raises(fetch.FetchError, match="gave up after 2") as info:
    _fetch(url, attempts=2)
  assert info.value.transient


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


def test_gs_reads_are_not_retried_again():
  calls = []

  def opener(uri):
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    calls.append(uri)
    raise exceptions.ServiceUnavailable("backend error")

  with pytest.raises(fetch.FetchError, match="ServiceUnavailable") as info:
    fetch.fetch_bytes("gs://b/x.jpg", 100, attempts=4, opener=opener,
                      sleep=lambda s: None)
  assert info.value.transient and len(calls) == 1


class _Flaky:

  def __init__(self, error, failures):
    self.error, self.failures, self.calls = error, failures, 0

  def __call__(self, uri):
    self.calls += 1
    if self.calls <= self.failures:
      raise self.error
    return io.BytesIO(b"bytes")


def test_typed_predicates():
  from apache_beam.io.aws.clients.s3 import messages  # pylint: disable=import-outside-toplevel
  from botocore.exceptions import ClientError  # pylint: disable=import-outside-toplevel
  from google.api_core import exceptions as gexc  # pylint: disable=import-outside-toplevel
  import urllib3.exceptions as uexc  # pylint: disable=import-outside-toplevel

  def client_error(status, code):
    return ClientError({"Error": {"Code": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "Get")

  assert fetch.is_transient(gexc.TooManyRequests("slow down"))
  assert fetch.is_transient(ConnectionResetError())
  assert fetch.is_transient(uexc.ProtocolError("x", ConnectionResetError()))
  assert fetch.is_transient(messages.S3ClientError("x", 503))
  assert fetch.is_transient(client_error(500, "InternalError"))
  assert not fetch.is_transient(gexc.Forbidden("no"))
  assert not fetch.is_transient(client_error(403, "AccessDenied"))
  assert not fetch.is_transient(FileNotFoundError("x"))
  assert fetch.is_not_found(gexc.NotFound("x"))
  assert fetch.is_not_found(client_error(404, "NoSuchKey"))
  assert fetch.is_not_found(messages.S3ClientError("x", 404))
  # Messages and class names decide nothing.
  assert not fetch.is_not_found(RuntimeError("object not found"))
  named = type("ServiceUnavailable", (Exception,), {})
  assert not fetch.is_transient(named("503"))
  wrapped = RuntimeError("outer")
  wrapped.__cause__ = gexc.ServiceUnavailable("inner")
  assert fetch.is_transient(wrapped)


def test_local_reads_retry_typed_transients_only():
  flaky = _Flaky(TimeoutError("slow disk"), 2)
  sleeps = []
  assert fetch.fetch_bytes("/data/x.jpg", 100, attempts=4, opener=flaky,
                           sleep=sleeps.append, base_delay=1.0) == b"bytes"
  assert flaky.calls == 3 and len(sleeps) == 2
  odd = _Flaky(RuntimeError("not found, says the message"), 9)
  with pytest.raises(fetch.FetchError, match="RuntimeError") as info:
    fetch.fetch_bytes("/data/x.jpg", 100, opener=odd, sleep=sleeps.append)
  assert odd.calls == 1 and not info.value.not_found


def test_file_uri_is_a_local_path(tmp_path):
  (tmp_path / "a b.jpg").write_bytes(b"abc")
  uri = "file://" + str(tmp_path / "a%20b.jpg")
  assert fetch.local_path(uri) == str(tmp_path / "a b.jpg")
  assert fetch.fetch_bytes(uri, 10) == b"abc"
  assert fetch.scheme_of(uri) == "" and fetch.scheme_of("HTTPS://x/y") == "https"


def test_unknown_scheme_names_the_extra(monkeypatch):
  with pytest.raises(fetch.SchemeError, match="no installed filesystem reads "
                     "ftp://"):
    fetch.check_schemes(["/a.jpg", "https://x/y.jpg", "ftp://h/a.jpg"])
  fetch.check_schemes(["/a.jpg", "https://x/y.jpg", "gs://b/a", "s3://b/a"])
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel

  def no_fs(path):
    raise ValueError("Unable to get filesystem from specified path")

  monkeypatch.setattr(FileSystems, "get_filesystem", staticmethod(no_fs))
  with pytest.raises(fetch.SchemeError,
                     match=r"s3:// needs the aws extra: pip install "
                     r"'natvision\[aws\]'"):
    fetch.check_scheme("s3://bucket/a.jpg")


def test_config_validates_and_owns_its_flags():
  parser = argparse.ArgumentParser()
  fetch.FetchConfig.add_flags(parser)
  args = parser.parse_args(["--fetch_concurrency", "64",
                            "--per_host_concurrency", "4",
                            "--user_agent", " https://example.org/me "])
  config = fetch.FetchConfig.from_args(args)
  assert (config.fetch_concurrency, config.per_host_concurrency) == (64, 4)
  assert config.user_agent_header == "natvision/0.1.0 (https://example.org/me)"
  assert fetch.FetchConfig.from_args(parser.parse_args([])) == (
      fetch.FetchConfig())
  for bad in ({"fetch_concurrency": 0}, {"per_host_concurrency": 0},
              {"fetch_concurrency": 4, "per_host_concurrency": 8},
              {"read_timeout": 0}, {"max_redirects": -1},
              {"user_agent": "a\nb"}):
    with pytest.raises(ValueError, match="--"):
      fetch.FetchConfig(**bad)


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


# --------------------------------------------------------------------------
# A deadline per photo, bytes over labels, the per-host breaker and pauses.


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


def test_retries_stop_at_photo_timeout():
  with PhotoServer({"/a.jpg": JPEG}, always=("status", 503, {}, b"")) as s:
    config = fetch.FetchConfig(photo_timeout=1.0, host_failure_limit=0)
    start = time.monotonic()
    with pytest.raises(fetch.PhotoTimeout,
                       match=r"^photo_timeout: no complete response within "
                       r"1 s .*; last attempt: HTTP 503"):
      fetch.fetch_bytes(s.url("/a.jpg"), 10**6, config, attempts=50,
                        base_delay=0.2, sleep=time.sleep)
    elapsed = time.monotonic() - start
  assert elapsed < 1.5, elapsed
  assert 2 <= s.requests["/a.jpg"] < 10


@pytest.mark.parametrize("content_type", ["text/plain", "text/html",
                                          "application/json"])
def test_image_bytes_are_a_photo_whatever_the_label(content_type):
  png = b"\x89PNG\r\n\x1a\n" + os.urandom(300)
  with PhotoServer({"/a.jpg": JPEG, "/b.png": png},
                   content_type=content_type) as s:
    assert _fetch(s.url("/a.jpg")) == JPEG
    assert _fetch(s.url("/b.png")) == png


def test_html_labelled_as_jpeg_is_refused_with_its_title(server):
  page = b"<!DOCTYPE html><html><head><title>Access denied</title>" + (
      b" " * 5000) + b"</head></html>"
  server.plan("/a.jpg", ("status", 200, {"Content-Type": "image/jpeg"}, page))
  with pytest.raises(fetch.FetchError) as info:
    _fetch(server.url("/a.jpg"))
  assert str(info.value) == (
      "the server sent HTML body labelled image/jpeg page titled 'Access "
      f"denied', not an image: {server.url('/a.jpg')}")
  server.plan("/b.jpg", ("status", 200, {}, b"Quota exceeded, try later"))
  with pytest.raises(fetch.FetchError,
                     match="text body labelled no Content-Type "
                     r"\('Quota exceeded, try later'\)"):
    _fetch(server.url("/b.jpg"))


def test_binary_non_image_is_described_not_quoted(server):
  blob = bytes(range(256)) * 20
  server.plan("/a.jpg", ("status", 200, {"Content-Type": "text/plain"}, blob))
  with pytest.raises(fetch.FetchError) as info:
    _fetch(server.url("/a.jpg"))
  assert str(info.value) == (
      "the server sent text/plain: binary body, 5,120 bytes, starts 0x00 0x01 "
      f"0x02 0x03, not an image: {server.url('/a.jpg')}")
  server.plan("/b.jpg", ("status", 200, {"Content-Type": "text/html"}, b""))
  with pytest.raises(fetch.FetchError, match="text/html: an empty body"):
    _fetch(server.url("/b.jpg"))


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


def test_photo_flags_validated():
  parser = argparse.ArgumentParser()
  fetch.FetchConfig.add_flags(parser)
  config = fetch.FetchConfig.from_args(parser.parse_args(
      ["--photo_timeout", "2.5", "--host_failure_limit", "0"]))
  assert (config.photo_timeout, config.host_failure_limit) == (2.5, 0)
  defaults = fetch.FetchConfig()
  assert (defaults.photo_timeout, defaults.host_failure_limit,
          defaults.host_quiet_s) == (120.0, 20, 60.0)
  for bad, flag in (({"photo_timeout": 0}, "--photo_timeout"),
                    ({"photo_timeout": -3}, "--photo_timeout"),
                    ({"photo_timeout": float("nan")}, "--photo_timeout"),
                    ({"photo_timeout": float("inf")}, "--photo_timeout"),
                    ({"host_failure_limit": -1}, "--host_failure_limit")):
    with pytest.raises(ValueError, match=flag):
      fetch.FetchConfig(**bad)
