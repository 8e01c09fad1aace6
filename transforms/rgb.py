"""Any decoded image mode -> 8-bit RGB: colour, transparency, colour profiles.

Decides how the pixels of a loaded image become the RGB a model sees
(``to_rgb``), and what ``--color_profile`` may be (``check_color_profile``):

* Colour: grey, palette, CMYK (including Adobe's inverted CMYK JPEGs, which
  Pillow undoes), YCbCr, LAB, HSV, 1-bit and the rest become RGB.  16-bit
  samples are scaled to 8 bits (``round(v * 255 / 65535)``), not clipped as
  Pillow's own ``convert`` does.  Floating-point images are read as [0, 1]
  when all their values fit in it, else as [0, 255].
* Colour profiles: by default (``ignore``) an embedded ICC profile is not
  applied, so that pixels reach the models as the seed models saw them in
  training (their decoders ignored profiles).  With ``srgb``, a photo whose
  embedded RGB, grey or CMYK profile is not sRGB (Adobe RGB from cameras,
  Display P3 from phones, ...) is converted to sRGB with Little CMS
  (relative colorimetric intent; colours outside sRGB are clipped).  A
  profile that cannot be read, or that does not fit the image's colour
  space, is treated as absent, as web browsers do.
* Transparency is composited onto white (``BACKGROUND``), whatever the mode
  it comes in: an alpha channel (LA, RGBA, PA, premultiplied La/RGBa), a
  transparent palette, or a transparent colour key (``tRNS``) on 1-bit,
  2/4/8/16-bit grey and 8/16-bit RGB images.  A key is matched against the
  samples as stored (16 bits for 16-bit images, before scaling to 8), so a
  16-bit image gets the same white as its 8-bit copy.  Dropping alpha would
  expose whatever colour the encoder left under transparent pixels (often
  black, sometimes garbage), so the result would depend on the encoder
  rather than on what is visible; white is how such images appear on the
  web pages they come from.

Called by transforms/decode.py after the file is loaded and before the EXIF
orientation is applied.
"""

from __future__ import annotations

import functools
import io
from typing import Optional, Tuple

import numpy as np
from PIL import Image, features

from natvision.transforms import config

BACKGROUND = (255, 255, 255)

# What to do with an embedded ICC colour profile (``--color_profile``).
COLOR_PROFILE_IGNORE = "ignore"
COLOR_PROFILE_SRGB = "srgb"
COLOR_PROFILES = (COLOR_PROFILE_IGNORE, COLOR_PROFILE_SRGB)

def _to_8bit_gray(img: Image.Image) -> Image.Image:
  """16-bit, 32-bit integer and float greyscale -> mode ``L``."""
  arr = np.asarray(img)
  if img.mode == "F":
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0,
                        neginf=0.0)
    top = 1.0 if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0 else 255.0
    gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255)
  else:  # I;16 variants and I, both read as 16-bit samples
    wide = np.clip(arr.astype(np.int64), 0, 65535)
    gray = (wide * 255 + 32767) // 65535
  return Image.fromarray(gray.astype(np.uint8), "L")


def _low_bytes_of_png16(data: bytes) -> Optional[np.ndarray]:
  """The low bytes of a 16-bit RGB PNG's samples, or None if not one.

  Pillow keeps only the high byte of each 16-bit sample (rawmode
  ``RGB;16B``); decoding the same stream as ``RGB;16L`` keeps the other
  byte, so that a 16-bit colour key can be matched exactly.
  """
  try:
    img = Image.open(io.BytesIO(data))
    if img.format != "PNG" or len(img.tile) != 1 or img.tile[0][3] != "RGB;16B":
      return None
    img.tile = [tuple(img.tile[0][:3]) + ("RGB;16L",)]
    img.load()
    return np.asarray(img)
  except Exception:  # noqa: BLE001 - then the key is matched on high bytes
    return None


def _key_alpha(img: Image.Image, rawmode: str,
               data: bytes) -> Optional[Image.Image]:
  """The alpha (``L``, 0 or 255) of a transparent colour key, or None.

  The key (``info["transparency"]``, PNG's ``tRNS``; a number for one band,
  a tuple for several) is in the units of the samples as stored: 2 or 4
  bits for low-depth grey, 16 bits for 16-bit grey (modes ``I;16``/``I``)
  and 16-bit RGB (of which Pillow holds only the high bytes).
  """
  key = img.info.get("transparency")
  if key is None or img.mode in ("P", "PA"):
    return None
  arr = np.asarray(img)
  if arr.ndim == 3:
    if not isinstance(key, (tuple, list)) or len(key) != arr.shape[-1]:
      return None
    key = np.array([int(k) for k in key])
    if img.mode == "RGB" and rawmode.startswith("RGB;16"):
      low = _low_bytes_of_png16(data)
      match = (arr == key >> 8).all(axis=-1)
      if low is not None and low.shape == arr.shape:
        match &= (low == key & 0xFF).all(axis=-1)
    else:
      match = (arr == key).all(axis=-1)
  elif arr.ndim == 2 and isinstance(key, (int, float)):
    if img.mode == "1":
      match = arr == bool(key)
    else:
      bits = {"L;1": 1, "L;2": 2, "L;4": 4}.get(rawmode[:3])
      if img.mode == "L" and bits:
        key = int(key) * 255 // ((1 << bits) - 1)
      match = arr == key
  else:
    return None
  return Image.fromarray(np.where(match, 0, 255).astype(np.uint8), "L")


