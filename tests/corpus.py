"""A corpus of odd and broken image files, written by code.

``write_corpus(directory)`` writes over seventy files that exercise the
decoder: every colour mode and container a photo collection turns up
(progressive and CMYK JPEGs, EXIF rotations, 16-bit and palette PNGs, alpha
WebP, animated GIF, multi-page TIFF, 1x1 and 12000x6 images, odd file names),
transparency in every form Pillow decodes, an embedded Adobe RGB profile,
and the ways files arrive broken (empty, truncated, corrupt, not an image at
all, a decompression bomb, a camera raw that would give only its preview).
Content comes from the real photos that ship with scikit-image and
scikit-learn where that matters, from flat colours where a test checks exact
pixels, and from a seeded generator otherwise, so the corpus is the same on
every run.

Each file is described by a ``CorpusItem``; tests iterate over them.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
from PIL import Image

VALID = "valid"
BROKEN = "broken"

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

# The upright quadrant test card: top-left red, top-right green, bottom-left
# blue, bottom-right white.  EXIF items store it turned the other way.
QUADRANT_SIZE = (400, 300)

# Sample point -> colour; a decoded pixel must be within this many levels.
PIXEL_TOLERANCE = 16

Pixels = Tuple[Tuple[Tuple[int, int], Tuple[int, int, int]], ...]


@dataclasses.dataclass(frozen=True)
class CorpusItem:
  """One file of the corpus.

  Attributes:
    filename: name inside the corpus directory.
    kind: ``valid`` (must decode) or ``broken`` (must be refused).
    expected_stage: for broken files, the stage that refuses them
      (``read`` or ``decode``); None for valid ones.
    description: what the file is and why it is here.
    expected_size: upright (width, height) after a full decode, when known.
    expected_pixels: ((x, y), (r, g, b)) sample points of the upright,
      fully decoded RGB image.
  """

  filename: str
  kind: str
  expected_stage: Optional[str]
  description: str
  expected_size: Optional[Tuple[int, int]] = None
  expected_pixels: Pixels = ()


def _data_dirs() -> List[str]:
  dirs = []
  try:
    import skimage  # pylint: disable=import-outside-toplevel
    dirs.append(os.path.join(os.path.dirname(skimage.__file__), "data"))
  except ImportError:
    pass
  try:
    import sklearn  # pylint: disable=import-outside-toplevel
    dirs.append(os.path.join(os.path.dirname(sklearn.__file__), "datasets",
                             "images"))
  except ImportError:
    pass
  return dirs


def load_photo(name: str, seed: int = 0) -> Image.Image:
  """A real RGB photo shipped with scikit-image or scikit-learn.

  Args:
    name: file name, e.g. ``coffee.png`` or ``china.jpg``.
    seed: seeds the stand-in used when neither library is installed.

  Returns:
    The photo as an RGB image; a smooth seeded stand-in of 640x427 pixels
    when the file is not available.
  """
  for folder in _data_dirs():
    path = os.path.join(folder, name)
    if os.path.exists(path):
      with Image.open(path) as img:
        return img.convert("RGB")
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)
  return Image.fromarray(coarse, "RGB").resize((640, 427),
                                               Image.Resampling.BICUBIC)


def quadrant_card(size: Tuple[int, int] = QUADRANT_SIZE) -> Image.Image:
  """The upright test card: red, green / blue, white quadrants."""
  w, h = size
  arr = np.empty((h, w, 3), np.uint8)
  arr[:h // 2, :w // 2] = RED
  arr[:h // 2, w // 2:] = GREEN
  arr[h // 2:, :w // 2] = BLUE
  arr[h // 2:, w // 2:] = WHITE
  return Image.fromarray(arr, "RGB")


def quadrant_pixels(size: Tuple[int, int]) -> Pixels:
  """Sample points at the centre of each quadrant of an upright card."""
  w, h = size
  return (((w // 4, h // 4), RED), ((3 * w // 4, h // 4), GREEN),
          ((w // 4, 3 * h // 4), BLUE), ((3 * w // 4, 3 * h // 4), WHITE))


# The transpose that stores an upright image under each EXIF orientation (the
# inverse of what a viewer applies).
_STORE_AS = {
    3: Image.Transpose.ROTATE_180,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


def encode(img: Image.Image, fmt: str, **params) -> bytes:
  """``img`` saved as ``fmt`` (Pillow's save parameters), as bytes."""
  buf = io.BytesIO()
  img.save(buf, fmt, **params)
  return buf.getvalue()


def _exif_jpeg(upright: Image.Image, orientation: int, **params) -> bytes:
  exif = Image.Exif()
  exif[0x0112] = orientation
  stored = upright.transpose(_STORE_AS[orientation])
  return encode(stored, "JPEG", quality=92, exif=exif.tobytes(), **params)


def _chunk(kind: bytes, payload: bytes) -> bytes:
  crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
  return (struct.pack(">I", len(payload)) + kind + payload +
          struct.pack(">I", crc))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int,
              rows: Sequence[bytes] = (), row: Optional[bytes] = None) -> bytes:
  """Writes a PNG by hand, for what Pillow will not write.

  Args:
    width, height: declared size.
    bit_depth, color_type: as in the PNG IHDR chunk.
    rows: raw scanlines (without the filter byte), one per row; or
    row: one scanline repeated ``height`` times, compressed as a stream so
      that huge images cost little memory.
  """
  ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
  compressor = zlib.compressobj(9)
  parts = []
  if row is not None:
    line = b"\x00" + row
    for _ in range(height):
      parts.append(compressor.compress(line))
  else:
    for r in rows:
      parts.append(compressor.compress(b"\x00" + r))
  parts.append(compressor.flush())
  return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) +
          _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b""))


