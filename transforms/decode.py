"""Decoding: photo bytes -> one upright 8-bit RGB ``PIL.Image``.

Decides the order of the steps and the limits: what is refused before
decoding (formats, raws, size), the DCT draft, truncation, orientation.

Everything a model sees goes through ``decode_image``, so the odd corners of
real photo collections are settled here, once:

* Formats: whatever Pillow reads (JPEG, PNG, WebP, GIF, BMP, TIFF, ...).  An
  animated GIF, animated PNG/WebP or multi-page TIFF gives its first frame.
  Bytes Pillow cannot read are named (transforms/formats.py: HEIC, SVG,
  HTML, PDF, text, ...) so that the errors table says what the file is;
  camera raws are refused, never decoded from their preview (formats.py).
* Decompression bombs: ``Image.open`` only parses the header, so the declared
  width x height is compared with ``max_pixels`` before any pixel is decoded.
  Pillow has its own process-wide limit (``Image.MAX_IMAGE_PIXELS``, an error
  above twice its value, about 179 megapixels by default) that it applies
  inside ``Image.open``; when that fires first it is reported in the same
  words.  Raising ``max_pixels`` above Pillow's limit also needs
  ``Image.MAX_IMAGE_PIXELS`` raised; this module never changes that global.
* Big JPEGs are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
  (``Image.draft``) when the smaller image still has a short side of at least
  ``min_side``, which the preparation step says it needs
  (``decoded_size_needed``).  This is several times faster than a full decode
  and the pixels differ little from a full decode resized the same way.
* Truncated files are refused (``Image.LOAD_TRUNCATED_IMAGES`` stays off).
  Pillow would otherwise fill the missing rows with grey and the photo would
  get an embedding of a half-grey picture: a wrong row that looks right.  An
  error row instead says which files to fetch again; partial copies are the
  usual cause.  A JPEG that lacks only its final EOI marker is refused too,
  as Pillow cannot tell it from a cut one.
* Colour, colour profiles and transparency: transforms/rgb.py turns the
  loaded image into RGB (16-bit scaled, an ICC profile applied with
  ``--color_profile srgb``, transparency composited onto white).
* EXIF orientation is applied last, after the draft and the colour
  conversion, with the same table as ``PIL.ImageOps.exif_transpose``.  A
  malformed EXIF block costs the orientation, not the photo.

The returned image carries its upright full-resolution size (the size
stored in the file, turned by the EXIF orientation, before any draft) in
``image.info[ORIGINAL_SIZE_KEY]``; its own ``size`` is the decoded size
(after the draft), upright as well.
"""

from __future__ import annotations

import io
import re
from typing import Iterable, Optional, Tuple

from PIL import Image

from natvision.transforms import preprocess
from natvision.transforms.formats import (DecodeError, camera_raw_reason,
                                is_image, sniff_format, unidentified)
from natvision.transforms.rgb import COLOR_PROFILE_IGNORE, to_rgb

# is_image is transforms/fetch.py's (``decode.is_image``), named here too.
__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_MIN_SIDE", "DecodeError",
           "ORIGINAL_SIZE_KEY", "decode_image", "decoded_size_needed",
           "is_image", "sniff_format"]

DEFAULT_MIN_SIDE = 299
DEFAULT_MAX_PIXELS = 100_000_000

ORIGINAL_SIZE_KEY = "original_size"

# EXIF orientation -> the transpose that makes the image upright; the table
# PIL.ImageOps.exif_transpose uses.  Orientations 5 to 8 swap width and height.
_ORIENTATION_TAG = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Formats Pillow can identify but should not decode here.  EPS is rendered by
# running Ghostscript on the file.
_REFUSED_FORMATS = {"EPS": "it would be rendered by running Ghostscript"}

_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def decoded_size_needed(policies: Iterable[str], size: int = 299) -> int:
  """The smallest short side a decoded photo may have for ``policies``.

  ``center_crop`` keeps the centre ``0.875`` of the short side, so it needs a
  short side of ``ceil(size / 0.875)`` (342 for 299) to avoid upsampling;
  ``squash`` needs ``size`` on both sides, so a short side of ``size``.
  Photos smaller than this are decoded at full size (a draft never
  upsamples).

  Raises:
    ValueError: an unknown policy, or no policy at all.
  """
  needed = [preprocess.short_side_needed(p, size) for p in policies]
  if not needed:
    raise ValueError("decoded_size_needed needs at least one policy")
  return max(needed)


def _bomb(width: int, height: int, max_pixels: int) -> DecodeError:
  return DecodeError(
      f"image of {width}x{height} = {width * height} pixels exceeds "
      f"--max_pixels {max_pixels}; refused before decoding (a possible "
      f"decompression bomb)")


def _pil_bomb(e: Exception, max_pixels: int) -> DecodeError:
  match = _PIL_BOMB_PIXELS.search(str(e))
  pixels = int(match.group(1)) if match else None
  if pixels is not None and pixels > max_pixels:
    return DecodeError(
        f"image of {pixels} pixels exceeds --max_pixels {max_pixels}; refused "
        f"before decoding (a possible decompression bomb)")
  limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
  return DecodeError(
      f"image of {pixels if pixels is not None else 'too many'} pixels exceeds "
      f"Pillow's limit of {limit} pixels; raise PIL.Image.MAX_IMAGE_PIXELS "
      f"along with --max_pixels to accept it")


