"""transforms/standins.py (the writer) and tools/standins.py (its command):
formats, signatures, shapes, seeds.

Real TensorFlow throughout: tiny stand-ins are written once per module and
loaded with tensorflow_hub and with transforms.runtimes.tf.load_model,
exactly as the pipelines load the real seed models.
"""

import csv
import os

import numpy as np
import pytest

from natvision.tools import standins as standins_cli
from natvision.transforms import models
from natvision.transforms import standins as standin_models
from natvision.transforms.runtimes import tf as tf_runtime

# TensorFlow is imported by the tests that use it, not at collection.
# pylint: disable=import-outside-toplevel

TF1_NAMES = ["inaturalist_v2", "fungi_mobile_v1"]
TF2_NAMES = ["inception_resnet_v2"]
ALL_NAMES = TF1_NAMES + TF2_NAMES
WIDTHS = {"inaturalist_v2": 64, "fungi_mobile_v1": 4128,
          "inception_resnet_v2": 1536}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
  """Tiny stand-ins of all three models: seed 0 twice, and seed 1."""
  out = {}
  for key, seed in (("a", 0), ("b", 0), ("c", 1)):
    root = str(tmp_path_factory.mktemp(f"standins_{key}"))
    written = standin_models.write_standins(root, tiny=True, seed=seed)
    assert written == {n: os.path.join(root, n) for n in ALL_NAMES}
    out[key] = root
  return out


@pytest.fixture(scope="module")
def root(roots):
  return roots["a"]


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(123)
  return rng.uniform(0, 1, (3, 299, 299, 3)).astype(np.float32)


def _resolve(name, root_dir=None, handle=None):
  handles = {name: handle} if handle else None
  return models.resolve_models([name], model_root=root_dir,
                               handles=handles)[0]


def _predict_all(root_dir, batch):
  return {name: tf_runtime.load_model(_resolve(name, root_dir)).predict(
      batch)
          for name in ALL_NAMES}


def _meta_graphs(path):
  from tensorflow.core.protobuf import saved_model_pb2
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  return list(proto.meta_graphs)


@pytest.mark.parametrize("name", TF1_NAMES)
def test_tf1_folder_has_hub_marker(root, name):
  with open(os.path.join(root, name, "tfhub_module.pb"), "rb") as f:
    assert f.read() == b"\x08\x01"  # ModuleDef{format: FORMAT_V3}
  assert os.path.isdir(os.path.join(root, name, "variables"))


@pytest.mark.parametrize("name", TF2_NAMES)
def test_tf2_folder_has_no_hub_marker(root, name):
  assert not os.path.exists(os.path.join(root, name, "tfhub_module.pb"))
  assert os.path.isdir(os.path.join(root, name, "variables"))


@pytest.mark.parametrize("name", TF1_NAMES)
def test_tf1_saved_model_has_one_empty_tag_set_and_default_signature(
    root, name):
  from tensorflow.core.framework import types_pb2
  (meta,) = _meta_graphs(os.path.join(root, name))
  assert list(meta.meta_info_def.tags) == []
  assert set(meta.signature_def) == {"default"}
  sig = meta.signature_def["default"]
  assert set(sig.inputs) == {"images"}
  images = sig.inputs["images"]
  assert images.dtype == types_pb2.DT_FLOAT
  assert [d.size for d in images.tensor_shape.dim] == [-1, 299, 299, 3]
  assert set(sig.outputs) == {"default"}
  out = sig.outputs["default"]
  assert out.dtype == types_pb2.DT_FLOAT
  assert [d.size for d in out.tensor_shape.dim] == [-1, WIDTHS[name]]


@pytest.mark.parametrize("name", TF1_NAMES)
def test_tf1_hub_load_signature(root, name, batch):
  import tensorflow as tf
  import tensorflow_hub as hub
  obj = hub.load(os.path.join(root, name))
  fn = obj.signatures["default"]
  args, kwargs = fn.structured_input_signature
  assert args == ()
  assert kwargs == {"images": tf.TensorSpec([None, 299, 299, 3], tf.float32,
                                            name="images")}
  assert set(fn.structured_outputs) == {"default"}
  out = fn(images=tf.constant(batch))["default"]
  assert out.dtype == tf.float32
  assert out.shape == (3, WIDTHS[name])


def test_tf2_hub_load_call_and_serving_signature(root, batch):
  import tensorflow as tf
  import tensorflow_hub as hub
  obj = hub.load(os.path.join(root, "inception_resnet_v2"))
  images = tf.constant(batch)
  out = obj(images, training=False)
  assert out.dtype == tf.float32
  assert out.shape == (3, 1536)
  assert obj(images, training=True).shape == (3, 1536)
  serve = obj.signatures["serving_default"]
  assert set(serve.structured_input_signature[1]) == {"images"}
  np.testing.assert_allclose(serve(images=images)["default"].numpy(),
                             out.numpy(), rtol=1e-5, atol=1e-6)