def _png_chunks(data: bytes) -> List[Tuple[int, bytes, bytes]]:
  """(offset, type, payload) of each chunk of a PNG."""
  chunks, pos = [], 8
  while pos < len(data):
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    kind = data[pos + 4:pos + 8]
    chunks.append((pos, kind, data[pos + 8:pos + 8 + length]))
    pos += 12 + length
  return chunks


def png_with_chunks(png: bytes, chunks: Sequence[Tuple[bytes, bytes]]) -> bytes:
  """Inserts (type, payload) chunks just before a PNG's first IDAT."""
  at = min(offset for offset, kind, _ in _png_chunks(png) if kind == b"IDAT")
  return png[:at] + b"".join(_chunk(k, p) for k, p in chunks) + png[at:]


# --- ICC profiles -----------------------------------------------------------

# Adobe RGB (1998): colorants adapted to the D50 connection space, as its
# published profile has them, and its gamma of 563/256.
ADOBE_RGB_COLORANTS = ((0.60974, 0.31111, 0.01947),
                       (0.20528, 0.62567, 0.06087),
                       (0.14919, 0.06322, 0.74457))
ADOBE_RGB_GAMMA = 563 / 256
D50 = (0.9642, 1.0, 0.8249)


def _s15fixed16(value: float) -> bytes:
  return struct.pack(">i", int(round(value * 65536)))


def _icc_tag(kind: bytes, body: bytes) -> bytes:
  data = kind + b"\0" * 4 + body
  return data + b"\0" * (-len(data) % 4)


def _icc_profile(description: str, space: bytes,
                 tags: List[Tuple[bytes, bytes]]) -> bytes:
  """An ICC v2 display profile: header, tag table, description, white."""
  text = description.encode("ascii") + b"\0"
  desc = (struct.pack(">I", len(text)) + text + struct.pack(">II", 0, 0) +
          struct.pack(">HB", 0, 0) + b"\0" * 67)
  tags = [(b"desc", _icc_tag(b"desc", desc)),
          (b"wtpt", _icc_tag(b"XYZ ", b"".join(map(_s15fixed16, D50)))),
          (b"cprt", _icc_tag(b"text", b"no copyright, test data\0"))] + tags
  offset = 128 + 4 + 12 * len(tags)
  table, body = struct.pack(">I", len(tags)), b""
  for sig, data in tags:
    table += sig + struct.pack(">II", offset + len(body), len(data))
    body += data
  size = offset + len(body)
  header = (struct.pack(">I", size) + b"\0" * 4 + bytes([2, 0x10, 0, 0]) +
            b"mntr" + space + b"XYZ " +
            struct.pack(">6H", 2024, 1, 1, 0, 0, 0) + b"acsp" + b"\0" * 28 +
            b"".join(map(_s15fixed16, D50)) + b"\0" * 48)
  assert len(header) == 128
  return header + table + body


def icc_gray_profile(description: str, gamma: float = 1.0) -> bytes:
  """A minimal ICC v2 grey display profile (one ``kTRC`` gamma curve)."""
  curve = struct.pack(">IH", 1, int(round(gamma * 256)))
  return _icc_profile(description, b"GRAY", [(b"kTRC", _icc_tag(b"curv",
                                                                  curve))])


