"""Preprocess: both policies against independent computations, and memory."""

import tracemalloc

import numpy as np
import pytest
from PIL import Image

from tests import corpus
from natvision.transforms import preprocess
from natvision.transforms.preprocess import prepare, prepare_all

SIZE = 299


@pytest.fixture(scope="module")
def tf():
  return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def photos():
  flower = corpus.load_photo("flower.jpg", 5)
  return {
      "coffee": corpus.load_photo("coffee.png", 2),         # 600x400
      "china": corpus.load_photo("china.jpg", 6),           # 640x427
      "astronaut": corpus.load_photo("astronaut.png", 1),   # 512x512
      "portrait": flower.transpose(Image.Transpose.ROTATE_90),  # 427x640
      # Big enough to be read in several strips.
      "big": flower.resize((2048, 1536), Image.Resampling.BICUBIC),
  }


def _rounded(tensor):
  return np.clip(np.rint(np.asarray(tensor)), 0, 255).astype(np.uint8)


def _diff(a, b):
  d = np.abs(a.astype(int) - b.astype(int))
  return d.mean(), d.max()


@pytest.mark.parametrize("name", ["coffee", "china", "astronaut", "portrait",
                                  "big"])
def test_squash_matches_tensorflow_area_resize(tf, photos, name):
  img = photos[name]
  expected = _rounded(tf.image.resize(np.asarray(img), (SIZE, SIZE),
                                      method="area"))
  mean, worst = _diff(prepare(img, "squash"), expected)
  # Measured: mean 0.001, max 1 (float rounding at .5).
  assert mean < 0.02 and worst <= 1


@pytest.mark.parametrize("name", ["coffee", "china", "astronaut", "portrait",
                                  "big"])
def test_center_crop_matches_tensorflow_resize_then_crop(tf, photos, name):
  img = photos[name]
  width, height = img.size
  short, long_ = min(width, height), max(width, height)
  scaled_short = 342  # ceil(299 / 0.875)
  scaled_long = int(long_ * scaled_short / short + 0.5)
  new_h, new_w = ((scaled_short, scaled_long) if height <= width
                  else (scaled_long, scaled_short))
  resized = tf.image.resize(np.asarray(img), (new_h, new_w), method="area")
  top, left = (new_h - SIZE) // 2, (new_w - SIZE) // 2
  expected = _rounded(resized[top:top + SIZE, left:left + SIZE])
  mean, worst = _diff(prepare(img, "center_crop"), expected)
  # Measured: mean 0.001, max 1.
  assert mean < 0.02 and worst <= 1


def test_both_policies_match_block_means_when_scales_are_whole():
  rng = np.random.default_rng(3)
  # 1026x684: the short side 684 becomes 342 (factor 2) and the crop is the
  # source box x 214..812, y 42..640; squash of 598x897 is 2x3 blocks.
  pixels = rng.integers(0, 256, (684, 1026, 3), dtype=np.uint8)
  crop = pixels[42:640, 214:812].reshape(SIZE, 2, SIZE, 2, 3).mean(axis=(1, 3))
  got = prepare(Image.fromarray(pixels), "center_crop")
  assert _diff(got, np.rint(crop))[1] <= 1
  pixels = rng.integers(0, 256, (897, 598, 3), dtype=np.uint8)
  blocks = pixels.reshape(SIZE, 3, SIZE, 2, 3).mean(axis=(1, 3))
  got = prepare(Image.fromarray(pixels), "squash")
  assert _diff(got, np.rint(blocks))[1] <= 1


def test_enlarging_matches_tensorflow_bilinear(tf, photos):
  small = photos["china"].resize((120, 90), Image.Resampling.BOX)
  expected = _rounded(tf.image.resize(np.asarray(small), (SIZE, SIZE),
                                      method="bilinear"))
  mean, worst = _diff(prepare(small, "squash"), expected)
  assert mean < 0.3 and worst <= 1  # measured: mean 0.14, max 1


def test_reducing_one_axis_and_enlarging_the_other(tf, photos):
  img = photos["china"].resize((1000, 100), Image.Resampling.BOX)
  expected = _rounded(tf.image.resize(np.asarray(img), (SIZE, SIZE),
                                      method="bilinear", antialias=True))
  mean, worst = _diff(prepare(img, "squash"), expected)
  assert mean < 0.3 and worst <= 1  # measured: mean 0.16, max 1


