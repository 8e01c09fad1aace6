"""transforms/rgb.py: every decoded mode to RGB, transparency, profiles.

Images are built in each mode with Pillow and flat colours, so the expected
pixels are written down by hand; colour profiles are hand-made ICC profiles
(tests/corpus.py), the expected sRGB values computed from the Adobe RGB
specification (``corpus.adobe_rgb_to_srgb``).
"""

import numpy as np
import pytest
from PIL import Image

from tests import corpus
from tests.corpus import encode as _encode, read as _read, written  # noqa: F401
from natvision.transforms import rgb
from natvision.transforms.decode import decode_image


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
  out = rgb.to_rgb(img)
  assert out.mode == "RGB"
  assert np.asarray(out).tolist() == [[list(expected), [255, 255, 255]]]
  del img.info["transparency"]  # without the key, nothing turns white
  assert np.asarray(rgb.to_rgb(img))[0, 1].tolist() != [255, 255, 255]


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
  out = np.asarray(rgb.to_rgb(img)).astype(int)
  assert out[0, 0].tolist() == list(expected)
  assert out[0, 1].tolist() == [255, 255, 255]
  half = (np.array(expected) + 255) / 2  # half opaque: halfway to white
  assert np.abs(out[0, 2] - half).max() <= 2, (mode, out[0, 2])


def test_palette_transparency_as_index_and_as_rgba_palette():
  img = Image.new("P", (2, 1))
  img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
  img.putpixel((0, 0), 1)
  img.info["transparency"] = 0
  assert np.asarray(rgb.to_rgb(img)).tolist() == [[[200, 10, 10],
                                                      [255, 255, 255]]]
  img = Image.new("P", (2, 1))
  img.putpalette([0, 0, 0, 0, 200, 10, 10, 255], "RGBA")
  img.putpixel((0, 0), 1)
  assert np.asarray(rgb.to_rgb(img)).tolist() == [[[200, 10, 10],
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
  out = np.asarray(rgb.to_rgb(Image.new(mode, (2, 1), colour))).astype(int)
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
  rgb.check_color_profile("ignore")
  rgb.check_color_profile("srgb")
  with pytest.raises(ValueError, match="ignore, srgb"):
    rgb.check_color_profile("adobe")
