"""Preparation: an upright RGB photo -> the square uint8 array a model takes.

Two policies (``RESIZE_POLICIES``); the model registry
(``transforms.models``) names one per model and ``--resize`` may override it:

* ``squash``: the whole photo resized to ``size x size``; the aspect ratio is
  not kept.
* ``center_crop``: the photo scaled so that its short side becomes
  ``ceil(size / 0.875)`` (342 for 299), then the centre ``size x size`` cut
  out, as iNaturalist's vision service prepares photos.

Neither builds the scaled photo: the crop is worked out in the photo's own
(float) coordinates and resampling reads only that region, which gives the
same pixels as scaling then cropping.  Memory follows the source region and
the output, so a 12000x6 strip costs less than a square photo, where scaling
its short side to 342 first would build a 684000x342 intermediate.

Filter: exact area averaging when the region is reduced on both axes, as
TensorFlow's ``area`` method computes it and iNaturalist's service uses:
each output pixel is the mean of the source rectangle it covers, a source
pixel cut by the rectangle's edge counting for the part covered.  Pillow's
``BOX`` filter is not that: it gives each source pixel wholly to one output
pixel, which at the 1x-2.5x reductions that follow a JPEG draft moves edges
by up to a pixel (on the test photos, 1.7-3.3 levels mean and up to 69
levels from TensorFlow's ``area``; this implementation is within 1 level).
It is done in numpy, reading the photo in strips.  When the region is
enlarged on either axis, area averaging degenerates into nearest-neighbour
blocks, so Pillow's bilinear filter is used instead; it matches
TensorFlow's ``bilinear`` (with ``antialias=True`` when the other axis is
reduced) within 1 level.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

# The preparation policies, by the names the model registry and --resize use.
RESIZE_SQUASH = "squash"
RESIZE_CENTER_CROP = "center_crop"
RESIZE_POLICIES = (RESIZE_SQUASH, RESIZE_CENTER_CROP)

CENTER_CROP_FRACTION = 0.875


def _check(policy: str, size: int) -> None:
  if policy not in RESIZE_POLICIES:
    raise ValueError(
        f"unknown preparation policy {policy!r}; expected one of "
        f"{', '.join(RESIZE_POLICIES)}")
  if not isinstance(size, int) or size <= 0:
    raise ValueError(f"size must be a positive integer, not {size!r}")


def short_side_needed(policy: str, size: int = 299) -> int:
  """The short side a photo needs so that ``policy`` never enlarges it."""
  _check(policy, size)
  if policy == RESIZE_CENTER_CROP:
    return math.ceil(size / CENTER_CROP_FRACTION)
  return size


def resized_size(width: int, height: int, policy: str,
                 size: int = 299) -> Tuple[int, int]:
  """The (width, height) the whole photo is notionally resized to.

  ``squash``: ``(size, size)``.  ``center_crop``: the short side becomes
  ``ceil(size / 0.875)`` (342 for 299) and the long side keeps the aspect
  ratio, rounded to whole pixels.
  """
  _check(policy, size)
  if policy == RESIZE_SQUASH:
    return size, size
  short = short_side_needed(policy, size)
  if width <= height:
    return short, max(short, math.floor(height * short / width + 0.5))
  return max(short, math.floor(width * short / height + 0.5)), short


def source_box(width: int, height: int, policy: str,
               size: int = 299) -> Tuple[float, float, float, float]:
  """The region of a ``width x height`` photo that becomes the output.

  For ``center_crop`` this is the part of the photo that survives resizing
  it to ``resized_size`` and cutting the centre ``size x size`` at whole-pixel
  offsets ``(resized - size) // 2``, so that resampling just this box gives
  the same pixels as resizing the whole photo and cropping, without the
  intermediate.

  Returns:
    ``(left, top, right, bottom)`` in source pixels, floats; the whole photo
    for ``squash``.
  """
  if policy == RESIZE_SQUASH:
    _check(policy, size)
    return 0.0, 0.0, float(width), float(height)
  resized_w, resized_h = resized_size(width, height, policy, size)
  scale_x, scale_y = width / resized_w, height / resized_h
  left, top = (resized_w - size) // 2, (resized_h - size) // 2
  return (left * scale_x, top * scale_y, (left + size) * scale_x,
          (top + size) * scale_y)


# Largest uint8 strip of the photo that area averaging copies out of PIL at
# once; big photos are read in strips of output rows.
_STRIP_BYTES = 4 << 20


def _area_taps(start: float, end: float, out: int,
               limit: int) -> Tuple[np.ndarray, np.ndarray]:
  """Exact area averaging along one axis, as source indices and weights.

  Output pixel ``o`` is the mean of the source interval ``[start + o * s,
  start + (o + 1) * s)`` with ``s = (end - start) / out >= 1``; source pixel
  ``i`` covers ``[i, i + 1)``, and one cut by the interval counts for the part
  covered.

  Returns:
    ``(first, weight)``: output ``o`` is ``sum_k weight[o, k] *
    source[first[o] + k]``, where ``weight`` is ``[out, taps]``, each row
    sums to 1, and ``first[o] + taps <= limit``.
  """
  scale = (end - start) / out
  lo = start + scale * np.arange(out)
  hi = lo + scale
  taps = min(int(math.ceil(scale)) + 1, limit)
  first = np.clip(np.floor(lo).astype(np.int64), 0, limit - taps)
  index = first[:, None] + np.arange(taps)[None, :]
  weight = np.minimum(index + 1, hi[:, None]) - np.maximum(index, lo[:, None])
  return first, (np.clip(weight, 0.0, None) / scale).astype(np.float32)


def _reduce_rows(source: np.ndarray, first: np.ndarray,
                 weight: np.ndarray) -> np.ndarray:
  """``out[o] = sum_k weight[o, k] * source[first[o] + k]``, 2-D, float32."""
  windows = sliding_window_view(source, weight.shape[1], axis=0)[first]
  return np.einsum("omk,ok->om", windows, weight, dtype=np.float32,
                   casting="unsafe")


def _area_resize(img: Image.Image, box: Tuple[float, float, float, float],
                 size: int) -> np.ndarray:
  """Exact area averaging of ``box`` of an RGB ``img`` to ``size x size``.

  Rows first, reading the photo in strips of at most ``_STRIP_BYTES``, then
  columns on the transposed ``[width, size, 3]`` result.
  """
  left, right = math.floor(box[0]), min(math.ceil(box[2]), img.width)
  width = right - left
  row_first, row_weight = _area_taps(box[1], box[3], size, img.height)
  col_first, col_weight = _area_taps(box[0] - left, box[2] - left, size, width)
  bytes_per_output_row = (box[3] - box[1]) / size * width * 3
  group = max(1, min(size, int(_STRIP_BYTES / bytes_per_output_row)))
  rows = np.empty((size, width * 3), np.float32)
  for g0 in range(0, size, group):
    g1 = min(g0 + group, size)
    top = int(row_first[g0])
    bottom = int(row_first[g1 - 1]) + row_weight.shape[1]
    strip = np.asarray(img.crop((left, top, right, bottom)))
    rows[g0:g1] = _reduce_rows(strip.reshape(bottom - top, width * 3),
                               row_first[g0:g1] - top, row_weight[g0:g1])
  columns = np.ascontiguousarray(
      rows.reshape(size, width, 3).transpose(1, 0, 2)).reshape(width, size * 3)
  out = _reduce_rows(columns, col_first, col_weight)
  out = out.reshape(size, size, 3).transpose(1, 0, 2)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8, order="C")


def prepare(img: Image.Image, policy: str, size: int = 299) -> np.ndarray:
  """Prepares one photo for a model.

  Args:
    img: an RGB image, as ``decode.decode_image`` returns.
    policy: ``squash`` or ``center_crop``.
    size: output height and width.

  Returns:
    A C-contiguous, writable uint8 array of shape ``[size, size, 3]``.

  Raises:
    ValueError: unknown policy, bad size, or an image that is not RGB.
  """
  _check(policy, size)
  if img.mode != "RGB":
    raise ValueError(
        f"prepare expects an RGB image (decode_image returns one), got mode "
        f"{img.mode}")
  box = source_box(img.width, img.height, policy, size)
  if box[2] - box[0] >= size and box[3] - box[1] >= size:
    return _area_resize(img, box, size)
  out = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
  return np.array(out, dtype=np.uint8, order="C")


def prepare_all(img: Image.Image, policies: Iterable[str],
                size: int = 299) -> Dict[str, np.ndarray]:
  """One prepared array per distinct policy, in the order first named."""
  return {policy: prepare(img, policy, size)
          for policy in dict.fromkeys(policies)}
