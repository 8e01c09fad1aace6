"""Writes stand-ins of the three seed models, in the seeds' exact formats.

Why: the iNaturalist and fungi TF1 Hub modules were removed from tfhub.dev in
2024 and cannot be downloaded any more, and Inception-ResNet-V2 is a 200 MB
download.  Tests, benchmarks and demos still need something that loads and
runs exactly like them.  A stand-in is a model folder with

* the seed's format: the legacy TF1 Hub format (a SavedModel with the empty
  tag set, a ``default`` signature taking ``images`` and returning
  ``default``, and a ``tfhub_module.pb`` marker) for ``inaturalist_v2`` and
  ``fungi_mobile_v1``; a TF2 SavedModel whose object is called as
  ``obj(images, training=False)`` for ``inception_resnet_v2``;
* the seed's input (float32 ``[n, 299, 299, 3]`` in [0, 1]) and output width
  (64; a 4128-way softmax plus a ``labelmap.csv``; 1536);
* by default, the seed's architecture (Inception-V4, MobileNetV2 at 299x299,
  Inception-ResNet-V2), so that a benchmark costs what the real model costs;
  with ``--tiny``, a few small layers, so that tests run in seconds, whose
  scales and biases are calibrated on synthetic images so that different
  photos get clearly different outputs (see ``tiny_weights``).

THE OUTPUTS OF A STAND-IN MEAN NOTHING.  Its weights are random (drawn from a
seeded generator, so the same seed gives the same model), not the published
ones: its embeddings carry no information about the photo and its fungi
"species" are placeholders.  Every folder gets a README.txt saying so.  Never
write stand-ins where real copies of the models are kept; this tool refuses to
replace a folder that it did not write itself.

What the networks are is transforms/standin_networks.py's, how the tiny
ones are calibrated transforms/standin_calibration.py's; this module
writes the folders (the formats, README.txt, labelmap.csv) and refuses to
replace a folder it did not write.

The command is tools/standins.py (``natvision-standins``, ``python -m
tools.standins``); the writer is here, in transforms/, because
``natvision-embed --demo`` writes tiny stand-ins too, and pipelines/ never
import tools/.
"""

from __future__ import annotations

import csv
import os
import shutil
from typing import Callable, Dict, Optional, Sequence

from natvision.transforms import models as registry
from natvision.transforms.standin_calibration import tiny_weights
from natvision.transforms.standin_networks import STANDINS, build_network, random_kernels

# The serialized ModuleDef proto of the TF1 Hub format: ``format: FORMAT_V3``
# (field 1, varint 1).  tensorflow_hub 0.16 only checks that the file exists.
TF1_MODULE_DEF = b"\x08\x01"

README = "README.txt"
README_MARKER = "STAND-IN MODEL"
MEANINGLESS = (
    "outputs of stand-in models are meaningless (random weights, not the "
    "published models); use them for tests and benchmarks only")


# --------------------------------------------------------------------------
# Writers.


def _write_tf1_hub(path: str, name: str, tiny: bool, seed: int) -> int:
  """Saves a TF1 Hub format module at ``path``; returns its weight count."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tf_keras  # pylint: disable=import-outside-toplevel

  spec = registry.get_spec(name)
  size = spec.input_size
  calibrated = tiny_weights(name, seed) if tiny else None
  tf_keras.backend.clear_session()  # fresh layer names for every model
  with tf.Graph().as_default() as graph:
    images = tf.compat.v1.placeholder(
        tf.float32, [None, size, size, 3], name=spec.input_key)
    network = build_network(name, tiny)
    outputs = tf.identity(network(images, training=False),
                          name=spec.output_key)
    values = calibrated or random_kernels(network.weights, seed, name)
    # Feeding a variable's initial value replaces Keras' random draw with
    # ours, without adding assign ops to the saved graph.
    feed = {v.initial_value: x for v, x in zip(network.weights, values)
            if x is not None}
    with tf.compat.v1.Session(graph=graph) as sess:
      sess.run(tf.compat.v1.global_variables_initializer(), feed_dict=feed)
      signature = tf.compat.v1.saved_model.predict_signature_def(
          inputs={spec.input_key: images}, outputs={spec.output_key: outputs})
      builder = tf.compat.v1.saved_model.Builder(path)
      builder.add_meta_graph_and_variables(
          sess, tags=[], signature_def_map={spec.signature: signature},
          strip_default_attrs=True)
      builder.save()
    count = network.count_params()
  with open(os.path.join(path, registry.TF1_MODULE_MARKER), "wb") as f:
    f.write(TF1_MODULE_DEF)
  return count


def _write_tf2_saved_model(path: str, name: str, tiny: bool, seed: int) -> int:
  """Saves a callable TF2 SavedModel at ``path``; returns its weight count."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tf_keras  # pylint: disable=import-outside-toplevel

  spec = registry.get_spec(name)
  calibrated = tiny_weights(name, seed) if tiny else None
  tf_keras.backend.clear_session()
  network = build_network(name, tiny)
  values = calibrated or random_kernels(network.weights, seed, name)
  for v, x in zip(network.weights, values):
    if x is not None:
      v.assign(x)

  class StandinModule(tf.Module):
    """``obj(images, training=False)`` -> float32 ``[n, width]``."""

    def __init__(self):
      super().__init__(name=f"standin_{name}")
      # Only the variables are tracked.  Tracking the Keras model itself would
      # make tf.saved_model.save trace every layer, which is 4x slower and
      # adds nothing that hub.load users call.
      self._weights = list(network.weights)
      self._call = network.__call__

    @tf.function
    def __call__(self, images, training=False):
      return self._call(images, training=training)

  module = StandinModule()
  images = tf.TensorSpec([None, spec.input_size, spec.input_size, 3],
                         tf.float32)
  module.__call__.get_concrete_function(images, training=True)
  inference = module.__call__.get_concrete_function(images, training=False)

  @tf.function(input_signature=[images])
  def serve(images):  # pylint: disable=redefined-outer-name
    return {spec.output_key: inference(images)}

  tf.saved_model.save(module, path, signatures={
      "serving_default": serve.get_concrete_function()})
  return network.count_params()


