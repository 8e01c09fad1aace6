"""The http(s) client: the photo's deadline bounds the status line and the
headers too (a watchdog shuts the socket), against loopback servers that
accept a connection and then stall."""

import time

import pytest

from tests.slow_servers import SlowHeaders
from transforms import fetch
from transforms.fetch import client


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
  from tests.http_server import PhotoServer  # pylint: disable=import-outside-toplevel
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
