"""transforms/uris.py: file names that are not valid UTF-8.

A name the OS hands over with surrogate escapes turns back into exactly its
bytes, and into a readable str that encodes as UTF-8; valid text is left
alone.  (tests/test_field_inputs.py checks the same names through a whole
read.)
"""

import os

from natvision.transforms import uris


def test_every_undecodable_byte_round_trips_to_its_bytes():
  for byte in range(0x80, 0x100):
    raw = b"/p/caf" + bytes([byte]) + b".jpg"
    name = os.fsdecode(raw)
    if uris.is_text(name):  # none of 0x80..0xff alone is valid UTF-8
      raise AssertionError(f"{raw!r} decoded as valid text")
    assert uris.uri_bytes(name) == raw
    assert os.fsdecode(uris.uri_bytes(name)) == name
    readable = uris.readable(name)
    assert readable == f"/p/caf\\x{byte:02x}.jpg"
    assert uris.is_text(readable)


def test_valid_text_is_left_as_it_is():
  for name in ("/p/café.jpg", "gs://b/猫.png", "plain.jpg", ""):
    assert uris.is_text(name)
    assert uris.readable(name) is name
    assert uris.uri_bytes(name) == name.encode("utf-8")


def test_a_lone_surrogate_keeps_its_utf8_form():
  assert not uris.is_text("x\ud800")
  assert uris.uri_bytes("x\ud800") == b"x\xed\xa0\x80"
  assert uris.uri_bytes("x\ud800") == uris.uri_bytes("x\ud800")  # stable
