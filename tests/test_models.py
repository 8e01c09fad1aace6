"""transforms/models.py: resolving models and the cache of remote models.

Models on gs:// are copied to a local cache keyed by what the folder holds,
so a model replaced at the same path is fetched again (through the loopback
GCS server, tests/gcs_server.py).  A --runtime that names no runtime is
refused when the models are resolved, before anything is loaded.
"""

import os

import pytest

from tests.gcs_server import upload_dir
from transforms import models


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
