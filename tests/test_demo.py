"""transforms/demo.py: the demo's stand-ins, once per machine, with ONNX files.

The default tier checks the key and the once-per-machine rule with the
child process replaced by a recorder; the slow tier writes the real
stand-ins in the child and opens their staged ONNX files.
"""

import json
import os
import shutil

import pytest

from natvision.pipelines import embed_images
from natvision.transforms import demo
from natvision.transforms.runtimes import base
from natvision.transforms.runtimes import onnx as onnx_lib
from natvision.transforms.runtimes import onnx_session
from natvision.transforms.runtimes import onnx_store


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
  cache = str(tmp_path / "model_cache")
  monkeypatch.setenv("NATVISION_MODEL_CACHE", cache)
  return cache


@pytest.fixture
def children(monkeypatch):
  """Records each child the demo would start and writes nothing."""
  started = []

  def fake(root, names, stage_onnx=True):
    started.append((root, list(names), stage_onnx))
    for name in names:
      os.makedirs(os.path.join(root, name))
      open(os.path.join(root, name, "saved_model.pb"), "wb").close()
    return {}

  monkeypatch.setattr(demo, "write_in_child", fake)
  return started


def test_the_root_is_in_the_model_cache_and_keyed_by_content(model_cache,
                                                             monkeypatch):
  root = demo.standins_root()
  assert os.path.dirname(root) == os.path.join(model_cache, "standins")
  assert os.path.basename(root) == f"tiny-{demo.key()}"
  assert demo.key() == demo.key()
  # Another TensorFlow writes other bytes: another folder.
  real = demo._version  # pylint: disable=protected-access
  monkeypatch.setattr(demo, "_version", lambda d: "0.0" if d == "tensorflow"
                      else real(d))
  assert demo.standins_root() != root


def test_a_demo_without_model_root_uses_the_machines_standins(model_cache):
  config, _ = embed_images.parse_args(["--demo", "--output_dir", "any"])
  assert [m.path for m in config.models] == [
      os.path.join(demo.standins_root(), m.name) for m in config.models]


def test_standins_are_written_once_in_one_child(model_cache, children):
  root = demo.standins_root()
  names = ["inaturalist_v2", "fungi_mobile_v1", "inception_resnet_v2"]
  assert demo.ensure(root, names) is True
  assert children == [(root, names, True)]
  # A second demo (any output folder) finds them.
  assert demo.ensure(root, names) is False
  assert len(children) == 1
  # A model missing from the folder is written alone.
  shutil.rmtree(os.path.join(root, "fungi_mobile_v1"))
  assert demo.ensure(root, names) is True
  assert children[1] == (root, ["fungi_mobile_v1"], True)


@pytest.mark.slow  # the child imports TensorFlow and converts 3 models
def test_the_child_writes_standins_with_staged_checked_onnx_files(
    model_cache, tmp_path):
  root = str(tmp_path / "standins")
  names = ["inaturalist_v2", "fungi_mobile_v1", "inception_resnet_v2"]
  assert demo.ensure(root, names) is True
  assert sorted(os.listdir(root)) == sorted(names)  # no temporary left
  for name in names:
    folder = os.path.join(root, name)
    (resolved,) = demo.models_lib.resolve_models([name], root)
    session = onnx_lib.OnnxSession(resolved, onnx_store.staged_onnx_path(
        resolved))
    meta = session.metadata
    assert meta[onnx_session.METADATA_FINGERPRINT] == base.model_fingerprint(
        folder)
    check = json.loads(meta[onnx_session.METADATA_CHECK])
    assert 0 <= check["max_diff"] <= check["tolerance"]
    assert check["tf_seconds"] > 0 and check["onnx_seconds"] > 0
  assert demo.ensure(root, names) is False