def test_fungi_output_is_a_softmax(root, batch):
  out = tf_runtime.load_model(_resolve("fungi_mobile_v1", root)).predict(
      batch)
  assert out.shape == (3, 4128)
  assert (out >= 0).all()
  np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


def test_fungi_labelmap(root):
  path = os.path.join(root, "fungi_mobile_v1", "labelmap.csv")
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["id", "name"]
  assert [int(r[0]) for r in rows[1:]] == list(range(4128))
  assert rows[1][1] == "standin species 0000"
  names = models.read_labelmap(path, expected=4128)
  assert len(set(names)) == 4128


@pytest.mark.parametrize("name", ALL_NAMES)
def test_load_model_accepts_standins(root, name, batch):
  loaded = tf_runtime.load_model(_resolve(name, root))
  out = loaded.predict((batch * 255).astype(np.uint8))
  assert out.shape == (3, WIDTHS[name])
  assert np.isfinite(out).all()


def test_same_seed_same_outputs_other_seed_other_outputs(roots, batch):
  a = _predict_all(roots["a"], batch)
  b = _predict_all(roots["b"], batch)
  c = _predict_all(roots["c"], batch)
  for name in ALL_NAMES:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert not np.allclose(a[name], c[name]), name


def test_outputs_depend_on_the_input(root, batch):
  out = tf_runtime.load_model(_resolve("inaturalist_v2", root)).predict(
      batch)
  assert not np.allclose(out[0], out[1])


def test_load_model_rejects_tf1_standin_where_tf2_expected(root):
  resolved = _resolve("inception_resnet_v2",
                      handle=os.path.join(root, "inaturalist_v2"))
  with pytest.raises(models.ModelError, match="TF1 Hub module"):
    tf_runtime.load_model(resolved)


def test_load_model_rejects_tf2_standin_where_tf1_expected(root):
  resolved = _resolve("inaturalist_v2",
                      handle=os.path.join(root, "inception_resnet_v2"))
  with pytest.raises(models.ModelError, match="tfhub_module.pb"):
    tf_runtime.load_model(resolved)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_readme_says_outputs_mean_nothing(root, name):
  with open(os.path.join(root, name, "README.txt"), encoding="utf-8") as f:
    text = f.read()
  assert text.startswith("STAND-IN MODEL")
  assert "MEAN NOTHING" in text
  assert models.REGISTRY[name].source in text


def test_subset_and_unknown_names(tmp_path):
  written = standin_models.write_standins(str(tmp_path), tiny=True,
                                          models=["inaturalist_v2"])
  assert list(written) == ["inaturalist_v2"]
  assert os.listdir(tmp_path) == ["inaturalist_v2"]
  with pytest.raises(models.ModelError, match="unknown model"):
    standin_models.write_standins(str(tmp_path / "x"), tiny=True,
                                  models=["resnet"])


def test_overwrite_replaces_standins_but_never_other_folders(tmp_path):
  path = str(tmp_path / "inaturalist_v2")
  standin_models.write_standins(str(tmp_path), tiny=True,
                                models=["inaturalist_v2"])
  with pytest.raises(FileExistsError, match="--overwrite"):
    standin_models.write_standins(str(tmp_path), tiny=True,
                                  models=["inaturalist_v2"])
  standin_models.write_standins(str(tmp_path), tiny=True,
                                models=["inaturalist_v2"], overwrite=True)
  assert os.path.exists(os.path.join(path, "tfhub_module.pb"))
  # A folder this tool did not write (maybe the real model) is never replaced.
  real = tmp_path / "real" / "fungi_mobile_v1"
  real.mkdir(parents=True)
  (real / "saved_model.pb").write_bytes(b"precious")
  with pytest.raises(FileExistsError, match="not written by this tool"):
    standin_models.write_standins(str(tmp_path / "real"), tiny=True,
                                  models=["fungi_mobile_v1"], overwrite=True)
  assert (real / "saved_model.pb").read_bytes() == b"precious"
  assert not [p for p in os.listdir(tmp_path / "real") if p.startswith(".")]


def test_cli_prints_one_line_per_model_and_the_warning(tmp_path, capsys):
  rc = standins_cli.main(["--output_dir", str(tmp_path), "--tiny",
                            "--models", "inaturalist_v2,inception_resnet_v2"])
  assert rc == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 3
  assert lines[0].startswith("wrote stand-in inaturalist_v2")
  assert lines[1].startswith("wrote stand-in inception_resnet_v2")
  assert "meaningless" in lines[2]
  assert sorted(os.listdir(tmp_path)) == ["inaturalist_v2",
                                          "inception_resnet_v2"]


def test_cli_rejects_unknown_model(tmp_path, capsys):
  assert standins_cli.main(["--output_dir", str(tmp_path), "--tiny",
                              "--models", "nope"]) == 2
  assert "unknown model" in capsys.readouterr().err