def icc_matrix_profile(description: str,
                       colorants=ADOBE_RGB_COLORANTS,
                       gamma: float = ADOBE_RGB_GAMMA) -> bytes:
  """A minimal ICC v2 RGB display profile: a matrix and one gamma curve.

  Written from the ICC.1 specification (header, tag table, ``desc``,
  ``wtpt``, ``rXYZ``/``gXYZ``/``bXYZ`` and ``rTRC``/``gTRC``/``bTRC``), so
  tests need no profile file; by default Adobe RGB (1998).

  Args:
    description: the profile's name (what ``getProfileDescription`` says).
    colorants: D50-adapted XYZ of the red, green and blue primaries.
    gamma: exponent of the tone curve of every channel.
  """
  curve = struct.pack(">IH", 1, int(round(gamma * 256)))
  tags = []
  for sig, xyz in zip((b"rXYZ", b"gXYZ", b"bXYZ"), colorants):
    tags.append((sig, _icc_tag(b"XYZ ", b"".join(map(_s15fixed16, xyz)))))
  for sig in (b"rTRC", b"gTRC", b"bTRC"):
    tags.append((sig, _icc_tag(b"curv", curve)))
  return _icc_profile(description, b"RGB ", tags)


def adobe_rgb_to_srgb(rgb) -> np.ndarray:
  """Adobe RGB (1998) 8-bit values -> sRGB 8-bit, clipped, from the specs.

  An independent reference for Little CMS: Adobe RGB's own D65 matrix and
  gamma, sRGB's (IEC 61966-2-1) inverse matrix and transfer function.
  """
  to_xyz = np.array([[0.57667, 0.18556, 0.18823],
                     [0.29734, 0.62736, 0.07529],
                     [0.02703, 0.07069, 0.99134]])
  to_srgb = np.array([[3.2406, -1.5372, -0.4986],
                      [-0.9689, 1.8758, 0.0415],
                      [0.0557, -0.2040, 1.0570]])
  linear = (np.asarray(rgb, np.float64) / 255) ** ADOBE_RGB_GAMMA
  srgb = np.clip(linear @ (to_srgb @ to_xyz).T, 0, 1)
  encoded = np.where(srgb <= 0.0031308, 12.92 * srgb,
                     1.055 * srgb ** (1 / 2.4) - 0.055)
  return np.rint(encoded * 255).astype(int)


# --- camera raws ------------------------------------------------------------

def camera_raw_tiff(make: str = "NIKON CORPORATION",
                    preview_size: Tuple[int, int] = (256, 171),
                    sensor_size: Tuple[int, int] = (1024, 684),
                    *, dng: bool = False, reduced: bool = True,
                    sub_ifds: bool = True, cr2: bool = False,
                    magic: Optional[bytes] = None, photometric: int = 2,
                    extra_tags: Sequence[Tuple[int, int, object]] = ()
                    ) -> bytes:
  """A small TIFF laid out like a camera raw, written with Pillow's IFDs.

  The first image directory holds an RGB preview (red); with ``sub_ifds``
  its SubIFDs tag points at a second directory holding the "photo": 16-bit
  colour-filter-array samples of ``sensor_size``, as DNG and NEF store it.

  Args:
    make: the Make tag (empty: none).
    preview_size: size of the first image.
    sensor_size: size of the sub-image.
    dng: adds DNGVersion 1.4.0.0.
    reduced: marks the first image reduced-resolution (NewSubfileType 1).
    sub_ifds: adds the sub-image and the SubIFDs tag.
    cr2: Canon's 16-byte header (``CR`` at offset 8).
    magic: replaces the first four bytes (ORF's ``IIRO``, RW2's ``IIU``).
    photometric: of the first image (32803: a raw mosaic, as in PEF files).
    extra_tags: (tag, TIFF type, value) added to the first directory.
  """
  from PIL import TiffImagePlugin  # pylint: disable=import-outside-toplevel
  header_size = 16 if cr2 else 8
  w, h = preview_size
  preview = bytes([200, 30, 30]) * (w * h)
  sw, sh = sensor_size
  sensor = np.full((sh, sw), 2000, "<u2").tobytes()

  def directory(values):
    ifd = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"II")
    for tag, typ, value in values:
      ifd[tag] = value
      ifd.tagtype[tag] = typ
    return ifd

  def first(sub_offset):
    values = [(254, 4, 1 if reduced else 0), (256, 4, w), (257, 4, h),
              (258, 3, (8, 8, 8)), (259, 3, 1), (262, 3, photometric),
              (273, 4, 0),
              (277, 3, 3), (278, 4, h), (279, 4, len(preview))]
    if make:
      values.append((271, 2, make))
    if sub_ifds:
      values.append((330, 4, sub_offset))
    if dng:
      values.append((50706, 1, b"\x01\x04\x00\x00"))
    return directory(values + list(extra_tags))

  size0 = len(first(0).tobytes(header_size))
  sub_offset = header_size + size0 + len(preview)
  ifd0 = first(sub_offset).tobytes(header_size)
  out = b"II*\x00" + struct.pack("<I", header_size)
  if cr2:
    out += b"CR\x02\x00" + struct.pack("<I", sub_offset if sub_ifds else 0)
  out += ifd0 + preview
  if sub_ifds:
    sub = directory([(254, 4, 0), (256, 4, sw), (257, 4, sh), (258, 3, 16),
                     (259, 3, 1), (262, 3, 32803), (273, 4, 0), (277, 3, 1),
                     (278, 4, sh), (279, 4, len(sensor))])
    out += sub.tobytes(sub_offset) + sensor
  if magic is not None:
    out = magic + out[len(magic):]
  return out


