"""transforms/models.py: resolving models, and caches keyed by what a model
holds, never by where it lies.

Models on gs:// are copied to a local cache keyed by the folder's listing
(through the loopback GCS server, tests/gcs_server.py), so a model replaced
at the same path is fetched again; converted ONNX files are cached by the
model's fingerprint, so a moved or copied model folder reuses them
(tests/test_runtimes_quantize.py checks the same for int8 files).  A
--runtime that names no runtime is refused when the models are resolved,
before anything is loaded.
"""

import os
import shutil

import pytest

from tests.gcs_server import upload_dir
from natvision.transforms import models
from natvision.transforms import runtimes
from natvision.transforms.runtimes import chooser
from natvision.transforms.runtimes import onnx_convert


def test_unknown_runtime_is_refused(tiny_models):
  with pytest.raises(models.ModelError, match="--runtime must be one of"):
    models.resolve_models(["fungi_mobile_v1"], tiny_models,
                          requested_runtime="tensorrt")


def test_model_replaced_at_the_same_path_is_fetched_again(
    gcs_server, tmp_path, monkeypatch):
  monkeypatch.setenv("NATVISION_MODEL_CACHE", str(tmp_path / "cache"))
  src = tmp_path / "model"
  (src / "variables").mkdir(parents=True)
  (src / "saved_model.pb").write_bytes(b"first version")
  (src / "variables" / "variables.index").write_bytes(b"index 1")
  remote = gcs_server.bucket_url + "/cache-test/model"
  upload_dir(str(src), remote)

  first = models.stage_locally(remote)
  with open(os.path.join(first, "saved_model.pb"), "rb") as f:
    assert f.read() == b"first version"
  assert models.stage_locally(remote) == first  # unchanged: the same copy

  (src / "saved_model.pb").write_bytes(b"second, longer version")
  upload_dir(str(src), remote)
  second = models.stage_locally(remote)
  assert second != first
  with open(os.path.join(second, "saved_model.pb"), "rb") as f:
    assert f.read() == b"second, longer version"
  with open(os.path.join(second, "variables", "variables.index"), "rb") as f:
    assert f.read() == b"index 1"


def test_a_copied_model_folder_reuses_the_converted_file(
    tiny_models, fresh_onnx_cache, tmp_path, monkeypatch):
  name = "inaturalist_v2"
  conversions = []

  def convert_here(resolved, target_path, *args, **kwargs):
    # In this process (TensorFlow is loaded already), counted.
    conversions.append(resolved.path)
    return onnx_convert.convert_to_onnx(resolved, target_path)

  monkeypatch.setattr(onnx_convert, "convert_in_child", convert_here)
  copy_root = tmp_path / "copied"
  shutil.copytree(os.path.join(tiny_models, name), copy_root / name)

  def decide(root):
    runtimes.forget()  # no runtime remembered from the other folder
    (resolved,) = models.resolve_models([name], str(root),
                                        requested_runtime="onnx")
    return chooser.choose(resolved)

  try:
    original = decide(tiny_models)
    copied = decide(copy_root)
  finally:
    runtimes.forget()
  assert original.onnx_source == "converted"
  assert os.path.dirname(original.onnx_path) == fresh_onnx_cache
  assert copied.onnx_source == "cached"
  assert copied.onnx_path == original.onnx_path
  assert copied.fingerprint == original.fingerprint
  assert conversions == [os.path.join(tiny_models, name)]
  assert [f for f in os.listdir(fresh_onnx_cache)
          if f.endswith(".onnx")] == [os.path.basename(original.onnx_path)]
