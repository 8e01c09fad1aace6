"""Benchmark photos: real photo content at camera sizes, made deterministically.

No photo collection can be downloaded here, so the benchmark makes its own
from the photographs that ship inside registry packages (scikit-learn's
``flower.jpg`` and ``china.jpg``; scikit-image's astronaut, coffee, chelsea,
rocket, retina, Hubble deep field, motorcycle and immunohistochemistry
images, and its grass and gravel textures tinted green and brown).  Photo
``i`` of a set is a random 4:3 crop of one source (55-100% of the largest
such crop), scaled to the camera size with a bicubic filter, maybe mirrored,
with a per-channel gain and offset (white balance, exposure) and a sensor
grain (a seeded noise field at a random offset), saved as a JPEG of quality
90 with 4:2:0 chroma subsampling, like a camera's.  The grain matters: an
upscaled photo without it is smooth, and a smooth JPEG is smaller and
decodes faster than a real photo of the same size.

The same ``(seed, index, size)`` always gives the same bytes.  Photos are
cached under ``benchmarks/work/photos/<version>-<W>x<H>/`` and sets of the
first ``n`` photos are folders of symbolic links, so that the job reads a
set with a plain glob.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

GENERATOR_VERSION = "v1"
DEFAULT_SEED = 20240601
JPEG_QUALITY = 90
WORK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "work")

Size = Tuple[int, int]

# (package, path inside the package, tint for greyscale textures or None)
SOURCES = (
    ("sklearn", "datasets/images/flower.jpg", None),
    ("sklearn", "datasets/images/china.jpg", None),
    ("skimage", "data/astronaut.png", None),
    ("skimage", "data/coffee.png", None),
    ("skimage", "data/chelsea.png", None),
    ("skimage", "data/rocket.jpg", None),
    ("skimage", "data/retina.jpg", None),
    ("skimage", "data/hubble_deep_field.jpg", None),
    ("skimage", "data/motorcycle_left.png", None),
    ("skimage", "data/ihc.png", None),
    ("skimage", "data/grass.png", (0.55, 0.85, 0.35)),
    ("skimage", "data/gravel.png", (0.80, 0.65, 0.50)),
)

_GRAIN_MARGIN = 97
_GRAIN_SIGMA = 4.0


def parse_size(text: str) -> Size:
  """``"2048x1536"`` -> ``(2048, 1536)``.

  Raises:
    ValueError: not WIDTHxHEIGHT with positive integers.
  """
  try:
    width, height = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise ValueError(f"photo size must be WIDTHxHEIGHT, e.g. 2048x1536, "
                     f"not {text!r}") from None
  if width < 1 or height < 1:
    raise ValueError(f"photo size must be positive, not {text!r}")
  return width, height


def size_name(size: Size) -> str:
  return f"{size[0]}x{size[1]}"


def source_paths() -> List[str]:
  """Paths of the source photos inside the installed packages."""
  import importlib  # pylint: disable=import-outside-toplevel
  paths = []
  for package, rel, _ in SOURCES:
    root = os.path.dirname(importlib.import_module(package).__file__)
    paths.append(os.path.join(root, rel))
  return paths


@functools.lru_cache(maxsize=None)
def _sources() -> Tuple[Image.Image, ...]:
  images = []
  for path, (_, _, tint) in zip(source_paths(), SOURCES):
    with Image.open(path) as img:
      if tint is None:
        images.append(img.convert("RGB"))
      else:
        gray = np.asarray(img.convert("L"), np.float32)
        rgb = gray[..., None] * np.asarray(tint, np.float32)
        images.append(Image.fromarray(
            np.clip(rgb + 20, 0, 255).astype(np.uint8), "RGB"))
  return tuple(images)


@functools.lru_cache(maxsize=4)
def _grain(size: Size, seed: int) -> np.ndarray:
  width, height = size
  rng = np.random.default_rng([seed, width, height, 1])
  field = rng.normal(0.0, _GRAIN_SIGMA,
                     (height + _GRAIN_MARGIN, width + _GRAIN_MARGIN, 3))
  return field.astype(np.float32)


def make_photo(index: int, size: Size, seed: int = DEFAULT_SEED) -> Image.Image:
  """Photo ``index`` of the set ``(size, seed)``, as an RGB image."""
  width, height = size
  rng = np.random.default_rng([seed, index, width, height])
  sources = _sources()
  src = sources[index % len(sources)]
  aspect = width / height
  crop_w = min(src.width, src.height * aspect) * rng.uniform(0.55, 1.0)
  crop_h = crop_w / aspect
  left = rng.uniform(0, src.width - crop_w)
  top = rng.uniform(0, src.height - crop_h)
  img = src.resize(size, Image.Resampling.BICUBIC,
                   box=(left, top, left + crop_w, top + crop_h))
  if rng.random() < 0.5:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  gain = rng.uniform(0.85, 1.15, 3).astype(np.float32)
  offset = np.float32(rng.uniform(-12, 12))
  dy, dx = rng.integers(0, _GRAIN_MARGIN, 2)
  grain = _grain(size, seed)[dy:dy + height, dx:dx + width]
  pixels = np.asarray(img, np.float32) * gain
  pixels += grain
  pixels += offset
  np.clip(pixels, 0, 255, out=pixels)
  return Image.fromarray(pixels.astype(np.uint8), "RGB")


def photo_dir(size: Size, seed: int = DEFAULT_SEED,
              work_dir: str = WORK_DIR) -> str:
  name = f"{GENERATOR_VERSION}-{size_name(size)}"
  if seed != DEFAULT_SEED:
    name += f"-seed{seed}"
  return os.path.join(work_dir, "photos", name)


def photo_path(index: int, size: Size, seed: int = DEFAULT_SEED,
               work_dir: str = WORK_DIR) -> str:
  return os.path.join(photo_dir(size, seed, work_dir), f"photo_{index:05d}.jpg")


def write_photo(index: int, size: Size, seed: int = DEFAULT_SEED,
                work_dir: str = WORK_DIR) -> str:
  """Writes photo ``index`` unless it is there; returns its path."""
  path = photo_path(index, size, seed, work_dir)
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  make_photo(index, size, seed).save(tmp, "JPEG", quality=JPEG_QUALITY,
                                     subsampling="4:2:0")
  os.replace(tmp, path)
  return path


def _write_one(args) -> str:
  return write_photo(*args)


def ensure_photos(count: int, size: Size, seed: int = DEFAULT_SEED,
                  work_dir: str = WORK_DIR,
                  processes: Optional[int] = None) -> List[str]:
  """Makes sure photos ``0..count-1`` exist; returns their paths.

  Missing photos are written by ``processes`` worker processes (all cores
  by default); the bytes do not depend on the number of processes.
  """
  missing = [i for i in range(count)
             if not os.path.exists(photo_path(i, size, seed, work_dir))]
  if missing:
    processes = processes or os.cpu_count() or 1
    jobs = [(i, size, seed, work_dir) for i in missing]
    if processes > 1 and len(missing) > 8:
      with multiprocessing.get_context("fork").Pool(processes) as pool:
        for _ in pool.imap_unordered(_write_one, jobs, chunksize=4):
          pass
    else:
      for job in jobs:
        _write_one(job)
  return [photo_path(i, size, seed, work_dir) for i in range(count)]


def photo_set(count: int, size: Size, seed: int = DEFAULT_SEED,
              work_dir: str = WORK_DIR) -> str:
  """A folder holding links to photos ``0..count-1``; read it with ``*.jpg``.

  Returns:
    The folder path.
  """
  paths = ensure_photos(count, size, seed, work_dir)
  name = f"{GENERATOR_VERSION}-{size_name(size)}-n{count}"
  if seed != DEFAULT_SEED:
    name += f"-seed{seed}"
  folder = os.path.join(work_dir, "sets", name)
  os.makedirs(folder, exist_ok=True)
  for path in paths:
    link = os.path.join(folder, os.path.basename(path))
    if not os.path.lexists(link):
      os.symlink(os.path.relpath(path, folder), link)
  return folder


def set_stats(paths: Sequence[str]) -> dict:
  """Count and mean file size of a set of photos."""
  sizes = [os.path.getsize(p) for p in paths]
  return {"count": len(sizes),
          "mean_bytes": int(sum(sizes) / len(sizes)) if sizes else 0}
