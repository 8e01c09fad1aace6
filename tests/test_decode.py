"""Decode: real files of every odd kind become upright RGB, or a clear error."""

import os
import time

import numpy as np
import pytest
from PIL import Image, ImageFile

from tests import corpus
from tests.corpus import encode as _encode, read as _read, written  # noqa: F401
from natvision.transforms import decode
from natvision.transforms.decode import DecodeError, decode_image

pytestmark = pytest.mark.filterwarnings(
    "ignore::PIL.Image.DecompressionBombWarning")


def _items(written, kind):
  return [item for item in written[1] if item.kind == kind]


def test_corpus_covers_valid_and_broken_files(written):
  directory, items = written
  names = {item.filename for item in items}
  assert len(items) >= 30
  assert len(_items(written, corpus.VALID)) >= 20
  assert len(_items(written, corpus.BROKEN)) >= 10
  assert sorted(os.listdir(directory)) == sorted(names)
  assert {"fleur d'été 1.jpg", "champignon ñ.png", "noextension"} <= names
  for item in _items(written, corpus.BROKEN):
    assert item.expected_stage in ("read", "decode")


def test_valid_files_decode_to_rgb_with_expected_size_and_pixels(written):
  problems = []
  for item in _items(written, corpus.VALID):
    try:
      img = decode_image(_read(written, item.filename), min_side=None,
                         filename=item.filename)
    except DecodeError as e:
      problems.append(f"{item.filename}: {e}")
      continue
    if img.mode != "RGB":
      problems.append(f"{item.filename}: mode {img.mode}")
    if item.expected_size and img.size != item.expected_size:
      problems.append(f"{item.filename}: size {img.size}, expected "
                      f"{item.expected_size}")
    if img.info[decode.ORIGINAL_SIZE_KEY] != img.size:
      problems.append(f"{item.filename}: original size "
                      f"{img.info[decode.ORIGINAL_SIZE_KEY]} != {img.size}")
    for xy, colour in item.expected_pixels:
      got = img.getpixel(xy)
      if max(abs(a - b) for a, b in zip(got, colour)) > corpus.PIXEL_TOLERANCE:
        problems.append(f"{item.filename}: pixel {xy} is {got}, expected "
                        f"{colour}")
  assert not problems, "\n".join(problems)


def test_valid_files_drafted_keep_the_short_side_preparation_needs(written):
  min_side = decode.decoded_size_needed(["center_crop"], 299)
  for item in _items(written, corpus.VALID):
    img = decode_image(_read(written, item.filename), min_side=min_side)
    assert img.mode == "RGB", item.filename
    if item.expected_size:
      assert img.info[decode.ORIGINAL_SIZE_KEY] == item.expected_size
      assert min(img.size) >= min(min_side, *item.expected_size), item.filename
      assert img.size[0] <= item.expected_size[0], item.filename


# Words each broken file's message must contain, so the errors table says
# what is wrong rather than echoing Pillow's "cannot identify image file".
_EXPECTED_WORDS = {
    "empty.jpg": "0 bytes",
    "truncated.jpg": "truncated JPEG",
    "truncated_progressive.jpg": "truncated JPEG",
    "header_only.jpg": "truncated",
    "truncated.png": "truncated PNG",
    "corrupt_idat.png": "corrupt PNG",
    "corrupt_crc.png": "corrupt PNG",
    "random.jpg": "not an image",
    "page.jpg": "HTML",
    "notes.png": "text",
    "fake.heic": "unsupported format HEIC",
    "drawing.svg": "unsupported format SVG",
    "document.jpg": "PDF",
    "bomb_30000x30000.png": "pixels",
    "bomb_15000x10000.png": "15000x10000",
    "raw.dng": "camera raw (DNG): its first image is a 256x171 preview",
    "raw.nef": "camera raw (NEF): its first image is a 256x171 preview",
    "raw.arw": "camera raw (ARW)",
    "raw.pef": "camera raw (PEF)",
    "raw.cr2": "camera raw (CR2)",
    "raw.orf": "camera raw (ORF)",
    "raw.rw2": "camera raw (RW2)",
    "raw_named.nef": "camera raw (NEF): a TIFF named .nef",
}


