"""What a 200 body is, by its bytes: images whatever the label, pages
refused with their title, binary non-images described."""

import os

import pytest

from tests.http_server import PhotoServer
from tests.fetch_helpers import JPEG, server  # noqa: F401 (server: a fixture)
from tests.fetch_helpers import fetch_recording_sleeps as _fetch
from natvision.transforms import fetch



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
