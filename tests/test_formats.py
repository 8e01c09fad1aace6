"""transforms/formats.py: what bytes are named, and camera raws refused.

Magic numbers are written by hand from the formats' specifications; the
camera raws are TIFFs made by tests/corpus.py with the tags each maker
writes, refused through ``decode_image`` as a job meets them.
"""

import io

import pytest
from PIL import Image

from tests import corpus
from tests.corpus import encode as _encode
from natvision.transforms import formats
from natvision.transforms.decode import DecodeError, decode_image


def test_images_and_foreign_files_are_told_apart():
  assert formats.is_image(b"\xff\xd8\xff\xe0")
  assert formats.is_image(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
  assert formats.is_image(b"II*\x00\x10\x00\x00\x00CR\x02\x00")
  for body in (b"%PDF-1.7\n", b"<html><body>Not found</body></html>",
               b'{"error": "not found"}', bytes(range(256))):
    assert not formats.is_image(body), body[:10]


@pytest.mark.parametrize("data, kind", [
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC"),
    (b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf", "AVIF"),
    (b"\x00\x00\x00\x1cftypisom\x00\x00\x02\x00isomiso2mp41",
     "video or other ISO media"),
    (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
    (b'<?xml version="1.0"?>\n<svg/>', "SVG"),
    (b"\xef\xbb\xbf<!DOCTYPE html><html>", "HTML"),
    (b"%PDF-1.7\n", "PDF"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "PNG"),
    (b"\xff\xd8\xff\xe0", "JPEG"),
    (b"II*\x00\x10\x00\x00\x00CR\x02\x00", "camera raw (CR2)"),
    (b"II*\x00\x08\x00\x00\x00\x0e\x00", "TIFF"),
    (b"IIRO\x08\x00\x00\x00", "camera raw (ORF)"),
    (b"IIU\x00\x18\x00\x00\x00", "camera raw (RW2)"),
    (b"FUJIFILMCCD-RAW 0201", "camera raw (RAF)"),
    (b"II\x1a\x00\x00\x00HEAPCCDR", "camera raw (CRW)"),
    (b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01crx isom",
     "camera raw (CR3)"),
    (b'{"error": "not found"}', "JSON"),
    (b"plain words\n", "text"),
    (bytes(range(256)), None),
])
def test_sniff_format(data, kind):
  assert formats.sniff_format(data) == kind


def test_pillow_alone_would_embed_the_raw_preview():
  data = corpus.camera_raw_tiff(dng=True)
  with Image.open(io.BytesIO(data)) as img:
    assert img.size == (256, 171)  # what a silent decode would embed
  with pytest.raises(DecodeError, match=r"camera raw \(DNG\)"):
    decode_image(data)


@pytest.mark.parametrize("kwargs, kind", [
    ({"dng": True}, "DNG"),
    ({"dng": True, "reduced": False, "sub_ifds": False}, "DNG"),
    ({"make": "NIKON CORPORATION"}, "NEF"),
    ({"make": "", "sub_ifds": False}, "TIFF-based"),
    ({"make": "Canon", "sub_ifds": True, "reduced": False}, "CR2"),
    ({"make": "SONY", "sub_ifds": False, "reduced": False,
      "extra_tags": [(0x7200, 7, b"\x00" * 8)]}, "ARW"),
    ({"make": "RICOH IMAGING", "sub_ifds": False, "reduced": False,
      "photometric": 32803}, "PEF"),
    ({"make": "", "sub_ifds": False, "reduced": False,
      "photometric": 34892}, "TIFF-based"),
    ({"magic": b"IIRS"}, "ORF"),
    ({"magic": b"MMOR"}, "ORF"),
])
def test_camera_raws_are_refused_by_their_tags_or_magic(kwargs, kind):
  data = corpus.camera_raw_tiff(**kwargs)
  with pytest.raises(DecodeError) as caught:
    decode_image(data)
  assert f"unsupported format camera raw ({kind})" in str(caught.value)
  assert caught.value.stage == "decode"


def test_tiffs_that_are_photos_are_not_taken_for_raws():
  # A camera's TIFF, a TIFF with SubIFDs but no maker, a multi-page TIFF.
  for data in (corpus.camera_raw_tiff(reduced=False, sub_ifds=False),
               corpus.camera_raw_tiff(make="", reduced=False)):
    img = decode_image(data, filename="photo.tif")
    assert img.size == (256, 171) and img.getpixel((0, 0)) == (200, 30, 30)


def test_raw_extension_refuses_tiffs_and_unknown_data_only():
  tiff = corpus.camera_raw_tiff(reduced=False, sub_ifds=False)
  with pytest.raises(DecodeError, match=r"camera raw \(DNG\): a TIFF named"):
    decode_image(tiff, filename="gs://bucket/photos/IMG_0001.DNG")
  with pytest.raises(DecodeError, match=r"camera raw \(RAF\)"):
    decode_image(b"\x00\x01\x02 unknown maker format" * 20,
                 filename="https://host/x/DSCF0001.raf?size=original")
  jpeg = _encode(corpus.quadrant_card(), "JPEG")  # what it really is wins
  assert decode_image(jpeg, filename="mislabelled.nef",
                      min_side=None).size == corpus.QUADRANT_SIZE
