"""Decode: real files of every odd kind become upright RGB, or a clear error."""

import io
import os
import time

import numpy as np
import pytest
from PIL import Image, ImageFile

from tests import corpus
from natvision.transforms import decode
from natvision.transforms.decode import DecodeError, decode_image

pytestmark = pytest.mark.filterwarnings(
    "ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("corpus"))
  return directory, corpus.write_corpus(directory)


def _read(written, name):
  directory, _ = written
  with open(os.path.join(directory, name), "rb") as f:
    return f.read()


def _items(written, kind):
  return [item for item in written[1] if item.kind == kind]


def _encode(img, fmt, **params):
  buf = io.BytesIO()
  img.save(buf, fmt, **params)
  return buf.getvalue()


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
  assert decode.sniff_format(data) == kind


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


# --- transparency in every mode --------------------------------------------

# Mode -> (opaque pixel, transparent pixel, key): a 2x1 image whose second
# pixel is made transparent by a colour key, and what the opaque pixel
# decodes to.  These are the one-band and RGB modes Pillow puts a key on
# (PNG tRNS; older Pillow read 16-bit grey as mode I).
_KEYED = {
    "1": (255, 0, 0, (255, 255, 255)),
    "L": (10, 20, 20, (10, 10, 10)),
    "I": (1000, 1001, 1001, (4, 4, 4)),
    "I;16": (1000, 1001, 1001, (4, 4, 4)),
    "I;16L": (1000, 1001, 1001, (4, 4, 4)),
    "I;16B": (1000, 1001, 1001, (4, 4, 4)),
    "F": (0.25, 0.5, 0.5, (64, 64, 64)),
    "RGB": ((1, 2, 3), (4, 5, 6), (4, 5, 6), (1, 2, 3)),
}


@pytest.mark.parametrize("mode", sorted(_KEYED))
def test_colour_key_makes_pixels_white_in_every_mode(mode):
  opaque, transparent, key, expected = _KEYED[mode]
  img = Image.new(mode, (2, 1))
  img.putpixel((0, 0), opaque)
  img.putpixel((1, 0), transparent)
  img.info["transparency"] = key
  out = decode.to_rgb(img)
  assert out.mode == "RGB"
  assert np.asarray(out).tolist() == [[list(expected), [255, 255, 255]]]
  del img.info["transparency"]  # without the key, nothing turns white
  assert np.asarray(decode.to_rgb(img))[0, 1].tolist() != [255, 255, 255]


# Mode -> (opaque pixel, transparent pixel, the same colour half opaque,
# expected opaque RGB) for the modes with an alpha channel, premultiplied
# ones (La, RGBa: colour already multiplied by alpha) included.
_ALPHA = {
    "LA": ((10, 255), (10, 0), (10, 128), (10, 10, 10)),
    "La": ((10, 255), (0, 0), (5, 128), (10, 10, 10)),
    "RGBA": ((10, 20, 30, 255), (0, 0, 0, 0), (10, 20, 30, 128),
             (10, 20, 30)),
    "RGBa": ((10, 20, 30, 255), (0, 0, 0, 0), (5, 10, 15, 128),
             (10, 20, 30)),
    "PA": ((1, 255), (1, 0), (1, 128), (200, 10, 10)),
}


@pytest.mark.parametrize("mode", sorted(_ALPHA))
def test_alpha_channel_is_composited_onto_white_in_every_mode(mode):
  opaque, transparent, half_opaque, expected = _ALPHA[mode]
  img = Image.new(mode, (3, 1))
  if mode == "PA":
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
  img.putpixel((0, 0), opaque)
  img.putpixel((1, 0), transparent)
  img.putpixel((2, 0), half_opaque)
  out = np.asarray(decode.to_rgb(img)).astype(int)
  assert out[0, 0].tolist() == list(expected)
  assert out[0, 1].tolist() == [255, 255, 255]
  half = (np.array(expected) + 255) / 2  # half opaque: halfway to white
  assert np.abs(out[0, 2] - half).max() <= 2, (mode, out[0, 2])


def test_palette_transparency_as_index_and_as_rgba_palette():
  img = Image.new("P", (2, 1))
  img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
  img.putpixel((0, 0), 1)
  img.info["transparency"] = 0
  assert np.asarray(decode.to_rgb(img)).tolist() == [[[200, 10, 10],
                                                      [255, 255, 255]]]
  img = Image.new("P", (2, 1))
  img.putpalette([0, 0, 0, 0, 200, 10, 10, 255], "RGBA")
  img.putpixel((0, 0), 1)
  assert np.asarray(decode.to_rgb(img)).tolist() == [[[200, 10, 10],
                                                      [255, 255, 255]]]


@pytest.mark.parametrize("mode, colour, expected", [
    ("CMYK", (255, 0, 0, 0), (0, 255, 255)),
    ("YCbCr", (255, 128, 128), (255, 255, 255)),
    ("LAB", (255, 128, 128), (255, 255, 255)),
    ("HSV", (0, 255, 255), (255, 0, 0)),
    ("RGBX", (10, 20, 30, 0), (10, 20, 30)),
])
def test_modes_without_transparency_convert_their_colour(mode, colour,
                                                         expected):
  out = np.asarray(decode.to_rgb(Image.new(mode, (2, 1), colour))).astype(int)
  assert np.abs(out - expected).max() <= 1, (mode, out[0, 0])


def test_16_bit_grey_border_is_white_like_its_8_bit_copy(written):
  """The reported fault: a 16-bit tRNS border came out black."""
  eight = np.asarray(decode_image(_read(written, "gray8_transparent.png")))
  sixteen = np.asarray(decode_image(_read(written, "gray16_transparent.png")))
  assert (eight[:8] == 255).all() and (sixteen[:8] == 255).all()
  assert (sixteen[:, :8] == 255).all() and (sixteen[:, -8:] == 255).all()
  # The centre is opaque 156 in both; one level above the key stays opaque.
  assert sixteen[16, 40].tolist() == eight[16, 40].tolist() == [156] * 3
  assert sixteen[16, 24].tolist() == [4, 4, 4]
  same = np.ones(eight.shape[:2], bool)
  same[14:18, 20:28] = False
  assert (eight[same] == sixteen[same]).all()


def test_16_bit_rgb_key_is_matched_on_all_16_bits(written):
  img = np.asarray(decode_image(_read(written, "rgb16_transparent.png")))
  assert (img[:, 4:] == 255).all()
  # Same high bytes as the key, other low bytes: opaque, as Pillow reads it.
  assert (img[:, :4] == (0x12, 0x56, 0x9A)).all()


def test_low_depth_grey_key_is_in_stored_units(written):
  two = np.asarray(decode_image(_read(written, "gray2_transparent.png")))
  assert two[0, :8, 0].tolist() == [0] * 4 + [170] * 4
  assert (two[:, 8:] == 255).all()
  four = np.asarray(decode_image(_read(written, "gray4_transparent.png")))
  assert four[0, :8, 0].tolist() == [0] * 4 + [102] * 4
  assert (four[:, 8:] == 255).all()


# --- camera raws -------------------------------------------------------------

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


# --- colour profiles -------------------------------------------------------

_ADOBE = corpus.icc_matrix_profile("natvision test Adobe RGB (1998)")
_SAMPLES = np.array([[(100, 200, 100), (200, 60, 60), (0, 255, 0),
                      (128, 128, 128), (30, 90, 220), (255, 255, 255)]],
                    np.uint8)


def _srgb_profile():
  from PIL import ImageCms  # pylint: disable=import-outside-toplevel
  return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_adobe_rgb_profile_is_ignored_by_default_and_applied_on_request(fmt):
  params = {"lossless": True} if fmt == "WEBP" else {}
  data = _encode(Image.fromarray(_SAMPLES, "RGB"), fmt, icc_profile=_ADOBE,
                 **params)
  ignored = np.asarray(decode_image(data, min_side=None))
  assert (ignored == _SAMPLES).all()
  assert (np.asarray(decode_image(data, min_side=None,
                                  color_profile="ignore")) == _SAMPLES).all()
  converted = np.asarray(decode_image(data, min_side=None,
                                      color_profile="srgb")).astype(int)
  expected = corpus.adobe_rgb_to_srgb(_SAMPLES)
  assert np.abs(converted - expected).max() <= 1, converted
  # Adobe RGB's green is more saturated than sRGB's: in sRGB the same
  # colour has (almost) no red, and pure Adobe green clips to sRGB green.
  assert converted[0, 0, 0] < 10 and abs(converted[0, 0, 1] - 200) <= 2
  assert converted[0, 2].tolist() == [0, 255, 0]
  assert converted[0, 5].tolist() == [255, 255, 255]


def test_profile_is_applied_to_jpeg_colours_before_compositing():
  jpeg = _encode(Image.fromarray(_SAMPLES.repeat(16, 0).repeat(16, 1), "RGB"),
                 "JPEG", quality=95, icc_profile=_ADOBE)
  plain = np.asarray(decode_image(jpeg, min_side=None)).astype(int)
  converted = np.asarray(decode_image(jpeg, min_side=None,
                                      color_profile="srgb")).astype(int)
  assert np.abs(converted - corpus.adobe_rgb_to_srgb(plain)).max() <= 1
  rgba = np.zeros((1, 2, 4), np.uint8)
  rgba[0, 0] = (100, 200, 100, 255)
  png = _encode(Image.fromarray(rgba, "RGBA"), "PNG", icc_profile=_ADOBE)
  out = np.asarray(decode_image(png, color_profile="srgb")).astype(int)
  assert np.abs(out[0, 0] - corpus.adobe_rgb_to_srgb(
      [[(100, 200, 100)]])[0, 0]).max() <= 1
  assert out[0, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize("profile", [
    _srgb_profile(),                        # already sRGB
    b"not an ICC profile at all" * 8,       # unreadable: treated as absent
    _ADOBE[:100],                           # cut short
])
def test_srgb_leaves_srgb_and_unreadable_profiles_alone(profile):
  data = _encode(Image.fromarray(_SAMPLES, "RGB"), "PNG", icc_profile=profile)
  out = np.asarray(decode_image(data, min_side=None, color_profile="srgb"))
  assert (out == _SAMPLES).all()


def test_rgb_profile_on_a_grey_image_is_not_applied():
  grey = Image.fromarray(_SAMPLES[..., 1], "L")
  data = _encode(grey, "PNG", icc_profile=_ADOBE)
  out = np.asarray(decode_image(data, min_side=None, color_profile="srgb"))
  assert (out[..., 0] == _SAMPLES[..., 1]).all()


def test_grey_profile_is_applied_to_grey_images():
  # A linear grey profile: 50% of the light is 128 stored, 188 in sRGB.
  grey = Image.new("L", (4, 4), 128)
  data = _encode(grey, "PNG", icc_profile=corpus.icc_gray_profile("linear"))
  assert decode_image(data, color_profile="ignore").getpixel((0, 0)) == (
      128, 128, 128)
  red, green, blue = decode_image(data, color_profile="srgb").getpixel((0, 0))
  assert red == green == blue and abs(red - 188) <= 1


def test_check_color_profile():
  decode.check_color_profile("ignore")
  decode.check_color_profile("srgb")
  with pytest.raises(ValueError, match="ignore, srgb"):
    decode.check_color_profile("adobe")
