"""ONNX Runtime next to TensorFlow: conversion, the check, caching, staging.

Real models throughout: tiny stand-ins in the seeds' three formats, converted
by tf2onnx and run by onnxruntime; TensorFlow's outputs are the reference.
"""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from pipelines import standin_models
from transforms import models as models_lib
from transforms import runtimes

NAMES = ("inaturalist_v2", "fungi_mobile_v1", "inception_resnet_v2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
  """Tiny stand-ins of the three seeds (seed 0); tests must not modify them."""
  root = str(tmp_path_factory.mktemp("runtime_models"))
  standin_models.write_standins(root, tiny=True)
  return root


@pytest.fixture(scope="module")
def other_root(tmp_path_factory):
  """The same tiny models with other weights (seed 1): a wrong ONNX source."""
  root = str(tmp_path_factory.mktemp("runtime_models_seed1"))
  standin_models.write_standins(root, tiny=True, models=["inaturalist_v2"],
                                seed=1)
  return root


@pytest.fixture(autouse=True)
def onnx_cache(tmp_path, monkeypatch):
  """A fresh conversion cache per test, so tests do not see each other's."""
  cache = str(tmp_path / "onnx_cache")
  monkeypatch.setenv("NATVISION_ONNX_CACHE", cache)
  return cache


@pytest.fixture(scope="module")
def photos():
  """Real photos (scikit-image's astronaut and coffee), squashed to 299."""
  import skimage  # pylint: disable=import-outside-toplevel
  data = os.path.join(os.path.dirname(skimage.__file__), "data")
  return np.stack([
      np.asarray(Image.open(os.path.join(data, name)).convert("RGB").resize(
          (299, 299), Image.BILINEAR))
      for name in ("astronaut.png", "coffee.png")])


def _resolve(root, name):
  (resolved,) = models_lib.resolve_models([name], root)
  return resolved


def _noise(n, seed=3):
  return np.random.default_rng(seed).integers(0, 256, (n, 299, 299, 3),
                                              dtype=np.uint8)


def test_probe_batch_is_fixed_and_varied():
  probe = runtimes.probe_batch()
  assert probe.shape == (runtimes.PROBE_SIZE, 299, 299, 3)
  assert probe.dtype == np.uint8
  np.testing.assert_array_equal(probe, runtimes.probe_batch())
  for i in range(len(probe)):
    assert probe[i].min() < 30 and probe[i].max() > 225
    for j in range(i):
      assert not np.array_equal(probe[i], probe[j])


@pytest.mark.parametrize("name", NAMES)
def test_conversion_matches_tf_on_photos_and_noise(model_root, photos, tmp_path,
                                                   name):
  resolved = _resolve(model_root, name)
  tf_model = models_lib.load_model(resolved)
  path = runtimes.convert_to_onnx(resolved, str(tmp_path / "m.onnx"), tf_model)
  assert os.listdir(tmp_path) == ["m.onnx"]  # no temporary file left behind
  assert "TF2ONNX_CATCH_ERRORS" not in os.environ  # restored
  onnx_model = runtimes.OnnxModel(resolved, path)
  assert onnx_model.metadata["natvision_fingerprint"] == (
      runtimes.model_fingerprint(model_root + "/" + name))
  tolerance = runtimes.TOLERANCES[resolved.spec.kind]
  # The batch dimension is dynamic: 1, 2 and 3 photos through one file.
  diffs = []
  for batch in (photos, photos[:1], _noise(3)):
    expected = tf_model.predict(batch)
    got = onnx_model.predict(batch)
    assert got.dtype == np.float32
    assert got.shape == (len(batch), resolved.spec.output_width)
    diffs.append(runtimes.output_difference(got, expected))
    assert diffs[-1] <= tolerance
  # The two photos' outputs differ far more than the runtimes do, so the
  # comparison is not trivially passed.
  out = onnx_model.predict(photos)
  assert np.abs(out[0] - out[1]).max() > 100 * max(diffs)


def test_uint8_and_float_inputs_agree(model_root, photos, tmp_path):
  resolved = _resolve(model_root, "inception_resnet_v2")
  path = runtimes.convert_to_onnx(resolved, str(tmp_path / "m.onnx"))
  onnx_model = runtimes.OnnxModel(resolved, path, intra_op_threads=1)
  np.testing.assert_allclose(
      onnx_model.predict(photos),
      onnx_model.predict(photos.astype(np.float32) / 255), rtol=1e-6,
      atol=1e-6)


def test_one_session_serves_many_threads(model_root, tmp_path):
  resolved = _resolve(model_root, "fungi_mobile_v1")
  onnx_model = runtimes.OnnxModel(
      resolved, runtimes.convert_to_onnx(resolved, str(tmp_path / "m.onnx")))
  batches = [_noise(2, seed) for seed in range(6)]
  expected = [onnx_model.predict(b) for b in batches]
  results = [None] * len(batches)

  def work(i):
    for _ in range(3):
      results[i] = onnx_model.predict(batches[i])

  threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for got, want in zip(results, expected):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", NAMES)
def test_auto_picks_onnx_when_it_passes(model_root, name):
  resolved = _resolve(model_root, name)
  predictor, runtime, info = runtimes.load_runtime(resolved, "auto",
                                                   timing_runs=0)
  assert runtime == "onnx" and info.runtime == "onnx"
  assert isinstance(predictor, runtimes.OnnxModel)
  assert info.onnx_source == "converted"
  assert 0 <= info.max_diff <= info.tolerance
  assert info.max_diff == info.onnx_max_diff
  assert info.fallback is None
  assert info.as_dict()["runtime"] == "onnx"


def test_auto_times_both_and_keeps_the_faster(model_root):
  resolved = _resolve(model_root, "inaturalist_v2")
  predictor, runtime, info = runtimes.load_runtime(resolved, "auto",
                                                   timing_runs=2)
  assert info.tf_seconds > 0 and info.onnx_seconds > 0
  if info.onnx_seconds < info.tf_seconds:
    assert runtime == "onnx" and info.fallback is None
  else:
    assert runtime == "tf" and "TF ran the probe batch" in info.fallback
    assert isinstance(predictor, models_lib.LoadedModel)


def test_tf_runtime_is_the_loaded_model(model_root):
  resolved = _resolve(model_root, "fungi_mobile_v1")
  before = dict(runtimes.CONVERSIONS)
  predictor, runtime, info = runtimes.load_runtime(resolved, "tf")
  assert isinstance(predictor, models_lib.LoadedModel)
  assert runtime == "tf" and info.max_diff == 0.0
  assert runtimes.CONVERSIONS == before


def test_unknown_runtime_is_refused(model_root):
  with pytest.raises(models_lib.ModelError, match="--runtime must be one of"):
    runtimes.load_runtime(_resolve(model_root, "fungi_mobile_v1"), "tensorrt")


def test_conversion_happens_once_per_cache(model_root, onnx_cache):
  resolved = _resolve(model_root, "inaturalist_v2")
  before = runtimes.CONVERSIONS.get("inaturalist_v2", 0)
  _, runtime, first = runtimes.load_runtime(resolved, "onnx")
  assert runtime == "onnx" and first.onnx_source == "converted"
  assert os.path.dirname(first.onnx_path) == onnx_cache
  mtime = os.stat(first.onnx_path).st_mtime_ns
  _, runtime, second = runtimes.load_runtime(resolved, "onnx")
  assert runtime == "onnx" and second.onnx_source == "cached"
  assert second.onnx_path == first.onnx_path
  assert os.stat(second.onnx_path).st_mtime_ns == mtime
  assert runtimes.CONVERSIONS["inaturalist_v2"] == before + 1


_CONVERT_SCRIPT = """
import sys
from transforms import models, runtimes
(resolved,) = models.resolve_models(["inception_resnet_v2"], sys.argv[1])
_, runtime, info = runtimes.load_runtime(resolved, "onnx")
print(runtime, info.onnx_source, runtimes.CONVERSIONS.get(resolved.name, 0))
"""


def test_two_processes_convert_once(model_root, onnx_cache):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  procs = [subprocess.Popen([sys.executable, "-c", _CONVERT_SCRIPT, model_root],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outputs = []
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    outputs.append(out.split()[-3:])
  assert sorted(o[1] for o in outputs) == ["cached", "converted"]
  assert sorted(int(o[2]) for o in outputs) == [0, 1]
  assert [f for f in os.listdir(onnx_cache) if f.endswith(".onnx")] == [
      os.path.basename(runtimes.cached_onnx_path(
          _resolve(model_root, "inception_resnet_v2"),
          runtimes.model_fingerprint(
              os.path.join(model_root, "inception_resnet_v2"))))]


def _plant_wrong_onnx(model_root, other_root):
  """Converts the seed-1 model into the cache slot of the seed-0 model."""
  resolved = _resolve(model_root, "inaturalist_v2")
  slot = runtimes.cached_onnx_path(
      resolved, runtimes.model_fingerprint(resolved.path))
  runtimes.convert_to_onnx(_resolve(other_root, "inaturalist_v2"), slot)
  return resolved, slot


def test_onnx_refuses_a_model_that_differs(model_root, other_root):
  resolved, slot = _plant_wrong_onnx(model_root, other_root)
  with pytest.raises(models_lib.ModelError) as raised:
    runtimes.load_runtime(resolved, "onnx")
  message = str(raised.value)
  assert "inaturalist_v2" in message
  assert "differ from TensorFlow's by" in message
  assert "tolerance 1e-04" in message and slot in message
  diff = float(message.split("by ")[1].split(" ")[0])
  assert diff > 10 * runtimes.TOLERANCES[models_lib.EMBEDDER]


def test_auto_falls_back_to_tf_when_the_check_fails(model_root, other_root):
  resolved, _ = _plant_wrong_onnx(model_root, other_root)
  predictor, runtime, info = runtimes.load_runtime(resolved, "auto")
  assert runtime == "tf" and isinstance(predictor, models_lib.LoadedModel)
  assert info.requested == "auto" and info.max_diff == 0.0
  assert info.onnx_max_diff > info.tolerance
  assert "differ from TensorFlow's" in info.fallback


def test_staging_cli_writes_a_file_that_workers_use(model_root, tmp_path,
                                                    capsys):
  import shutil  # pylint: disable=import-outside-toplevel
  root = str(tmp_path / "models")
  for name in ("inaturalist_v2", "inception_resnet_v2"):
    shutil.copytree(os.path.join(model_root, name), os.path.join(root, name))
  args = ["--model_root", root,
          "--models", "inaturalist_v2,inception_resnet_v2"]
  assert runtimes.main(args) == 0
  assert "staged inaturalist_v2" in capsys.readouterr().out
  for name in ("inaturalist_v2", "inception_resnet_v2"):
    staged = os.path.join(root, name, runtimes.STAGED_ONNX)
    assert os.path.exists(staged)
    before = dict(runtimes.CONVERSIONS)
    _, runtime, info = runtimes.load_runtime(_resolve(root, name), "onnx")
    assert runtime == "onnx" and info.onnx_source == "staged"
    assert info.onnx_path == staged
    assert runtimes.CONVERSIONS == before  # nothing converted
  # A second staging does not replace the files unless asked to.
  assert runtimes.main(args) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert runtimes.main(args[:-1] + ["inaturalist_v2", "--overwrite"]) == 0


def test_staged_file_of_other_weights_is_ignored(model_root, other_root,
                                                 tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  root = str(tmp_path / "models")
  shutil.copytree(os.path.join(model_root, "inaturalist_v2"),
                  os.path.join(root, "inaturalist_v2"))
  # Staged from the seed-1 model, then the folder got the seed-0 model.
  runtimes.convert_to_onnx(
      _resolve(other_root, "inaturalist_v2"),
      os.path.join(root, "inaturalist_v2", runtimes.STAGED_ONNX))
  _, runtime, info = runtimes.load_runtime(_resolve(root, "inaturalist_v2"),
                                           "onnx")
  assert runtime == "onnx" and info.onnx_source == "converted"
  assert info.max_diff <= info.tolerance


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NATVISION_SLOW") != "1",
                    reason="full-size model; set NATVISION_SLOW=1")
@pytest.mark.parametrize("name", NAMES)
def test_full_size_standins_pass_the_check(tmp_path, photos, name):
  path = str(tmp_path / name)
  standin_models.write_standin(path, name)
  resolved = _resolve(str(tmp_path), name)
  predictor, runtime, info = runtimes.load_runtime(resolved, "onnx")
  assert runtime == "onnx" and info.max_diff <= info.tolerance
  tf_model = models_lib.load_model(resolved)
  assert runtimes.output_difference(
      predictor.predict(photos), tf_model.predict(photos)) <= info.tolerance