def test_center_crop_keeps_the_centre_and_squash_keeps_everything():
  arr = np.zeros((400, 800, 3), np.uint8)
  arr[:, :200] = corpus.BLUE
  arr[:, 200:600] = corpus.RED
  arr[:, 600:] = corpus.GREEN
  img = Image.fromarray(arr)
  crop = prepare(img, "center_crop")
  assert (crop == corpus.RED).all()
  squash = prepare(img, "squash")
  assert (squash[:, :70] == corpus.BLUE).all()
  assert (squash[:, 80:220] == corpus.RED).all()
  assert (squash[:, 230:] == corpus.GREEN).all()


@pytest.mark.parametrize("size", [(12000, 6), (6, 12000)])
@pytest.mark.parametrize("policy", ["squash", "center_crop"])
def test_extreme_aspect_ratio_allocates_only_the_output(size, policy):
  img = corpus.strip_image(*size, seed=8)
  tracemalloc.start()
  Image.core.reset_stats()
  try:
    out = prepare(img, policy)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  pil_blocks = Image.core.get_stats()["allocated_blocks"]
  assert out.shape == (SIZE, SIZE, 3)
  # Measured: 0.5 MB of Python/numpy memory and 2 of Pillow's 16 MB blocks;
  # scaling to a 342 short side first takes 1.4 GB and 58 blocks.
  assert peak < 20_000_000
  assert pil_blocks <= 4
  # The red ramp runs along the long side: the centre crop sits mid-ramp.
  if policy == "center_crop":
    assert 110 < out[..., 0].mean() < 145


def test_big_photo_is_read_in_strips():
  img = corpus.load_photo("china.jpg", 6).resize((4032, 3024))
  tracemalloc.start()
  try:
    out = prepare(img, "squash")
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert out.shape == (SIZE, SIZE, 3)
  # Measured 49 MB; a float32 copy of the photo alone would be 146 MB.
  assert peak < 80_000_000


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (299, 299), (300, 1000),
                                  (640, 427)])
@pytest.mark.parametrize("policy", ["squash", "center_crop"])
def test_output_is_contiguous_writable_uint8(size, policy):
  img = corpus.strip_image(*size, seed=1)
  out = prepare(img, policy)
  assert out.shape == (SIZE, SIZE, 3)
  assert out.dtype == np.uint8
  assert out.flags.c_contiguous and out.flags.writeable


def test_one_pixel_becomes_a_flat_square():
  out = prepare(Image.new("RGB", (1, 1), (10, 200, 30)), "center_crop")
  assert (out == (10, 200, 30)).all()


def test_same_size_squash_is_the_identity(photos):
  img = photos["astronaut"].resize((SIZE, SIZE))
  assert np.array_equal(prepare(img, "squash"), np.asarray(img))


def test_other_sizes(photos):
  assert prepare(photos["coffee"], "center_crop", size=224).shape == (224, 224,
                                                                      3)
  assert preprocess.resized_size(600, 400, "center_crop", 224) == (384, 256)


def test_source_box_is_centred():
  for width, height in ((4032, 3024), (3024, 4032), (640, 427), (12000, 6)):
    left, top, right, bottom = preprocess.source_box(width, height,
                                                     "center_crop")
    resized_w, resized_h = preprocess.resized_size(width, height,
                                                   "center_crop")
    # Centred to within one pixel of the scaled photo.
    assert abs(left - (width - right)) <= width / resized_w + 1e-9
    assert abs(top - (height - bottom)) <= height / resized_h + 1e-9
    assert (right - left) * resized_w / width == pytest.approx(SIZE)
  assert preprocess.source_box(640, 427, "squash") == (0, 0, 640, 427)


def test_prepare_all_gives_one_array_per_distinct_policy(photos):
  img = photos["coffee"]
  arrays = prepare_all(img, ["center_crop", "squash", "center_crop"])
  assert list(arrays) == ["center_crop", "squash"]
  assert np.array_equal(arrays["squash"], prepare(img, "squash"))
  assert np.array_equal(arrays["center_crop"], prepare(img, "center_crop"))
  assert not np.array_equal(arrays["squash"], arrays["center_crop"])


def test_bad_arguments_raise_value_error(photos):
  with pytest.raises(ValueError, match="squash, center_crop"):
    prepare(photos["coffee"], "stretch")
  with pytest.raises(ValueError, match="squash, center_crop"):
    prepare_all(photos["coffee"], ["squash", "fit"])
  with pytest.raises(ValueError, match="RGB"):
    prepare(photos["coffee"].convert("L"), "squash")
  with pytest.raises(ValueError, match="positive"):
    prepare(photos["coffee"], "squash", size=0)