def _split_alpha(img: Image.Image, rawmode: str = "", data: bytes = b""
                 ) -> Tuple[Image.Image, Optional[Image.Image]]:
  """Separates colour from transparency, for every mode Pillow decodes to.

  Returns:
    (colour, alpha): colour without transparency (any mode but those with
    alpha); alpha an ``L`` image (255 opaque), or None when the image has
    no transparency.
  """
  if img.mode in ("La", "RGBa"):  # premultiplied: undo first
    img = img.convert("LA" if img.mode == "La" else "RGBA")
  if img.mode in ("LA", "RGBA"):
    return img.convert(img.mode[:-1]), img.getchannel("A")
  if img.mode == "PA" or (img.mode == "P" and img.has_transparency_data):
    rgba = img.convert("RGBA")
    return rgba.convert("RGB"), rgba.getchannel("A")
  alpha = _key_alpha(img, rawmode, data) if "transparency" in img.info else None
  return img, alpha


def _is_srgb(profile) -> bool:
  from PIL import ImageCms  # pylint: disable=import-outside-toplevel
  try:
    return "srgb" in ImageCms.getProfileDescription(profile).lower()
  except ImageCms.PyCMSError:
    return False


_PROFILE_MODES = {"RGB": "RGB", "GRAY": "L", "CMYK": "CMYK"}


@functools.lru_cache(maxsize=32)
def _srgb_transform(icc: bytes, mode: str):
  """A cached Little CMS transform from an embedded profile to sRGB.

  Returns:
    The transform, or None when the profile is sRGB already, cannot be
    read, or is for another colour space than ``mode``.
  """
  from PIL import ImageCms  # pylint: disable=import-outside-toplevel
  try:
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    space = profile.profile.xcolor_space.strip()
    if _PROFILE_MODES.get(space) != mode or _is_srgb(profile):
      return None
    return ImageCms.buildTransform(
        profile, ImageCms.createProfile("sRGB"), mode, "RGB",
        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
        flags=ImageCms.Flags.NOCACHE)
  except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
    return None


def _colour_to_rgb(img: Image.Image, icc: Optional[bytes]) -> Image.Image:
  """Colour without transparency, in any mode -> ``RGB``.

  With ``icc`` (an embedded profile, when asked to apply it) colours are
  converted from that profile to sRGB.
  """
  if img.mode in ("F", "I") or img.mode.startswith("I;16"):
    img = _to_8bit_gray(img)
  elif img.mode == "1":
    img = img.convert("L")
  elif img.mode not in ("L", "RGB", "CMYK"):
    img = img.convert("RGB")  # P, YCbCr, LAB, HSV, RGBX, ...
  if icc:
    transform = _srgb_transform(bytes(icc), img.mode)
    if transform is not None:
      from PIL import ImageCms  # pylint: disable=import-outside-toplevel
      return ImageCms.applyTransform(img, transform)
  return img if img.mode == "RGB" else img.convert("RGB")


def to_rgb(img: Image.Image, *, rawmode: str = "", data: bytes = b"",
            color_profile: str = COLOR_PROFILE_IGNORE) -> Image.Image:
  """Any decoded mode -> ``RGB``, transparency composited onto white.

  Args:
    img: a loaded image in any mode Pillow decodes to.
    rawmode: the mode of the samples as stored (``tile`` before loading),
      to match a colour key in stored units.
    data: the file, to read the low bytes of a 16-bit RGB PNG's key.
    color_profile: ``ignore`` or ``srgb`` (apply an embedded profile).
  """
  icc = (img.info.get("icc_profile")
         if color_profile == COLOR_PROFILE_SRGB else None)
  colour, alpha = _split_alpha(img, rawmode, data)
  rgb = _colour_to_rgb(colour, icc)
  if alpha is None:
    return rgb
  out = Image.new("RGB", rgb.size, BACKGROUND)
  out.paste(rgb, mask=alpha)
  return out


def check_color_profile(color_profile: str) -> None:
  """Checks a ``--color_profile`` value, and that it can be honoured.

  Raises:
    ValueError: an unknown value, or ``srgb`` with a Pillow built without
      Little CMS.
  """
  if color_profile not in COLOR_PROFILES:
    raise config.ConfigError(
        f"--color_profile must be one of {', '.join(COLOR_PROFILES)}, not "
        f"{color_profile!r}")
  if color_profile == COLOR_PROFILE_SRGB and not features.check("littlecms2"):
    raise config.ConfigError(
        "--color_profile srgb needs Pillow built with Little CMS "
        "(PIL.ImageCms); install the Pillow wheel from PyPI or use ignore")
