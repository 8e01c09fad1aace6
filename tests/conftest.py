"""Shared fixtures: tiny stand-in models and real photos on disk."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def real_photo_paths():
  """Photos shipped inside scikit-image and scikit-learn wheels."""
  import skimage  # pylint: disable=import-outside-toplevel
  import sklearn  # pylint: disable=import-outside-toplevel
  sk = os.path.join(os.path.dirname(skimage.__file__), "data")
  sl = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
  return [os.path.join(sl, "flower.jpg"), os.path.join(sl, "china.jpg"),
          os.path.join(sk, "chelsea.png"), os.path.join(sk, "coffee.png"),
          os.path.join(sk, "rocket.jpg"), os.path.join(sk, "grass.png")]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
  """The three seed models as tiny stand-ins, in the seeds' formats."""
  from tools import standins as standin_models  # pylint: disable=import-outside-toplevel
  root = str(tmp_path_factory.mktemp("models"))
  standin_models.write_standins(root, tiny=True)
  return root


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory):
  """Real photos in several formats and sizes, plus one broken file."""
  root = tmp_path_factory.mktemp("photos")
  paths = real_photo_paths()
  for path in paths:
    shutil.copy(path, root / os.path.basename(path))
  flower = Image.open(paths[0])
  flower.resize((2048, 1536)).save(root / "flower_big.jpg", quality=90)
  flower.crop((0, 0, 300, 100)).save(root / "flower strip é.webp")
  rng = np.random.default_rng(7)
  Image.fromarray(rng.integers(0, 256, (50, 80, 3), np.uint8)).save(
      root / "noise.bmp")
  (root / "broken.jpg").write_bytes(b"<html><body>not a photo</body></html>")
  return root


@pytest.fixture(scope="session")
def labelled_job(tiny_models, tmp_path_factory):
  """The whole embed job over labelled crops (tests/labelled_photos.py).

  Returns a dict: ``out`` (the output folder), ``photos`` (the
  LabelledPhotos written) and ``models`` (the tiny stand-ins' root).
  """
  from pipelines import embed_images  # pylint: disable=import-outside-toplevel
  from tests import labelled_photos  # pylint: disable=import-outside-toplevel
  root = str(tmp_path_factory.mktemp("labelled"))
  photos = labelled_photos.make_labelled_photos(
      root, real_photo_paths(), os.path.join(tiny_models, "fungi_mobile_v1"))
  out = os.path.join(root, "out")
  report = embed_images.run([
      "--input", photos.manifest, "--output_dir", out,
      "--model_root", tiny_models, "--runtime", "tf", "--batch_size", "8",
      "--top_k", "5"])
  return {"out": out, "photos": photos, "models": tiny_models,
          "report": report}


from tests.gcs_server import gcs_server  # noqa: F401,E402  (fixture)