def _write_labelmap(path: str, width: int) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "name"])
    for i in range(width):
      writer.writerow([i, f"standin species {i:04d}"])


def _readme(name: str, tiny: bool, seed: int, params: int) -> str:
  spec = registry.get_spec(name)
  architecture = ("tiny: two small convolutions and a dense head, scaled "
                  "and whitened on synthetic calibration images" if tiny
                  else STANDINS[name].architecture)
  lines = [
      f"{README_MARKER} - NOT THE PUBLISHED MODEL. ITS OUTPUTS MEAN NOTHING.",
      "",
      f"Stand-in for {name}, published at",
      f"  {spec.source}",
      "written by `python -m tools.standins`. Its weights are",
      f"random (seed {seed}); only the format, signature, input shape and",
      "output width match the real model, so that pipelines, tests and",
      "benchmarks run against it. Do not use its outputs for anything.",
      "",
      f"format: {spec.model_format}",
      f"architecture: {architecture}",
      f"weights: {params:,} (random)",
      f"input: float32 [n, {spec.input_size}, {spec.input_size}, 3] in [0, 1]",
      f"output: float32 [n, {spec.output_width}]",
  ]
  if spec.kind == registry.CLASSIFIER:
    lines.append(f"{spec.labelmap}: placeholder names, not species")
  return "\n".join(lines) + "\n"


def _is_standin(path: str) -> bool:
  try:
    with open(os.path.join(path, README), encoding="utf-8") as f:
      return f.read().startswith(README_MARKER)
  except OSError:
    return False


def write_standin(path: str, name: str, tiny: bool = False, seed: int = 0,
                  overwrite: bool = False) -> int:
  """Writes one stand-in at ``path`` (a local folder); returns its weights.

  The folder is written next to ``path`` and renamed into place when
  complete.

  Raises:
    FileExistsError: ``path`` exists and is not empty, and either
      ``overwrite`` is false or the folder was not written by this tool.
  """
  spec = registry.get_spec(name)
  if os.path.exists(path) and os.listdir(path):
    if not overwrite:
      raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    if not _is_standin(path):
      raise FileExistsError(
          f"{path} exists and was not written by this tool (no {README} "
          f"starting with {README_MARKER!r}); refusing to replace what may be "
          f"a real model")
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    if spec.model_format == registry.TF1_HUB:
      params = _write_tf1_hub(tmp, name, tiny, seed)
    else:
      params = _write_tf2_saved_model(tmp, name, tiny, seed)
    if spec.kind == registry.CLASSIFIER:
      _write_labelmap(os.path.join(tmp, spec.labelmap), spec.output_width)
    with open(os.path.join(tmp, README), "w", encoding="utf-8") as f:
      f.write(_readme(name, tiny, seed, params))
    if os.path.exists(path):
      shutil.rmtree(path)
    os.rename(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return params


def write_standins(output_dir: str, tiny: bool = False,
                   models: Optional[Sequence[str]] = None, seed: int = 0,
                   overwrite: bool = False,
                   log: Optional[Callable[[str], None]] = None
                   ) -> Dict[str, str]:
  """Writes stand-ins at ``<output_dir>/<name>/``, ready for --model_root.

  Args:
    output_dir: local folder; created if missing.
    tiny: small networks instead of the real architectures.
    models: registry names; all three when None.
    seed: seeds the random weights; the same seed gives the same outputs.
    overwrite: replace earlier stand-ins (never anything else).
    log: called with one line per model written.

  Returns:
    Registry name -> folder written.
  """
  names = list(models) if models else list(STANDINS)
  for name in names:
    registry.get_spec(name)  # raises ModelError for unknown names
  written = {}
  for name in names:
    path = os.path.join(output_dir, name)
    params = write_standin(path, name, tiny=tiny, seed=seed,
                           overwrite=overwrite)
    written[name] = path
    if log:
      spec = registry.get_spec(name)
      kind = "tiny" if tiny else STANDINS[name].architecture
      log(f"wrote stand-in {name} ({spec.model_format}, {kind}, "
          f"{params:,} random weights, output width {spec.output_width}) "
          f"to {path}")
  return written