def test_broken_files_raise_decode_error_with_a_readable_reason(written):
  broken = _items(written, corpus.BROKEN)
  assert {item.filename for item in broken} == set(_EXPECTED_WORDS)
  for item in broken:
    with pytest.raises(DecodeError) as caught:
      decode_image(_read(written, item.filename), filename=item.filename)
    message = str(caught.value)
    assert caught.value.stage == item.expected_stage == "decode"
    assert _EXPECTED_WORDS[item.filename] in message, (item.filename, message)
    assert message.isprintable() and len(message) < 300, message
    assert "BytesIO" not in message, message


def test_truncated_files_are_refused_without_changing_pillow_globals(written):
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False
  for name in ("truncated.jpg", "truncated_progressive.jpg", "truncated.png"):
    with pytest.raises(DecodeError, match="truncated"):
      decode_image(_read(written, name))
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_bomb_is_refused_from_its_header_before_decoding(written):
  data = _read(written, "bomb_15000x10000.png")
  assert len(data) < 1_000_000
  start = time.perf_counter()
  with pytest.raises(DecodeError) as caught:
    decode_image(data, max_pixels=100_000_000)
  elapsed = time.perf_counter() - start
  # Decoding 150 MP (450 MB as RGB) takes seconds; reading a header, ~1 ms.
  assert elapsed < 0.2
  assert "150000000 pixels" in str(caught.value)
  assert "--max_pixels 100000000" in str(caught.value)


def test_bomb_beyond_pillows_own_limit_gets_the_same_message(written):
  data = _read(written, "bomb_30000x30000.png")
  start = time.perf_counter()
  with pytest.raises(DecodeError,
                     match=r"900000000 pixels exceeds --max_pixels"):
    decode_image(data)
  assert time.perf_counter() - start < 0.2
  # A --max_pixels above Pillow's limit says which limit refused it.
  with pytest.raises(DecodeError, match="Pillow's limit"):
    decode_image(data, max_pixels=10**12)


def test_max_pixels_applies_to_ordinary_photos(written):
  data = _read(written, "astronaut.jpg")
  with pytest.raises(DecodeError, match=r"512x512 = 262144 pixels"):
    decode_image(data, max_pixels=512 * 512 - 1)
  assert decode_image(data, max_pixels=512 * 512).size == (512, 512)


# How a viewer turns each EXIF orientation upright, written from the EXIF
# specification (independently of transforms.decode): the inverse is applied
# to store a turned copy.
_STORE_TURNED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,   # shown after turning 90 deg clockwise
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,  # shown after turning 90 deg anticlockwise
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", sorted(_STORE_TURNED))
def test_exif_orientation_is_applied(orientation, fmt):
  upright = corpus.quadrant_card((160, 90))
  exif = Image.Exif()
  exif[0x0112] = orientation
  stored = upright.transpose(_STORE_TURNED[orientation])
  params = {"quality": 95} if fmt != "PNG" else {}
  data = _encode(stored, fmt, exif=exif.tobytes(), **params)
  img = decode_image(data, min_side=None)
  assert img.size == (160, 90)
  arr = np.asarray(img).astype(int)
  for (x, y), colour in corpus.quadrant_pixels((160, 90)):
    assert np.abs(arr[y, x] - colour).max() <= corpus.PIXEL_TOLERANCE, (
        orientation, (x, y), arr[y, x])


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_malformed_exif_costs_the_orientation_not_the_photo():
  good = _encode(corpus.quadrant_card(), "JPEG", quality=90)
  junk = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + b"\x01" * 40
  segment = b"\xff\xe1" + (len(junk) + 2).to_bytes(2, "big") + junk
  img = decode_image(good[:2] + segment + good[2:], min_side=None)
  assert img.size == corpus.QUADRANT_SIZE
  assert img.getpixel((10, 10))[0] > 200
  exif = Image.Exif()
  exif[0x0112] = 9  # not an orientation
  img = decode_image(_encode(corpus.quadrant_card(), "JPEG",
                             exif=exif.tobytes()), min_side=None)
  assert img.size == corpus.QUADRANT_SIZE
  assert img.getpixel((10, 10))[0] > 200


def test_16_bit_samples_are_scaled_not_clipped(written):
  gray = np.asarray(decode_image(_read(written, "gray16.png")))
  assert gray[0, 8].tolist() == [0, 0, 0]
  assert gray[0, 24].tolist() == [128, 128, 128]     # 32768
  assert gray[0, 40].tolist() == [255, 255, 255]     # 65535
  assert gray[0, 56].tolist() == [round(0x1234 * 255 / 65535)] * 3
  rgb = np.asarray(decode_image(_read(written, "rgb16.png")))
  assert rgb[1, 1].tolist() == [255, 128, 0]
  assert rgb[6, 6].tolist() == [0, 255, 128]