def _corrupt_idat(png: bytes) -> bytes:
  """Flips bytes inside the first IDAT's deflate stream, with a valid CRC."""
  out = bytearray()
  out += png[:8]
  done = False
  for _, kind, payload in _png_chunks(png):
    if kind == b"IDAT" and not done:
      bad = bytearray(payload)
      for i in range(len(bad) // 3, len(bad) // 3 + 32):
        bad[i] ^= 0xFF
      payload, done = bytes(bad), True
    out += _chunk(kind, payload)
  return bytes(out)


def _corrupt_ihdr_crc(png: bytes) -> bytes:
  bad = bytearray(png)
  bad[29] ^= 0xFF  # last byte of the IHDR CRC
  return bytes(bad)


def _gif(frames: Sequence[Tuple[int, int, int]], size=(120, 80)) -> bytes:
  images = [Image.new("RGB", size, c).convert("P") for c in frames]
  return encode(images[0], "GIF", save_all=True, append_images=images[1:],
                 duration=100, loop=0)


def _tiff_pages(pages: Sequence[Image.Image]) -> bytes:
  return encode(pages[0], "TIFF", save_all=True, append_images=list(pages[1:]))


def strip_image(width: int, height: int, seed: int = 0) -> Image.Image:
  """A seeded RGB image whose red channel ramps along the long side."""
  rng = np.random.default_rng(seed)
  ramp = np.linspace(0, 255, max(width, height))
  arr = np.empty((height, width, 3), np.uint8)
  along = ramp[:width][None, :] if width >= height else ramp[:height][:, None]
  arr[..., 0] = along
  arr[..., 1] = 255 - along
  arr[..., 2] = rng.integers(0, 256, (height, width))
  return Image.fromarray(arr, "RGB")


def _items(rng: np.random.Generator) -> List[Tuple[CorpusItem, bytes]]:
  astronaut = load_photo("astronaut.png", 1)
  coffee = load_photo("coffee.png", 2)
  chelsea = load_photo("chelsea.png", 3)
  rocket = load_photo("rocket.jpg", 4)
  flower = load_photo("flower.jpg", 5)
  china = load_photo("china.jpg", 6)
  camera = load_photo("camera.png", 7).convert("L")
  out: List[Tuple[CorpusItem, bytes]] = []

  def valid(filename, data, description, size=None, pixels=()):
    out.append((CorpusItem(filename, VALID, None, description, size,
                           tuple(pixels)), data))

  def broken(filename, data, description, stage="decode"):
    out.append((CorpusItem(filename, BROKEN, stage, description), data))

  # --- JPEG variants ------------------------------------------------------
  valid("astronaut.jpg", encode(astronaut, "JPEG", quality=90),
        "baseline JPEG photo", astronaut.size)
  progressive = encode(coffee, "JPEG", quality=90, progressive=True)
  valid("progressive.jpg", progressive, "progressive JPEG", coffee.size)
  valid("cmyk.jpg", encode(chelsea.convert("CMYK"), "JPEG", quality=95),
        "CMYK JPEG with an Adobe marker (inverted CMYK)", chelsea.size)
  valid("gray.jpg", encode(camera, "JPEG", quality=90),
        "greyscale (one channel) JPEG", camera.size)
  card = quadrant_card()
  for orientation in (3, 5, 6, 8):
    upright = QUADRANT_SIZE
    valid(f"exif_orientation_{orientation}.jpg",
          _exif_jpeg(card, orientation),
          f"quadrant card stored turned, EXIF orientation {orientation}",
          upright, quadrant_pixels(upright))
  big_card = quadrant_card((4032, 3024))
  valid("exif_orientation_6_big.jpg", _exif_jpeg(big_card, 6),
        "12 MP card stored as 3024x4032 with EXIF orientation 6: draft and "
        "rotation together", (4032, 3024), quadrant_pixels((4032, 3024)))
  big = china.resize((4032, 3024), Image.Resampling.BICUBIC)
  valid("big_4032x3024.jpg", encode(big, "JPEG", quality=90),
        "12 MP JPEG (real photo upscaled), for DCT-domain drafting",
        (4032, 3024))
  medium = flower.resize((2048, 1536), Image.Resampling.BICUBIC)
  valid("medium_2048x1536.jpg", encode(medium, "JPEG", quality=90),
        "3 MP JPEG (real photo upscaled)", (2048, 1536))
  valid("fleur d'été 1.jpg", encode(flower, "JPEG", quality=90),
        "spaces, an apostrophe and accents in the name", flower.size)
  valid("noextension", encode(rocket, "JPEG", quality=90),
        "JPEG without a file extension", rocket.size)

  # --- PNG variants -------------------------------------------------------
  valid("champignon ñ.png", encode(coffee, "PNG"),
        "non-ASCII name, RGB PNG", coffee.size)
  valid("png_named.jpg", encode(chelsea, "PNG"),
        "a PNG saved with a .jpg extension", chelsea.size)
  valid("gray.png", encode(camera, "PNG"), "greyscale PNG", camera.size)
  bands = np.zeros((32, 64), np.uint16)
  for i, value in enumerate((0, 32768, 65535, 0x1234)):
    bands[:, i * 16:(i + 1) * 16] = value
  valid("gray16.png", encode(Image.fromarray(bands), "PNG"),
        "16-bit greyscale PNG, bands of 0, 32768, 65535 and 0x1234", (64, 32),
        [((8, 16), (0,) * 3), ((24, 16), (128,) * 3), ((40, 16), (255,) * 3),
         ((56, 16), (18,) * 3)])
  rgb16 = [struct.pack(">" + "H" * 3 * 8,
                       *([65535, 32768, 0] * 4 + [0, 65535, 32768] * 4))] * 8
  valid("rgb16.png", png_bytes(8, 8, 16, 2, rgb16),
        "16-bit RGB PNG written by hand", (8, 8),
        [((1, 1), (255, 128, 0)), ((6, 6), (0, 255, 128))])
  pal = Image.new("P", (64, 32), 0)
  pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
  pal.paste(1, (0, 0, 32, 32))
  valid("palette_transparent.png", encode(pal, "PNG", transparency=0),
        "palette PNG, left half red, right half transparent (black under it)",
        (64, 32), [((8, 16), RED), ((56, 16), WHITE)])
  la = np.zeros((32, 64, 2), np.uint8)
  la[:, 32:, 1] = 255
  valid("la.png", encode(Image.fromarray(la, "LA"), "PNG"),
        "grey + alpha PNG: black, transparent on the left half", (64, 32),
        [((8, 16), WHITE), ((56, 16), BLACK)])
  rgba = np.zeros((32, 64, 4), np.uint8)
  rgba[..., 2] = 255
  rgba[:, 32:, 3] = 255
  rgba[:, 16:32, 3] = 128
  valid("rgba.png", encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "RGBA PNG: blue, transparent / half / opaque", (64, 32),
        [((8, 16), WHITE), ((24, 16), (127, 127, 255)), ((56, 16), BLUE)])
  bilevel = Image.fromarray(
      (np.indices((40, 60)).sum(axis=0) // 10 % 2).astype(bool))
  valid("bilevel.png", encode(bilevel, "PNG"), "1-bit PNG", (60, 40),
        [((0, 0), BLACK), ((15, 0), WHITE)])
  valid("one_pixel.png", encode(Image.new("RGB", (1, 1), (10, 200, 30)),
                                 "PNG"),
        "a 1x1 image", (1, 1), [((0, 0), (10, 200, 30))])
  valid("wide_12000x6.png", encode(strip_image(12000, 6, 8), "PNG"),
        "extreme aspect ratio, 12000x6", (12000, 6))
  valid("tall_6x12000.png", encode(strip_image(6, 12000, 9), "PNG"),
        "extreme aspect ratio, 6x12000", (6, 12000))

  # --- other containers ---------------------------------------------------
  webp = np.zeros((32, 64, 4), np.uint8)
  webp[..., 0] = 255
  webp[:, 32:, 3] = 255
  valid("alpha.webp", encode(Image.fromarray(webp, "RGBA"), "WEBP",
                              lossless=True),
        "lossless WebP with alpha: red, left half transparent", (64, 32),
        [((8, 16), WHITE), ((56, 16), RED)])
  valid("lossy.webp", encode(rocket, "WEBP", quality=80), "lossy RGB WebP",
        rocket.size)
  valid("animated.gif", _gif([RED, GREEN, BLUE]),
        "animated GIF (red, green, blue frames): the first frame counts",
        (120, 80), [((60, 40), RED)])
  valid("static.gif", encode(chelsea.convert("P"), "GIF"),
        "single-frame palette GIF", chelsea.size)
  valid("multipage.tif", _tiff_pages([Image.new("RGB", (200, 100), RED),
                                      Image.new("RGB", (300, 300), GREEN)]),
        "two-page TIFF (red 200x100, green 300x300): the first page counts",
        (200, 100), [((100, 50), RED)])
  valid("lzw.tif", encode(astronaut, "TIFF", compression="tiff_lzw"),
        "LZW-compressed RGB TIFF", astronaut.size)
  ramp = np.tile(np.array([0.0, 0.25, 0.5, 1.0], np.float32).repeat(8),
                 (16, 1))
  valid("float.tif", encode(Image.fromarray(ramp, "F"), "TIFF"),
        "32-bit float greyscale TIFF with values in [0, 1]", (32, 16),
        [((4, 8), (0,) * 3), ((12, 8), (64,) * 3), ((20, 8), (128,) * 3),
         ((28, 8), (255,) * 3)])
  valid("photo.bmp", encode(chelsea, "BMP"), "uncompressed BMP",
        chelsea.size)

  # --- transparency in every mode (composited onto white) -----------------
  # A picture with a transparent 8-pixel border, as 8-bit and 16-bit grey:
  # the 16-bit key (1000) is matched at 16 bits, so the band of 1001 (also
  # 4 at 8 bits) stays opaque.
  framed8 = np.full((32, 64), 156, np.uint8)
  framed8[:8], framed8[-8:], framed8[:, :8], framed8[:, -8:] = 7, 7, 7, 7
  border = [((2, 2), WHITE), ((60, 16), WHITE), ((32, 16), (156,) * 3)]
  valid("gray8_transparent.png",
        encode(Image.fromarray(framed8, "L"), "PNG", transparency=7),
        "8-bit grey PNG with a colour key (tRNS) on its dark border",
        (64, 32), border)
  framed16 = np.full((32, 64), 40092, np.uint16)  # 156 at 8 bits
  framed16[:8], framed16[-8:], framed16[:, :8], framed16[:, -8:] = (
      1000, 1000, 1000, 1000)
  framed16[14:18, 20:28] = 1001
  valid("gray16_transparent.png",
        encode(Image.fromarray(framed16), "PNG", transparency=1000),
        "16-bit grey PNG (Pillow mode I;16) with a 16-bit colour key on its "
        "border and a band one level above the key", (64, 32),
        border + [((24, 16), (4,) * 3)])
  for bits, key, other in ((2, 1, 2), (4, 5, 6)):
    top = (1 << bits) - 1
    values = [0] * 4 + [other] * 4 + [key] * 8
    packed = int("".join(format(v, f"0{bits}b") for v in values), 2)
    row = packed.to_bytes(16 * bits // 8, "big")
    valid(f"gray{bits}_transparent.png",
          png_with_chunks(png_bytes(16, 4, bits, 0, [row] * 4),
                          [(b"tRNS", struct.pack(">H", key))]),
          f"{bits}-bit grey PNG whose key ({key}, {key * 255 // top} at 8 "
          f"bits) is in {bits}-bit units", (16, 4),
          [((1, 1), BLACK), ((5, 1), (other * 255 // top,) * 3),
           ((12, 1), WHITE)])
  bits1 = np.zeros((32, 64), bool)
  bits1[:, :32] = True
  valid("bilevel_transparent.png",
        encode(Image.fromarray(bits1), "PNG", transparency=0),
        "1-bit PNG, white left, black right made transparent by tRNS",
        (64, 32), [((8, 16), WHITE), ((56, 16), WHITE)])
  rgb_key = np.zeros((32, 64, 3), np.uint8)
  rgb_key[:, :32] = (200, 120, 40)
  valid("rgb_transparent.png",
        encode(Image.fromarray(rgb_key, "RGB"), "PNG", transparency=(0, 0, 0)),
        "8-bit RGB PNG, orange left, black right made transparent by tRNS",
        (64, 32), [((8, 16), (200, 120, 40)), ((56, 16), WHITE)])
  keyed = struct.pack(">3H", 0x1234, 0x5678, 0x9ABC)
  near = struct.pack(">3H", 0x1200, 0x5600, 0x9A00)  # same high bytes
  valid("rgb16_transparent.png",
        png_with_chunks(png_bytes(8, 8, 16, 2, [near * 4 + keyed * 4] * 8),
                        [(b"tRNS", keyed)]),
        "16-bit RGB PNG with a 16-bit key; the left half differs from the "
        "key only in the low bytes and stays opaque", (8, 8),
        [((1, 4), (0x12, 0x56, 0x9A)), ((6, 4), WHITE)])
  ga16 = [struct.pack(">4H", 0, 65535, 0, 65535) +
          struct.pack(">4H", 0, 0, 0, 0)] * 4
  valid("gray_alpha16.png", png_bytes(4, 4, 16, 4, ga16),
        "16-bit grey + alpha PNG: black, right half transparent", (4, 4),
        [((0, 1), BLACK), ((3, 1), WHITE)])
  rgba16 = [struct.pack(">8H", 0, 0, 65535, 65535, 0, 0, 65535, 65535) +
            struct.pack(">8H", 0, 0, 65535, 0, 0, 0, 65535, 0)] * 4
  valid("rgba16.png", png_bytes(4, 4, 16, 6, rgba16),
        "16-bit RGBA PNG: blue, right half transparent", (4, 4),
        [((0, 1), BLUE), ((3, 1), WHITE)])
  pa = Image.new("PA", (64, 32), (1, 255))
  pa.putpalette([0, 0, 0, 0, 160, 60] + [0] * 762)
  pa.paste((1, 0), (32, 0, 64, 32))
  valid("palette_alpha.tif", encode(pa, "TIFF"),
        "palette + alpha TIFF (Pillow mode PA): green, right half "
        "transparent", (64, 32), [((8, 16), (0, 160, 60)), ((56, 16), WHITE)])
  gif = Image.new("P", (64, 32), 0)
  gif.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
  gif.paste(1, (0, 0, 32, 32))
  valid("transparent.gif", encode(gif, "GIF", transparency=0),
        "GIF, red left, transparent index (black) right", (64, 32),
        [((8, 16), RED), ((56, 16), WHITE)])

  # --- colour spaces without transparency ---------------------------------
  lab = Image.new("LAB", (64, 32), (255, 128, 128))  # a, b offset by 128
  lab.paste((0, 128, 128), (32, 0, 64, 32))
  valid("lab.tif", encode(lab, "TIFF"),
        "CIELab TIFF (Pillow mode LAB): white left, black right", (64, 32),
        [((8, 16), WHITE), ((56, 16), BLACK)])
  cmyk = Image.new("CMYK", (64, 32), (0, 0, 0, 0))
  cmyk.paste((255, 0, 0, 0), (32, 0, 64, 32))
  valid("cmyk.tif", encode(cmyk, "TIFF"),
        "CMYK TIFF: white left, cyan right", (64, 32),
        [((8, 16), WHITE), ((56, 16), (0, 255, 255))])
  be16 = Image.fromarray(np.repeat([[0, 65535]], 16, 0).repeat(32, 1)
                         .astype(">u2"), "I;16B")
  valid("gray16_big_endian.tif", encode(be16, "TIFF"),
        "big-endian 16-bit grey TIFF (Pillow mode I;16B): black, white",
        (64, 16), [((8, 8), BLACK), ((56, 8), WHITE)])
  i32 = Image.fromarray(np.repeat([[0, 32768]], 16, 0).repeat(32, 1)
                        .astype(np.int32), "I")
  valid("int32.tif", encode(i32, "TIFF"),
        "32-bit integer grey TIFF (Pillow mode I), read as 16-bit samples",
        (64, 16), [((8, 8), BLACK), ((56, 8), (128,) * 3)])
  icc = icc_matrix_profile("natvision test Adobe RGB (1998)")
  adobe = np.zeros((32, 64, 3), np.uint8)
  adobe[:, :32] = (100, 200, 100)
  adobe[:, 32:] = (200, 60, 60)
  valid("adobe_rgb.png",
        encode(Image.fromarray(adobe, "RGB"), "PNG", icc_profile=icc),
        "RGB PNG with an embedded Adobe RGB (1998) profile: by default the "
        "values are taken as they are", (64, 32),
        [((8, 16), (100, 200, 100)), ((56, 16), (200, 60, 60))])
  valid("nikon_tiff_mode.tif",
        camera_raw_tiff(reduced=False, sub_ifds=False),
        "a camera's own TIFF (Make NIKON, full-size first image, no raw "
        "tags): a photo, not a raw", (256, 171), [((8, 8), (200, 30, 30))])

  # --- broken -------------------------------------------------------------
  broken("empty.jpg", b"", "zero bytes")
  jpeg = encode(rocket, "JPEG", quality=90)
  broken("truncated.jpg", jpeg[:int(len(jpeg) * 0.6)],
         "first 60% of a baseline JPEG")
  broken("truncated_progressive.jpg", progressive[:int(len(progressive) * 0.6)],
         "first 60% of a progressive JPEG")
  broken("header_only.jpg", jpeg[:300], "a JPEG cut inside its headers")
  png = encode(coffee, "PNG")
  broken("truncated.png", png[:int(len(png) * 0.6)], "first 60% of a PNG")
  broken("corrupt_idat.png", _corrupt_idat(png),
         "PNG whose compressed pixel data has flipped bytes (CRC recomputed)")
  broken("corrupt_crc.png", _corrupt_ihdr_crc(png),
         "PNG whose header chunk fails its CRC")
  broken("random.jpg", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
         "random bytes named .jpg")
  broken("page.jpg",
         b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>"
         b"<body><h1>Forbidden</h1></body></html>\n",
         "an HTML error page saved as .jpg")
  broken("notes.png", "Photo removed at the observer's request.\n".encode(),
         "plain text named .png")
  broken("fake.heic",
         b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" +
         rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(),
         "an ISO BMFF 'ftypheic' header followed by junk (iPhone HEIC)")
  broken("drawing.svg",
         b'<?xml version="1.0" encoding="UTF-8"?>\n'
         b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
         b'<circle cx="50" cy="50" r="40" fill="green"/></svg>\n',
         "an SVG drawing")
  broken("document.jpg",
         b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
         "the start of a PDF named .jpg")
  broken("bomb_30000x30000.png", png_bytes(30000, 30000, 1, 0,
                                           row=bytes(3750)),
         "1-bit PNG declaring 30000x30000 (900 MP) in ~110 KB: a "
         "decompression bomb beyond Pillow's own limit")
  broken("bomb_15000x10000.png", png_bytes(15000, 10000, 1, 0,
                                           row=bytes(1875)),
         "1-bit PNG declaring 15000x10000 (150 MP): over the default "
         "--max_pixels, under Pillow's own limit")
  # Camera raws: Pillow would return their 256x171 preview (or fail).
  broken("raw.dng", camera_raw_tiff(dng=True),
         "DNG: a 256x171 preview first, the photo in a SubIFD")
  broken("raw.nef", camera_raw_tiff("NIKON CORPORATION"),
         "NEF: a reduced-resolution preview first, the photo in a SubIFD")
  broken("raw.arw", camera_raw_tiff("SONY", reduced=False, extra_tags=[
      (50740, 1, b"SONY DSC \x00")]),
         "ARW: a preview first (not marked reduced), Sony's private data")
  broken("raw.pef", camera_raw_tiff("PENTAX Corporation", reduced=False,
                                    sub_ifds=False, extra_tags=[
                                        (50740, 1, b"PENTAX \x00")]),
         "PEF: a preview first, Pentax's DNGPrivateData, no SubIFDs")
  broken("raw.cr2", camera_raw_tiff("Canon", reduced=False, cr2=True),
         "CR2: a TIFF with Canon's CR marker at offset 8")
  broken("raw.orf", camera_raw_tiff("OLYMPUS IMAGING CORP.", magic=b"IIRO"),
         "ORF: Olympus's IIRO magic instead of TIFF's")
  broken("raw.rw2", camera_raw_tiff("Panasonic", magic=b"IIU\x00"),
         "RW2: Panasonic's IIU magic instead of TIFF's")
  broken("raw_named.nef", camera_raw_tiff("NIKON", reduced=False,
                                          sub_ifds=False),
         "a TIFF with no raw tags, but named .nef")
  return out


def write_corpus(directory: str) -> List[CorpusItem]:
  """Writes the corpus into ``directory`` (created if needed).

  Returns:
    One CorpusItem per file written, valid ones first.
  """
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(20240601)
  items = []
  for item, data in _items(rng):
    with open(os.path.join(directory, item.filename), "wb") as f:
      f.write(data)
    items.append(item)
  return items


def by_name(items: Sequence[CorpusItem]) -> Dict[str, CorpusItem]:
  return {item.filename: item for item in items}


if __name__ == "__main__":
  import sys  # pylint: disable=import-outside-toplevel
  for written in write_corpus(sys.argv[1] if len(sys.argv) > 1 else "corpus"):
    print(f"{written.kind:6} {written.filename!r}: {written.description}")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """The corpus written once per test module: (folder, its CorpusItems)."""
  directory = str(tmp_path_factory.mktemp("corpus"))
  return directory, write_corpus(directory)


def read(written, name: str) -> bytes:  # pylint: disable=redefined-outer-name
  """The bytes of one corpus file of the ``written`` fixture."""
  directory, _ = written
  with open(os.path.join(directory, name), "rb") as f:
    return f.read()
