"""Retries: backoff and Retry-After with an injected sleep, typed
transients, self-retrying schemes tried once, the photo's deadline."""

import time

import pytest

from tests.http_server import PhotoServer
from tests.fetch_helpers import JPEG, Flaky, server  # noqa: F401 (server: a fixture)
from tests.fetch_helpers import fetch_recording_sleeps as _fetch
from natvision.transforms import fetch





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

def test_local_reads_retry_typed_transients_only():
  flaky = Flaky(TimeoutError("slow disk"), 2)
  sleeps = []
  assert fetch.fetch_bytes("/data/x.jpg", 100, attempts=4, opener=flaky,
                           sleep=sleeps.append, base_delay=1.0) == b"bytes"
  assert flaky.calls == 3 and len(sleeps) == 2
  odd = Flaky(RuntimeError("not found, says the message"), 9)
  with pytest.raises(fetch.FetchError, match="RuntimeError") as info:
    fetch.fetch_bytes("/data/x.jpg", 100, opener=odd, sleep=sleeps.append)
  assert odd.calls == 1 and not info.value.not_found

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