def test_transparency_is_composited_onto_white(written):
  palette = np.asarray(decode_image(_read(written, "palette_transparent.png")))
  assert (palette[:, :32] == corpus.RED).all()
  assert (palette[:, 32:] == corpus.WHITE).all()   # black under the alpha
  rgba = np.asarray(decode_image(_read(written, "rgba.png"))).astype(int)
  assert (rgba[:, :16] == corpus.WHITE).all()
  assert (np.abs(rgba[:, 16:32] - (127, 127, 255)) <= 1).all()
  assert (rgba[:, 32:] == corpus.BLUE).all()
  la = np.asarray(decode_image(_read(written, "la.png")))
  assert (la[:, :32] == 255).all() and (la[:, 32:] == 0).all()


def test_cmyk_jpeg_colours_match_the_photo(written):
  photo = np.asarray(corpus.load_photo("chelsea.png", 3).convert(
      "CMYK").convert("RGB")).astype(int)
  img = np.asarray(decode_image(_read(written, "cmyk.jpg"))).astype(int)
  # An un-inverted Adobe CMYK decode would be off by ~100 levels.
  assert np.abs(img - photo).mean() < 3


def test_first_frame_of_animations_and_multipage_files(written):
  gif = decode_image(_read(written, "animated.gif"))
  assert gif.getpixel((0, 0)) == corpus.RED
  tif = decode_image(_read(written, "multipage.tif"))
  assert tif.size == (200, 100) and tif.getpixel((0, 0)) == corpus.RED


def test_big_jpeg_is_drafted_and_close_to_a_full_decode(written):
  data = _read(written, "big_4032x3024.jpg")
  drafted = decode_image(data, min_side=342)
  assert 342 <= min(drafted.size) < 3024
  assert drafted.size == (504, 378)  # the 1/8 scale
  assert drafted.info[decode.ORIGINAL_SIZE_KEY] == (4032, 3024)
  full = decode_image(data, min_side=None)
  assert full.size == (4032, 3024)
  reference = np.asarray(full.resize(drafted.size, Image.Resampling.BOX))
  diff = np.abs(np.asarray(drafted).astype(int) - reference)
  # Measured: mean 0.28, max 3 levels.
  assert diff.mean() < 1.0
  assert diff.max() <= 8


def test_draft_never_goes_below_min_side(written):
  data = _read(written, "big_4032x3024.jpg")
  for min_side, expected in ((299, (504, 378)), (378, (504, 378)),
                             (379, (1008, 756)), (1512, (4032 // 2, 3024 // 2)),
                             (1513, (4032, 3024))):
    assert decode_image(data, min_side=min_side).size == expected, min_side


def test_draft_target_is_turned_for_rotated_photos(written):
  data = _read(written, "exif_orientation_6_big.jpg")  # stored 3024x4032
  default = decode_image(data, min_side=342)
  assert default.size == (504, 378)
  red, green, _ = default.getpixel((10, 10))
  assert red > 200 and green < 60
  # Upright 1000x700 is 700x1000 as stored: 1/4 scale (1008x756 upright).
  # Without the swap only 1/2 would fit the request.
  img = decode_image(data, draft_to=(1000, 700))
  assert img.size == (1008, 756)
  assert img.info[decode.ORIGINAL_SIZE_KEY] == (4032, 3024)


def test_small_images_are_never_enlarged(written):
  img = decode_image(_read(written, "one_pixel.png"), min_side=342)
  assert img.size == (1, 1)


def test_decoded_size_needed():
  assert decode.decoded_size_needed(["center_crop"]) == 342
  assert decode.decoded_size_needed(["squash"]) == 299
  assert decode.decoded_size_needed(["squash", "center_crop"]) == 342
  assert decode.decoded_size_needed(["squash"], size=224) == 224
  assert decode.decoded_size_needed(["center_crop"], size=224) == 256
  with pytest.raises(ValueError, match="squash, center_crop"):
    decode.decoded_size_needed(["stretch"])
  with pytest.raises(ValueError):
    decode.decoded_size_needed([])
