"""Shared by the runtime tests: tiny models, photos, counting and timing.

The tests of transforms/runtimes/ (test_runtimes*.py) and of the staging
CLI (test_stage_onnx.py) run real models: tiny stand-ins in the seeds'
three formats, converted by tf2onnx and run by onnxruntime; TensorFlow's
outputs are the reference.  Which runtime is faster is fixed by the probe
timings recorded in a file (rewritten by ``record``), or, for a file that
records none, by a fake clock that the runtimes' predict advances, as
Beam's RunInference tests do.  Conversions are counted by wrapping the
converter (in this process and the child-process one).

A test module takes the fixtures it uses by importing them by name
(pytest finds fixtures among a module's globals); the two autouse ones,
``onnx_cache`` and ``nothing_remembered``, apply to every test of a module
that imports them.
"""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from natvision.tools import stage_onnx
from natvision.transforms import standins as standin_models
from natvision.transforms import models as models_lib
from natvision.transforms import runtimes
from natvision.transforms.runtimes import tf as tf_runtime
from natvision.transforms.runtimes import base as runtimes_base
from natvision.transforms.runtimes import onnx_convert
from natvision.transforms.runtimes import onnx_session
from natvision.transforms.runtimes import onnx_store

NAMES = ("inaturalist_v2", "fungi_mobile_v1", "inception_resnet_v2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_root(tiny_models):
  """Tiny stand-ins of the three seeds (seed 0); tests must not modify them.

  Each test gets an empty ONNX cache of its own (``onnx_cache``), so the
  session's converted files of these models are not seen.
  """
  return tiny_models


@pytest.fixture(scope="module")
def other_root(tmp_path_factory):
  """The same tiny models with other weights (seed 1): a wrong ONNX source."""
  root = str(tmp_path_factory.mktemp("runtime_models_seed1"))
  standin_models.write_standins(root, tiny=True, models=["inaturalist_v2"],
                                seed=1)
  return root


@pytest.fixture(scope="module")
def staged_root(model_root, tmp_path_factory):
  """inaturalist_v2 with natvision.onnx staged next to it (converted once),
  recording ONNX Runtime as the faster one."""
  root = str(tmp_path_factory.mktemp("staged_models"))
  shutil.copytree(os.path.join(model_root, "inaturalist_v2"),
                  os.path.join(root, "inaturalist_v2"))
  stage_onnx.stage_onnx(resolve(root, "inaturalist_v2"))
  staged = os.path.join(root, "inaturalist_v2", onnx_store.STAGED_ONNX)
  record(staged, staged, tf_seconds=0.2, onnx_seconds=0.1)  # ONNX faster
  return root


@pytest.fixture(autouse=True)
def onnx_cache(tmp_path, monkeypatch):
  """A fresh conversion cache per test, so tests do not see each other's."""
  cache = str(tmp_path / "onnx_cache")
  monkeypatch.setenv("NATVISION_ONNX_CACHE", cache)
  return cache


@pytest.fixture(autouse=True)
def nothing_remembered():
  """Each test starts with no runtime remembered by an earlier one."""
  runtimes.forget()
  yield
  runtimes.forget()


@pytest.fixture
def conversions(monkeypatch):
  """Counts conversions started by this process, per model name."""
  counts = {}

  def counting(function):
    def wrapped(resolved, *args, **kwargs):
      counts[resolved.name] = counts.get(resolved.name, 0) + 1
      return function(resolved, *args, **kwargs)
    return wrapped

  monkeypatch.setattr(onnx_convert, "convert_to_onnx",
                      counting(onnx_convert.convert_to_onnx))
  monkeypatch.setattr(onnx_convert, "convert_in_child",
                      counting(onnx_convert.convert_in_child))
  return counts


@pytest.fixture
def tf_loads(monkeypatch):
  """Counts models loaded on TensorFlow in this process."""
  loads = []
  load = tf_runtime.load_model

  def counting(resolved, *args, **kwargs):
    loads.append(resolved.name)
    return load(resolved, *args, **kwargs)

  monkeypatch.setattr(tf_runtime, "load_model", counting)
  return loads


@pytest.fixture(scope="module")
def photos():
  """Real photos (scikit-image's astronaut and coffee), squashed to 299."""
  import skimage  # pylint: disable=import-outside-toplevel
  data = os.path.join(os.path.dirname(skimage.__file__), "data")
  return np.stack([
      np.asarray(Image.open(os.path.join(data, name)).convert("RGB").resize(
          (299, 299), Image.BILINEAR))
      for name in ("astronaut.png", "coffee.png")])


def counting_opens(cls, opened):
  """``cls`` that appends the path of each instance it makes to ``opened``."""

  def make(resolved, path, *args, **kwargs):
    opened.append(path)
    return cls(resolved, path, *args, **kwargs)

  return make


def record(source, target, tf_seconds=None, onnx_seconds=None, drop=False):
  """Copies an ONNX file with other recorded probe timings, or no check.

  Args:
    source, target: .onnx paths (target is overwritten).
    tf_seconds, onnx_seconds: the timings to record.
    drop: record no check at all, as a file staged by an older natvision.
  """
  import onnx  # pylint: disable=import-outside-toplevel
  proto = onnx.load(source)
  kept = [(p.key, p.value) for p in proto.metadata_props]
  del proto.metadata_props[:]
  for key, value in kept:
    if key == onnx_session.METADATA_CHECK:
      if drop:
        continue
      check = json.loads(value)
      check.update(tf_seconds=tf_seconds, onnx_seconds=onnx_seconds)
      value = json.dumps(check)
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value
  onnx.save(proto, target)


class FakeClock:
  """A clock that stands still until a runtime's predict advances it."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def slowed(monkeypatch, clock, tf_seconds, onnx_seconds):
  """Makes each predict of TF and ONNX take the given seconds on ``clock``."""
  for cls, seconds in ((runtimes.TFRuntime, tf_seconds),
                       (runtimes.OnnxRuntime, onnx_seconds)):

    def predict(self, batch, _original=cls.predict, _seconds=seconds):
      clock.now += _seconds
      return _original(self, batch)

    monkeypatch.setattr(cls, "predict", predict)


def resolve(root, name, requested="auto"):
  """The one model ``name`` under ``root``, asking for runtime ``requested``."""
  (resolved,) = models_lib.resolve_models([name], root,
                                          requested_runtime=requested)
  return resolved


def noise(n, seed=3):
  """``n`` photos of uniform noise, uint8 [n, 299, 299, 3]."""
  return np.random.default_rng(seed).integers(0, 256, (n, 299, 299, 3),
                                              dtype=np.uint8)


def loaded_tf(resolved):
  """``resolved`` on TensorFlow, loaded."""
  tf_runtime = runtimes.TFRuntime(resolved)
  tf_runtime.load()
  return tf_runtime


def staged_copy(staged_root, tmp_path, **timings):
  """inaturalist_v2 and its staged file, with ``record(**timings)`` applied."""
  root = str(tmp_path / "models")
  shutil.copytree(os.path.join(staged_root, "inaturalist_v2"),
                  os.path.join(root, "inaturalist_v2"))
  staged = os.path.join(root, "inaturalist_v2", onnx_store.STAGED_ONNX)
  record(staged, staged, **timings)
  return root


def plant_wrong_onnx(model_root, other_root, requested):
  """Converts the seed-1 model into the cache slot of the seed-0 model."""
  resolved = resolve(model_root, "inaturalist_v2", requested)
  slot = onnx_store.cached_onnx_path(
      resolved, runtimes_base.model_fingerprint(resolved.path))
  onnx_convert.convert_to_onnx(resolve(other_root, "inaturalist_v2"), slot)
  return resolved, slot
