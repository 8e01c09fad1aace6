"""The stock baseline: what a Beam user writes without natvision.

    python -m benchmarks.stock --input 'photos/*.jpg' --output_dir out \\
        --model fungi_mobile_v1 --model_root /tmp/standins_full

Beam's own pieces, each used the way its documentation shows:

* ``fileio.MatchFiles`` + ``fileio.ReadMatches`` to read the photos;
* a ``beam.Map`` that fully decodes each photo with PIL and resizes it,
  ``Image.open(...).convert('RGB').resize((299, 299))``, into a float32
  array in [0, 1];
* ``RunInference`` with a minimal ``ModelHandler`` that loads the model with
  ``hub.load`` and calls the TF1 Hub ``default`` signature or the TF2
  object, wrapped in ``KeyedModelHandler`` to carry the file name;
* a ``beam.Map`` to one dict per photo (the top-5 classes of a classifier,
  or the embedding) and ``beam.io.WriteToParquet``.

With several models (``--model a,b``) the photos are decoded once and fed
to one ``RunInference`` per model.

Batches are fixed at ``--batch_size`` (16, natvision's default) so that the
comparison is about everything but the batch size.  No error handling, no
routing, no metadata: a photo that fails stops the job.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import time
from typing import Any, Dict, Iterable, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.ml.inference.base import (KeyedModelHandler, ModelHandler,
                                           PredictionResult, RunInference)
from apache_beam.options.pipeline_options import PipelineOptions

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TOP_K = 5


class TFHubModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
  """Loads a TF Hub model with ``hub.load`` and calls it on stacked batches.

  Args:
    path: the model folder.
    signature: the TF1 Hub signature to call (``default``), or None to call
      the TF2 SavedModel object itself.
    input_key, output_key: the signature's input and output names.
    batch_size: photos per forward pass.
  """

  def __init__(self, path: str, signature: Optional[str] = "default",
               input_key: str = "images", output_key: str = "default",
               batch_size: int = 16):
    super().__init__()
    self._path = path
    self._signature = signature
    self._input_key = input_key
    self._output_key = output_key
    self._batch_size = batch_size

  def load_model(self):
    import tensorflow_hub as hub  # pylint: disable=import-outside-toplevel
    return hub.load(self._path)

  def run_inference(self, batch: Sequence[np.ndarray], model,
                    inference_args: Optional[Dict[str, Any]] = None
                    ) -> Iterable[PredictionResult]:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    images = tf.constant(np.stack(batch))
    if self._signature:
      fn = model.signatures[self._signature]
      outputs = fn(**{self._input_key: images})[self._output_key]
    else:
      outputs = model(images, training=False)
    return [PredictionResult(x, y) for x, y in zip(batch, outputs.numpy())]

  def batch_elements_kwargs(self) -> Dict[str, Any]:
    return {"min_batch_size": self._batch_size,
            "max_batch_size": self._batch_size}


def decode_and_resize(readable_file) -> tuple:
  """Full PIL decode and resize, the usual way: ``(path, float32 array)``."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  image = Image.open(io.BytesIO(readable_file.read())).convert("RGB")
  image = image.resize((299, 299))
  return readable_file.metadata.path, np.asarray(image, np.float32) / 255.0


def to_row(keyed: tuple, model_name: str, classifier: bool) -> dict:
  path, result = keyed
  values = np.asarray(result.inference, np.float32)
  if classifier:
    ids = np.argsort(-values)[:TOP_K]
    return {"uri": path, "model": model_name,
            "label_ids": ids.astype(np.int32).tolist(),
            "scores": values[ids].tolist()}
  return {"uri": path, "model": model_name, "embedding": values.tolist()}


def schema(classifier: bool):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  fields = [("uri", pa.string()), ("model", pa.string())]
  if classifier:
    fields += [("label_ids", pa.list_(pa.int32())),
               ("scores", pa.list_(pa.float32()))]
  else:
    fields += [("embedding", pa.list_(pa.float32()))]
  return pa.schema(fields)


def build(p: beam.Pipeline, pattern: str, output_dir: str,
          model_names: Sequence[str], model_root: str, batch_size: int = 16):
  """Adds the stock graph to ``p``: one decode, then one branch per model."""
  from natvision.transforms import models as models_lib  # pylint: disable=import-outside-toplevel
  images = (p
            | "Match" >> fileio.MatchFiles(pattern)
            | "Read" >> fileio.ReadMatches()
            | "DecodeResize" >> beam.Map(decode_and_resize))
  for name in model_names:
    spec = models_lib.get_spec(name)
    classifier = spec.kind == models_lib.CLASSIFIER
    handler = TFHubModelHandler(os.path.join(model_root, name),
                                spec.signature, spec.input_key,
                                spec.output_key, batch_size)
    _ = (images
         | f"RunInference[{name}]" >> RunInference(KeyedModelHandler(handler))
         | f"ToRow[{name}]" >> beam.Map(to_row, name, classifier)
         | f"Write[{name}]" >> beam.io.WriteToParquet(
             os.path.join(output_dir, name, "part"), schema(classifier),
             file_name_suffix=".parquet"))


def count_rows(output_dir: str, model_name: str) -> int:
  import glob  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  return sum(pq.ParquetFile(f).metadata.num_rows for f in glob.glob(
      os.path.join(output_dir, model_name, "part*.parquet")))


def run(argv: Optional[Sequence[str]] = None) -> dict:
  """Runs the stock job; returns ``{"rows": {...}, "elapsed_s": ...}``."""
  parser = argparse.ArgumentParser(prog="python -m benchmarks.stock",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--input", required=True, help="glob of photos")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--model", required=True,
                      help="registry name; comma-separated for several")
  parser.add_argument("--model_root", required=True)
  parser.add_argument("--batch_size", type=int, default=16)
  args, beam_args = parser.parse_known_args(argv)
  names = [n for n in args.model.split(",") if n]
  start = time.time()
  with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
    build(p, args.input, args.output_dir, names, args.model_root,
          args.batch_size)
  elapsed = time.time() - start
  report = {"elapsed_s": round(elapsed, 3),
            "rows": {n: count_rows(args.output_dir, n) for n in names}}
  print(report, flush=True)
  return report


def main(argv: Optional[Sequence[str]] = None) -> int:
  logging.basicConfig(level=logging.WARNING)
  run(argv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
