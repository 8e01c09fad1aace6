"""Shared fixtures: tiny stand-in models and real photos on disk.

Two tiers (docs/tests.md): ``python -m pytest -q tests`` runs the default
tier, every test not marked ``slow``; ``python -m pytest -q -m slow tests``
runs only the slow tier and ``--runslow`` runs both.  An explicit ``-m``
expression always chooses for itself.

Made once per session and shared by every test that does not ask for a
fresh one: the tiny stand-in models (``tiny_models``), the photos on disk,
the ONNX conversion cache (``$NATVISION_ONNX_CACHE``) and the cache of
remote models (``$NATVISION_MODEL_CACHE``), both under the session's temp
folder so that no test reads or fills the machine's own caches.  A test
about converting or caching sets a fresh cache with ``monkeypatch``.
"""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# No test may look for cloud credentials on a metadata server.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["NO_GCE_CHECK"] = "true"


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False,
                   help="run the slow tier too (the whole suite, as CI does)")
  parser.addoption("--all-storage-calls", action="store_true", default=False,
                   help="tests/test_storage_faults.py: fail every storage call "
                   "of each job in turn, not a spread of them (about 20 min)")


def pytest_collection_modifyitems(config, items):
  """Deselects ``slow`` tests unless ``--runslow`` or an ``-m`` is given."""
  if config.getoption("--runslow") or config.getoption("markexpr"):
    return
  slow = [item for item in items if "slow" in item.keywords]
  if slow:
    config.hook.pytest_deselected(items=slow)
    items[:] = [item for item in items if "slow" not in item.keywords]


@pytest.fixture(scope="session", autouse=True)
def session_caches(tmp_path_factory):
  """The session's ONNX and model caches (see the module docstring)."""
  root = tmp_path_factory.mktemp("caches")
  saved = {k: os.environ.get(k)
           for k in ("NATVISION_ONNX_CACHE", "NATVISION_MODEL_CACHE")}
  os.environ["NATVISION_ONNX_CACHE"] = str(root / "onnx")
  os.environ["NATVISION_MODEL_CACHE"] = str(root / "models")
  yield root
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


def real_photo_paths():
  """Photos shipped inside scikit-image and scikit-learn wheels."""
  import skimage  # pylint: disable=import-outside-toplevel
  import sklearn  # pylint: disable=import-outside-toplevel
  sk = os.path.join(os.path.dirname(skimage.__file__), "data")
  sl = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
  return [os.path.join(sl, "flower.jpg"), os.path.join(sl, "china.jpg"),
          os.path.join(sk, "chelsea.png"), os.path.join(sk, "coffee.png"),
          os.path.join(sk, "rocket.jpg"), os.path.join(sk, "grass.png")]


TINY_NAMES = ("inaturalist_v2", "fungi_mobile_v1", "inception_resnet_v2")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, session_caches):
  """The three seed models as tiny stand-ins, in the seeds' formats.

  Their ONNX files are converted here, once, into the session's ONNX cache
  (in this process: a conversion in a child would import TensorFlow and
  tf2onnx again for each), so that a job on ``--runtime auto`` or ``onnx``
  finds them cached.  Tests must not modify the folder.
  """
  # pylint: disable=import-outside-toplevel
  from natvision.tools import standins as standin_models
  from natvision.transforms import models as models_lib
  from natvision.transforms.runtimes import base as runtimes_base
  from natvision.transforms.runtimes import onnx_convert
  from natvision.transforms.runtimes import onnx_store
  root = str(tmp_path_factory.mktemp("models"))
  standin_models.write_standins(root, tiny=True)
  for resolved in models_lib.resolve_models(list(TINY_NAMES), root,
                                            requested_runtime="onnx"):
    onnx_convert.convert_to_onnx(resolved, onnx_store.cached_onnx_path(
        resolved, runtimes_base.model_fingerprint(resolved.path)))
  return root


@pytest.fixture(scope="session")
def demo_standins(session_caches):
  """The demo's stand-ins in the session's model cache (transforms/demo.py),
  written in this process rather than in the demo's child, which would
  import TensorFlow again.  Returns their root."""
  # pylint: disable=import-outside-toplevel
  from natvision.transforms import demo
  root = demo.standins_root()
  if not os.path.isdir(root):
    demo._write_job(root, list(TINY_NAMES), True)  # pylint: disable=protected-access
  return root


def copy_session_onnx_files(folder) -> str:
  """Fills ``folder`` (made if needed) with the session cache's fp32 ONNX
  files of the tiny stand-ins and no int8 file: a cache of a test's own
  that converts nothing.  Needs ``tiny_models`` to have run.  Returns the
  folder as a string."""
  os.makedirs(folder, exist_ok=True)
  session_cache = os.environ["NATVISION_ONNX_CACHE"]
  for name in os.listdir(session_cache):
    if name.endswith(".onnx") and not name.endswith(".int8.onnx"):
      shutil.copy(os.path.join(session_cache, name),
                  os.path.join(folder, name))
  return str(folder)


@pytest.fixture
def fresh_onnx_cache(tmp_path, monkeypatch):
  """An empty ONNX cache for one test (tests about converting, caching)."""
  cache = str(tmp_path / "onnx_cache")
  monkeypatch.setenv("NATVISION_ONNX_CACHE", cache)
  return cache


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
  from natvision.pipelines import embed_images  # pylint: disable=import-outside-toplevel
  from tests import labelled_photos  # pylint: disable=import-outside-toplevel
  root = str(tmp_path_factory.mktemp("labelled"))
  photos = labelled_photos.make_labelled_photos(
      root, real_photo_paths(), os.path.join(tiny_models, "fungi_mobile_v1"))
  out = os.path.join(root, "out")
  from natvision.tools.report import write_after_run  # pylint: disable=import-outside-toplevel
  report = embed_images.run([
      "--input", photos.manifest, "--output_dir", out,
      "--model_root", tiny_models, "--runtime", "tf", "--batch_size", "8",
      "--top_k", "5"], report_writer=write_after_run)
  return {"out": out, "photos": photos, "models": tiny_models,
          "report": report}


from tests.gcs_server import gcs_server  # noqa: F401,E402  (fixture)