def _orientation(img: Image.Image) -> int:
  try:
    value = int(img.getexif().get(_ORIENTATION_TAG, 1))
  except Exception:  # noqa: BLE001 - malformed EXIF costs only the orientation
    return 1
  return value if value in _UPRIGHT else 1


def _draft_request(
    size: Tuple[int, int], orientation: int, min_side: Optional[int],
    draft_to: Optional[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
  """The size to pass to ``Image.draft``, in stored (not upright) pixels.

  ``Image.draft`` picks the largest of 1/2, 1/4, 1/8 that keeps both sides at
  least the request, so a square request of ``min_side`` keeps the short
  side at least ``min_side`` whatever the orientation.  An explicit
  ``draft_to`` is upright and is swapped for orientations 5 to 8.
  """
  if draft_to is not None:
    width, height = draft_to
    if orientation >= 5:
      width, height = height, width
  elif min_side:
    width = height = min_side
  else:
    return None
  if width <= 0 or height <= 0:
    return None
  if size[0] < 2 * width or size[1] < 2 * height:
    return None  # no scale would do
  return width, height


def decode_image(data: bytes, *, min_side: Optional[int] = DEFAULT_MIN_SIDE,
                 max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_to: Optional[Tuple[int, int]] = None,
                 color_profile: str = COLOR_PROFILE_IGNORE,
                 filename: Optional[str] = None) -> Image.Image:
  """Decodes photo bytes into an upright RGB image.

  Args:
    data: the whole file.
    min_side: JPEGs are decoded at a reduced scale (1/2, 1/4, 1/8) when the
      short side stays at least this; ``None`` or 0 decodes at full size.
      Use ``decoded_size_needed`` to get it from the preparation policies.
    max_pixels: photos declaring more pixels (width x height) are refused
      before decoding.
    draft_to: an explicit upright (width, height) that the decoded image
      must cover; it replaces ``min_side`` for the draft.
    color_profile: ``ignore`` (the default: an embedded ICC profile is not
      applied) or ``srgb`` (colours are converted from a non-sRGB embedded
      profile to sRGB).
    filename: the file's name or URI; only its extension is used, to refuse
      a TIFF-structured file named as a camera raw (``.nef``, ``.dng``...).

  Returns:
    A loaded image of mode ``RGB``, upright, whose
    ``info[ORIGINAL_SIZE_KEY]`` is the upright size before any draft.

  Raises:
    DecodeError: the bytes are empty, not an image, an unsupported
      (including camera raws), truncated or corrupt image, or too large;
      the message says which.
  """
  if not data:
    raise DecodeError("empty file (0 bytes)")
  fmt = "image"
  try:
    try:
      img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
      raise unidentified(data, filename) from None
    except Image.DecompressionBombError as e:
      raise _pil_bomb(e, max_pixels) from None
    fmt = img.format or fmt
    if fmt in _REFUSED_FORMATS:
      raise DecodeError(f"unsupported format {fmt}: {_REFUSED_FORMATS[fmt]}")
    raw = camera_raw_reason(data, img, filename)
    if raw is not None:
      raise DecodeError(raw)
    width, height = img.size
    if width * height > max_pixels:
      raise _bomb(width, height, max_pixels)
    if width <= 0 or height <= 0:
      raise DecodeError(f"{fmt} declares an empty image ({width}x{height})")

    if fmt in ("JPEG", "MPO"):
      request = _draft_request(img.size, _orientation(img), min_side, draft_to)
      if request is not None:
        img.draft("RGB", request)
    rawmode = img.tile[0][3] if len(img.tile) == 1 else ""
    img.load()
    orientation = _orientation(img)
    rgb = to_rgb(img, rawmode=rawmode if isinstance(rawmode, str) else "",
                 data=data, color_profile=color_profile)
    if orientation in _UPRIGHT:
      rgb = rgb.transpose(_UPRIGHT[orientation])
  except DecodeError:
    raise
  except Image.DecompressionBombError as e:
    raise _pil_bomb(e, max_pixels) from None
  except (OSError, EOFError) as e:
    text = str(e)
    if fmt == "image":
      fmt = sniff_format(data) or fmt
    if isinstance(e, EOFError) or "truncated" in text.lower():
      raise DecodeError(
          f"truncated {fmt} file: the data ends before the image is complete "
          f"({text or type(e).__name__})") from None
    raise DecodeError(
        f"corrupt {fmt} data: {text or type(e).__name__}") from None
  except MemoryError:
    raise DecodeError(f"not enough memory to decode this {fmt}") from None
  except Exception as e:  # noqa: BLE001 - Pillow raises many kinds on bad data
    raise DecodeError(
        f"cannot decode {fmt}: {type(e).__name__}: {e}") from None

  if orientation >= 5:
    width, height = height, width
  rgb.info[ORIGINAL_SIZE_KEY] = (width, height)
  return rgb
