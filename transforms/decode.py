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
* Camera raws are refused, never decoded from their preview.  A DNG, NEF,
  ARW, PEF or CR2 is a TIFF whose first image is usually a small preview
  (or a JPEG thumbnail) while the photo sits in a sub-image (SubIFDs) that
  Pillow does not decode; Pillow would silently return the preview.  They
  are recognised by their magic (CR2's ``CR`` at offset 8, ORF, RW2, RAF,
  X3F, MRW, CRW, CR3), by TIFF tags of the first image (DNGVersion, CFA or
  linear-raw photometric, DNGPrivateData, a reduced-resolution
  NewSubfileType, SubIFDs in a file that names a camera maker), or by a
  raw file extension on a TIFF-structured or unrecognised file.
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
* Transparency is composited onto white, whatever the mode it comes in: an
  alpha channel (LA, RGBA, PA, premultiplied La/RGBa), a transparent
  palette, or a transparent colour key (``tRNS``) on 1-bit, 2/4/8/16-bit
  grey and 8/16-bit RGB images.  A key is matched against the samples as
  stored (16 bits for 16-bit images, before scaling to 8), so a 16-bit
  image gets the same white as its 8-bit copy.  Dropping alpha would expose
  whatever colour the encoder left under transparent pixels (often black,
  sometimes garbage), so the result would depend on the encoder rather than
  on what is visible; white is how such images appear on the web pages they
  come from.
* EXIF orientation is applied last, after the draft and the colour
  conversion, with the same table as ``PIL.ImageOps.exif_transpose``.  A
  malformed EXIF block costs the orientation, not the photo.

The returned image carries its upright full-resolution size (the size
stored in the file, turned by the EXIF orientation, before any draft) in
``image.info[ORIGINAL_SIZE_KEY]``; its own ``size`` is the decoded size
(after the draft), upright as well.
"""

from __future__ import annotations

import functools
import io
import posixpath
import re
from typing import Iterable, Optional, Tuple

import numpy as np
from PIL import Image, features

from natvision.transforms import config
from natvision.transforms import preprocess
from natvision.transforms.records import STAGE_DECODE

DEFAULT_MIN_SIDE = 299
DEFAULT_MAX_PIXELS = 100_000_000

ORIGINAL_SIZE_KEY = "original_size"

BACKGROUND = (255, 255, 255)

# What to do with an embedded ICC colour profile (``--color_profile``).
COLOR_PROFILE_IGNORE = "ignore"
COLOR_PROFILE_SRGB = "srgb"
COLOR_PROFILES = (COLOR_PROFILE_IGNORE, COLOR_PROFILE_SRGB)

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
                      "video or other ISO media"}
_CAMERA_RAW = "camera raw"

# Raw formats that are not TIFF files (Pillow cannot open them), by magic.
_RAW_MAGIC = ((b"IIRO", "ORF"), (b"IIRS", "ORF"), (b"MMOR", "ORF"),
              (b"IIU\x00", "RW2"), (b"FUJIFILMCCD-RAW", "RAF"),
              (b"FOVb", "X3F"), (b"\x00MRM", "MRW"))

# Raw file extensions -> the name used in messages.
_RAW_EXTENSIONS = {
    ext: ext.upper() for ext in (
        "3fr", "ari", "arw", "cr2", "cr3", "crw", "dcr", "dng", "erf", "fff",
        "iiq", "k25", "kdc", "mef", "mos", "mrw", "nef", "nrw", "orf", "pef",
        "raf", "raw", "rw2", "rwl", "sr2", "srf", "srw", "x3f")}

# The raw format a TIFF-based raw without DNGVersion has, by its Make tag.
_RAW_BY_MAKE = (("NIKON", "NEF"), ("CANON", "CR2"), ("SONY", "ARW"),
                ("PENTAX", "PEF"), ("RICOH", "PEF"), ("OLYMPUS", "ORF"),
                ("OM DIGITAL", "ORF"), ("FUJIFILM", "RAF"),
                ("PANASONIC", "RW2"), ("LEICA", "RWL"), ("SAMSUNG", "SRW"),
                ("HASSELBLAD", "3FR"), ("PHASE ONE", "IIQ"))

# TIFF tags that tell a camera raw from a TIFF photo.
_TAG_NEW_SUBFILE_TYPE = 254
_TAG_PHOTOMETRIC = 262
_TAG_MAKE = 271
_TAG_SUB_IFDS = 330
_TAG_DNG_VERSION = 50706
_TAG_DNG_PRIVATE_DATA = 50740  # also in Sony ARW and Pentax PEF files
_TAG_SONY_SR2_PRIVATE = 0x7200
_RAW_PHOTOMETRIC = {32803: "colour filter array", 34892: "linear raw"}

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
  (``HEIC``, ``AVIF``, ``JPEG XL``, ``SVG``, ``PDF``, camera raws such as
  ``camera raw (CR2)``), files that are not images (``HTML``, ``XML``,
  ``JSON``, ``ZIP``, ``gzip``, ``text``), and the formats Pillow reads
  (``JPEG``, ``PNG``, ...), so that a damaged header can be told from a
  foreign file.  TIFF-based raws other than CR2 start like any TIFF and are
  recognised from their tags (``camera_raw_reason``).
  """
  head = bytes(data[:1024])
  if head[4:8] == b"ftyp":
    brands = {head[8:12]} | {head[i:i + 4] for i in range(16, 64, 4)}
    if head[8:12] in _HEIC_BRANDS or brands & _HEIC_BRANDS:
      return "HEIC"
    if brands & _AVIF_BRANDS:
      return "AVIF"
    if head[8:12] == b"crx ":
      return f"{_CAMERA_RAW} (CR3)"
    return "video or other ISO media"
  if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL "):
    return "JPEG XL"
  if head.startswith(b"II*\x00") and head[8:10] == b"CR":
    return f"{_CAMERA_RAW} (CR2)"
  if head.startswith(b"II") and head[6:14] == b"HEAPCCDR":
    return f"{_CAMERA_RAW} (CRW)"
  for magic, kind in _RAW_MAGIC:
    if head.startswith(magic):
      return f"{_CAMERA_RAW} ({kind})"
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


