"""Decoding: photo bytes -> one upright 8-bit RGB ``PIL.Image``.

Everything a model sees goes through ``decode_image``, so the odd corners of
real photo collections are settled here, once:

* Formats: whatever Pillow reads (JPEG, PNG, WebP, GIF, BMP, TIFF, ...).  An
  animated GIF, animated PNG/WebP or multi-page TIFF gives its first frame.
  Bytes Pillow cannot read are named when we recognise them (HEIC, SVG,
  HTML, PDF, text, ...) so that the errors table says what the file is.
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
* Colour: grey, palette, CMYK (including Adobe's inverted CMYK JPEGs, which
  Pillow undoes), YCbCr, 1-bit and the rest become RGB.  16-bit samples are
  scaled to 8 bits (``round(v * 255 / 65535)``), not clipped as Pillow's own
  ``convert`` does.  Floating-point images are read as [0, 1] when all their
  values fit in it, else as [0, 255].
* Transparency (an alpha channel, or a transparent palette or colour key) is
  composited onto white.  Dropping alpha would expose whatever colour the
  encoder left under transparent pixels (often black, sometimes garbage),
  so the result would depend on the encoder rather than on what is visible;
  white is how such images appear on the web pages they come from.
* EXIF orientation is applied last, after the draft and the colour
  conversion, with the same table as ``PIL.ImageOps.exif_transpose``.  A
  malformed EXIF block costs the orientation, not the photo.

The returned image carries its upright full-resolution size (before any
draft) in ``image.info[ORIGINAL_SIZE_KEY]``.
"""

from __future__ import annotations

import io
import re
from typing import Iterable, Optional, Tuple

import numpy as np
from PIL import Image

from transforms import preprocess
from transforms.records import STAGE_DECODE

DEFAULT_MIN_SIDE = 299
DEFAULT_MAX_PIXELS = 100_000_000

ORIGINAL_SIZE_KEY = "original_size"

BACKGROUND = (255, 255, 255)

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

# What sniff_format names: formats Pillow reads (so a file it cannot open is
# damaged), and images or media it has no decoder for here.  Anything else
# named is not an image at all.
_READABLE_KINDS = {"JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"}
_UNSUPPORTED_KINDS = {"HEIC", "AVIF", "JPEG XL", "SVG", "PDF",
                      "camera raw (CR3)", "video or other ISO media"}

_HEIC_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx",
                b"hevm", b"hevs"}
_AVIF_BRANDS = {b"avif", b"avis"}

_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class DecodeError(Exception):
  """A photo's bytes do not give an image; the message is the reason."""

  stage = STAGE_DECODE

  def __init__(self, message: str):
    super().__init__(message)
    self.message = message


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


def sniff_format(data: bytes) -> Optional[str]:
  """Names the kind of file from its first bytes, or None if unrecognised.

  Used to explain files Pillow cannot open: images it has no decoder for
  (``HEIC``, ``AVIF``, ``JPEG XL``, ``SVG``, ``PDF``), files that are not
  images (``HTML``, ``XML``, ``JSON``, ``ZIP``, ``gzip``, ``text``), and the
  formats Pillow reads (``JPEG``, ``PNG``, ...), so that a damaged header can
  be told from a foreign file.
  """
  head = bytes(data[:1024])
  if head[4:8] == b"ftyp":
    brands = {head[8:12]} | {head[i:i + 4] for i in range(16, 64, 4)}
    if head[8:12] in _HEIC_BRANDS or brands & _HEIC_BRANDS:
      return "HEIC"
    if brands & _AVIF_BRANDS:
      return "AVIF"
    if head[8:12] == b"crx ":
      return "camera raw (CR3)"
    return "video or other ISO media"
  if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL "):
    return "JPEG XL"
  for magic, kind in ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"),
                      (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"),
                      (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
                      (b"%PDF", "PDF"), (b"PK\x03\x04", "ZIP"),
                      (b"\x1f\x8b", "gzip")):
    if head.startswith(magic):
      return kind
  if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
    return "WEBP"
  text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
  if text.startswith(b"<svg") or (text.startswith(b"<?xml") and
                                  b"<svg" in text):
    return "SVG"
  if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text[:256]:
    return "HTML"
  if text.startswith(b"<?xml"):
    return "XML"
  if text[:1] in (b"{", b"[") and _is_text(head):
    return "JSON"
  if _is_text(head):
    return "text"
  return None


def _is_text(head: bytes) -> bool:
  try:
    chars = head.decode("utf-8")
  except UnicodeDecodeError as e:
    if e.start < len(head) - 3:  # not merely a character cut at the end
      return False
    chars = head[:e.start].decode("utf-8")
  return bool(chars) and all(c.isprintable() or c in "\t\r\n\f" for c in chars)


def _preview(data: bytes) -> str:
  head = bytes(data[:24])
  if _is_text(head):
    text = head.decode("utf-8", errors="ignore").strip()
    return f"file starts with {text[:20]!r}"
  return "file starts with bytes " + " ".join(f"{b:02x}" for b in head[:8])


def _unidentified(data: bytes) -> DecodeError:
  kind = sniff_format(data)
  if kind is None:
    return DecodeError(f"not an image: unrecognised data, {_preview(data)}")
  if kind in _READABLE_KINDS:
    return DecodeError(
        f"corrupt {kind} file: its header cannot be read ({_preview(data)})")
  if kind in _UNSUPPORTED_KINDS:
    return DecodeError(
        f"unsupported format {kind}: Pillow cannot decode it here; convert "
        f"the photo to JPEG or PNG")
  return DecodeError(f"not an image: {kind}, {_preview(data)}")


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


def _to_rgb(img: Image.Image) -> Image.Image:
  """Any decoded mode -> ``RGB``, transparency composited onto white."""
  if img.mode == "RGB" and not img.has_transparency_data:
    return img
  if img.mode in ("F", "I") or img.mode.startswith("I;16"):
    img = _to_8bit_gray(img)
  if img.has_transparency_data:
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, BACKGROUND)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out
  return img.convert("RGB")


def decode_image(data: bytes, *, min_side: Optional[int] = DEFAULT_MIN_SIDE,
                 max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_to: Optional[Tuple[int, int]] = None) -> Image.Image:
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

  Returns:
    A loaded image of mode ``RGB``, upright, whose
    ``info[ORIGINAL_SIZE_KEY]`` is the upright size before any draft.

  Raises:
    DecodeError: the bytes are empty, not an image, an unsupported,
      truncated or corrupt image, or too large; the message says which.
  """
  if not data:
    raise DecodeError("empty file (0 bytes)")
  fmt = "image"
  try:
    try:
      img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
      raise _unidentified(data) from None
    except Image.DecompressionBombError as e:
      raise _pil_bomb(e, max_pixels) from None
    fmt = img.format or fmt
    if fmt in _REFUSED_FORMATS:
      raise DecodeError(f"unsupported format {fmt}: {_REFUSED_FORMATS[fmt]}")
    width, height = img.size
    if width * height > max_pixels:
      raise _bomb(width, height, max_pixels)
    if width <= 0 or height <= 0:
      raise DecodeError(f"{fmt} declares an empty image ({width}x{height})")

    if fmt in ("JPEG", "MPO"):
      request = _draft_request(img.size, _orientation(img), min_side, draft_to)
      if request is not None:
        img.draft("RGB", request)
    img.load()
    orientation = _orientation(img)
    rgb = _to_rgb(img)
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
