"""What the fetch layer's tests share: a JPEG-looking body, a fetch whose
retry sleeps are recorded instead of slept, a loopback photo server, and
an opener that fails a given number of times before it reads."""
# pylint: disable=redefined-outer-name

import io
import os

import pytest

from tests.http_server import PhotoServer
from natvision.transforms import fetch

JPEG = b"\xff\xd8\xff\xe0" + os.urandom(5000)


def fetch_recording_sleeps(url, sleeps=None, attempts=4, config=None,
                           max_bytes=10**6):
  """``fetch.fetch_bytes`` with a 1 s base delay; each backoff it would
  sleep is appended to ``sleeps`` instead."""
  sleeps = [] if sleeps is None else sleeps
  return fetch.fetch_bytes(url, max_bytes, config or fetch.FetchConfig(),
                           attempts=attempts, base_delay=1.0,
                           sleep=sleeps.append)


@pytest.fixture()
def server():
  """One loopback listener serving /a.jpg (``JPEG``) and /b.jpg (reversed)."""
  with PhotoServer({"/a.jpg": JPEG, "/b.jpg": JPEG[::-1]}) as s:
    yield s


class Flaky:
  """An opener raising ``error`` on its first ``failures`` calls, then
  returning a readable stream; ``calls`` counts them."""

  def __init__(self, error, failures):
    self.error, self.failures, self.calls = error, failures, 0

  def __call__(self, uri):
    self.calls += 1
    if self.calls <= self.failures:
      raise self.error
    return io.BytesIO(b"bytes")
