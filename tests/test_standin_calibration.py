"""transforms/standin_calibration.py: tiny stand-ins that tell photos apart.

The session's tiny stand-ins (tests/conftest.py ``tiny_models``, seed 0)
run on crops of real photos: a crop is nearer its own photo than any other
photo's crops.  The calibration images are checked for what the
calibration needs of them (seeded, in [0, 1], varied).
"""

import numpy as np
import pytest

from natvision.transforms import models
from natvision.transforms import standin_calibration
from natvision.transforms.runtimes import tf as tf_runtime

ALL_NAMES = ["inaturalist_v2", "fungi_mobile_v1", "inception_resnet_v2"]


def test_calibration_images_are_seeded_varied_and_read_only():
  images = standin_calibration.calibration_images(3, n=6, size=32)
  assert images.shape == (6, 32, 32, 3) and images.dtype == np.float32
  assert images.min() >= 0.0 and images.max() <= 1.0
  np.testing.assert_array_equal(
      images, standin_calibration.calibration_images(3, n=6, size=32).copy())
  assert not np.array_equal(
      images, standin_calibration.calibration_images(4, n=6, size=32))
  means = images.mean(axis=(1, 2, 3))
  assert means.std() > 0.02  # random mean colours and contrasts
  assert not images.flags.writeable


def _crops_of_real_photos():
  """Four crops of each of six real photos, squashed to 299x299 uint8."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from tests.conftest import real_photo_paths  # pylint: disable=import-outside-toplevel
  from natvision.transforms import preprocess  # pylint: disable=import-outside-toplevel
  images, sources = [], []
  for i, path in enumerate(real_photo_paths()):
    photo = Image.open(path).convert("RGB")
    w, h = photo.size
    for box in ((0, 0, w, h), (0, 0, w * 7 // 10, h * 7 // 10),
                (w * 3 // 10, h * 3 // 10, w, h),
                (w * 15 // 100, 0, w * 85 // 100, h * 8 // 10)):
      images.append(preprocess.prepare(photo.crop(box), "squash", 299))
      sources.append(i)
  return np.stack(images), np.array(sources)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_tiny_standins_tell_photos_apart(tiny_models, name):
  """Crops are nearer their own photo than any other; unrelated photos differ.

  (Before calibration every photo had cosine > 0.9998 with every other.)
  """
  images, sources = _crops_of_real_photos()
  (resolved,) = models.resolve_models([name], model_root=tiny_models)
  out = tf_runtime.load_model(resolved).predict(images)
  if name == "fungi_mobile_v1":
    top1 = out.argmax(axis=1)
    assert len(set(top1[sources == s][0] for s in set(sources))) >= 4
    out = np.log(out)  # compare the logits' directions, not probabilities
    out -= out.mean(axis=1, keepdims=True)
  unit = out / np.linalg.norm(out, axis=1, keepdims=True)
  cosine = unit @ unit.T
  np.fill_diagonal(cosine, -np.inf)
  same = sources[:, None] == sources[None, :]
  assert (sources[cosine.argmax(axis=1)] == sources).all()
  assert cosine[~same].max() < 0.99
  assert np.median(cosine[~same]) < 0.5
