"""What a photo's bytes are: formats named, camera raws recognised, reasons.

Decides the words of the errors table for bytes that do not give a photo,
and which files are refused before any pixel is decoded:

* Formats: ``sniff_format`` names a file from its first bytes, whatever a
  server labelled it: the formats Pillow reads here (JPEG, PNG, WebP, GIF,
  BMP, TIFF), images it has no decoder for (HEIC, AVIF, JPEG XL, SVG, PDF,
  camera raws) and files that are not images (HTML, XML, JSON, ZIP, gzip,
  text), so that a damaged header can be told from a foreign file
  (``unidentified``) and an http body from an error page (``is_image``,
  used by transforms/fetch.py).
* Camera raws are refused, never decoded from their preview
  (``camera_raw_reason``).  A DNG, NEF, ARW, PEF or CR2 is a TIFF whose
  first image is usually a small preview (or a JPEG thumbnail) while the
  photo sits in a sub-image (SubIFDs) that Pillow does not decode; Pillow
  would silently return the preview.  They are recognised by their magic
  (CR2's ``CR`` at offset 8, ORF, RW2, RAF, X3F, MRW, CRW, CR3), by TIFF
  tags of the first image (DNGVersion, CFA or linear-raw photometric,
  DNGPrivateData, a reduced-resolution NewSubfileType, SubIFDs in a file
  that names a camera maker), or by a raw file extension on a
  TIFF-structured or unrecognised file.

``DecodeError`` (stage ``decode``) is the error of every refusal, here and
in transforms/decode.py.
"""

from __future__ import annotations

import io
import posixpath
from typing import Optional

from PIL import Image

from natvision.transforms.records import STAGE_DECODE

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


class DecodeError(Exception):
  """A photo's bytes do not give an image; the message is the reason."""

  stage = STAGE_DECODE

  def __init__(self, message: str):
    super().__init__(message)
    self.message = message

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


def unidentified(data: bytes, filename: Optional[str] = None) -> DecodeError:
  """The error for bytes Pillow cannot identify, naming what they are."""
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