def is_image(data: bytes) -> bool:
  """Whether bytes start like an image file, whatever a server labelled them.

  True for the formats Pillow reads here (JPEG, PNG, GIF, WebP, TIFF, BMP)
  and for the images ``decode_image`` names as unsupported (HEIC, AVIF,
  JPEG XL, SVG, camera raws), so that their error row names the format.
  Looks at the first 1024 bytes only (``sniff_format``).
  """
  kind = sniff_format(data)
  if kind is None:
    return False
  return (kind in _READABLE_KINDS or kind.startswith(_CAMERA_RAW)
          or kind in _UNSUPPORTED_KINDS - {"PDF", "video or other ISO media"})


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


def _extension(filename: Optional[str]) -> str:
  """The lower-case extension of a file name or URI, without the dot."""
  if not filename:
    return ""
  name = filename
  if name.startswith(("http://", "https://")):
    name = name.split("?", 1)[0].split("#", 1)[0]
  return posixpath.splitext(name.rsplit("/", 1)[-1])[1][1:].lower()


def _raw_error(kind: str, detail: str) -> DecodeError:
  return DecodeError(
      f"unsupported format {_CAMERA_RAW} ({kind}): {detail}; camera raws are "
      f"not decoded here, export the photo as JPEG or PNG")


def _unidentified(data: bytes, filename: Optional[str] = None) -> DecodeError:
  kind = sniff_format(data)
  raw_ext = _RAW_EXTENSIONS.get(_extension(filename))
  if kind is not None and kind.startswith(_CAMERA_RAW):
    return _raw_error(kind[len(_CAMERA_RAW) + 2:-1],
                      "Pillow cannot decode it")
  if kind == "TIFF":
    reason = camera_raw_reason(data, None, filename)
    if reason is not None:
      return DecodeError(reason)
  if raw_ext and kind is None:
    return _raw_error(raw_ext, f"a .{raw_ext.lower()} file Pillow cannot open")
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


def _first_ifd(data: bytes):
  """The tags of a TIFF's first image directory, read by Pillow, or None."""
  from PIL import TiffImagePlugin  # pylint: disable=import-outside-toplevel
  try:
    ifd = TiffImagePlugin.ImageFileDirectory_v2(bytes(data[:8]))
    fp = io.BytesIO(data)
    fp.seek(ifd.next)
    ifd.load(fp)
    return ifd
  except Exception:  # noqa: BLE001 - a damaged header tells nothing
    return None


def camera_raw_reason(data: bytes, img: Optional[Image.Image] = None,
                      filename: Optional[str] = None) -> Optional[str]:
  """Why an opened file is a camera raw, or None when it is not one.

  Pillow opens TIFF-based raws (DNG, NEF, ARW, PEF, CR2, ...) as TIFFs and
  decodes their first image, which is a preview or thumbnail (or the raw
  sensor mosaic); the photo itself is in a sub-image.  Recognised by CR2's
  magic, by tags of the first image (DNGVersion, a colour-filter-array or
  linear-raw photometric, DNGPrivateData or Sony's SR2Private, a
  reduced-resolution NewSubfileType, SubIFDs together with a Make), or by a
  raw extension on a TIFF.

  Args:
    data: the whole file.
    img: the file opened by Pillow (header only); None when Pillow cannot
      open it (a raw mosaic in the first image is such a case), and then
      the first directory is read here.
    filename: the file's name or URI, for its extension; optional.

  Returns:
    The error message for the errors table, or None.
  """
  kind = sniff_format(data)
  if kind is not None and kind.startswith(_CAMERA_RAW):
    return str(_raw_error(kind[len(_CAMERA_RAW) + 2:-1],
                          "its first image is only a preview"))
  raw_ext = _RAW_EXTENSIONS.get(_extension(filename))
  if img is not None and img.format != "TIFF":
    return None
  tags = getattr(img, "tag_v2", None) if img is not None else _first_ifd(data)
  if tags is None:
    return None
  size = img.size if img is not None else (tags.get(256), tags.get(257))
  make = str(tags.get(_TAG_MAKE, "") or "").strip()
  try:
    reduced = int(tags.get(_TAG_NEW_SUBFILE_TYPE, 0)) & 1
  except (TypeError, ValueError):
    reduced = 0
  try:
    photometric = int(tags.get(_TAG_PHOTOMETRIC, -1))
  except (TypeError, ValueError):
    photometric = -1
  sub_ifds = _TAG_SUB_IFDS in tags
  preview = f"its first image is a {size[0]}x{size[1]} preview"
  if sub_ifds:
    preview += " and the photo is in a sub-image (SubIFDs)"
  if _TAG_DNG_VERSION in tags:
    return str(_raw_error("DNG", preview if (reduced or sub_ifds) else
                          "its image is raw sensor data"))
  if photometric in _RAW_PHOTOMETRIC:
    detail = f"its first image is {_RAW_PHOTOMETRIC[photometric]} sensor data"
  elif reduced or (sub_ifds and make):
    detail = preview
  elif _TAG_DNG_PRIVATE_DATA in tags or _TAG_SONY_SR2_PRIVATE in tags:
    detail = "its first image is only a preview (maker's raw tags)"
  elif raw_ext:
    detail = (f"a TIFF named .{raw_ext.lower()}, whose first image is "
              f"usually only a preview")
  else:
    return None
  by_make = next((k for m, k in _RAW_BY_MAKE if make.upper().startswith(m)),
                 None)
  return str(_raw_error(raw_ext or by_make or "TIFF-based", detail))


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
      raise _unidentified(data, filename) from None
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
