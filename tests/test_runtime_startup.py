"""Start-up: what the launcher and an ONNX-only worker load, and how often.

* A launcher converting a model (in a child process) and checking it
  against the TensorFlow outputs the file records never imports TensorFlow
  itself; neither does a worker of another process that then runs the
  decided ONNX model through ``inference.RunModel``: both run in a fresh
  subprocess here, which reports ``sys.modules``.
* The worker's outputs equal TensorFlow's (computed here) within the
  tolerance, and it opened the very file the launcher checked.
* A recorded check is what the file says: TensorFlow's outputs on the probe
  batch, equal to TensorFlow's run here.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from natvision.transforms import models as models_lib
from natvision.transforms import runtimes
from natvision.transforms.runtimes import onnx_convert
from natvision.transforms.runtimes import onnx_session

# Slow tier: fresh interpreters that must not import TensorFlow.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import json, os, sys
import numpy as np
import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from natvision.transforms import inference, models, runtimes
from natvision.transforms.records import ImageRef, PreparedImage
from natvision.transforms.runtimes import chooser

root, out_path = sys.argv[1], sys.argv[2]
(resolved,) = models.resolve_models(["fungi_mobile_v1"], root,
                                    requested_runtime="onnx")
decision = chooser.choose(resolved)
launcher_tf = "tensorflow" in sys.modules
runtimes.forget()  # a worker of another process: nothing left loaded
decided = resolved.with_decision(decision)
batch = np.load(os.path.join(os.path.dirname(out_path), "batch.npy"))
prepared = [PreparedImage(ref=ImageRef(image_id=str(i), uri=f"p{i}"),
                          arrays={decided.resize: batch[i]}, source_width=299,
                          source_height=299, decoded_width=299,
                          decoded_height=299) for i in range(len(batch))]
rows_path = out_path + ".rows"

def write_row(r):
  with open(rows_path, "a") as f:
    f.write(json.dumps([r.ref.image_id, r.label_ids.tolist(),
                        r.scores.tolist()]) + "\n")

with TestPipeline() as p:
  outputs = (p | beam.Create(prepared)
             | inference.RunModel(inference.InferenceConfig(decided,
                                                            batch_size=2)))
  _ = outputs.results | beam.FlatMap(lambda batch: batch) | beam.Map(
      write_row)
with open(rows_path) as f:
  rows = [json.loads(line) for line in f]
with open(out_path, "w") as f:
  json.dump({"launcher_tf": launcher_tf,
             "worker_tf": "tensorflow" in sys.modules,
             "decision": decision.as_dict(), "rows": sorted(rows)}, f)
"""


@pytest.fixture(scope="module")
def fungi_root(tmp_path_factory):
  from natvision.transforms import standins  # pylint: disable=import-outside-toplevel
  root = str(tmp_path_factory.mktemp("startup_models"))
  standins.write_standins(root, tiny=True, models=["fungi_mobile_v1"])
  return root


def test_launcher_and_onnx_worker_never_import_tensorflow(fungi_root,
                                                          tmp_path):
  batch = np.random.default_rng(5).integers(0, 256, (5, 299, 299, 3),
                                            dtype=np.uint8)
  np.save(tmp_path / "batch.npy", batch)
  out = tmp_path / "result.json"
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3",
             NATVISION_ONNX_CACHE=str(tmp_path / "cache"))
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, fungi_root, str(out)],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    result = json.load(f)
  assert result["launcher_tf"] is False
  assert result["worker_tf"] is False
  decision = result["decision"]
  assert decision["runtime"] == "onnx"
  assert decision["onnx_source"] == "converted"
  assert decision["checked_against"] == "recorded"
  assert decision["max_diff"] <= decision["tolerance"]
  assert os.path.dirname(decision["onnx_path"]) == str(tmp_path / "cache")

  # The worker's rows are TensorFlow's top-5, within the tolerance.
  (resolved,) = models_lib.resolve_models(["fungi_mobile_v1"], fungi_root,
                                          requested_runtime="tf")
  reference = runtimes.TFRuntime(resolved)
  reference.load()
  expected = reference.predict(batch)
  rows = result["rows"]
  assert [r[0] for r in rows] == [str(i) for i in range(len(batch))]
  for i, ids, scores in rows:
    want = expected[int(i)]
    np.testing.assert_allclose(scores, want[ids], atol=decision["tolerance"])
    assert ids[0] == int(np.argmax(want))


def test_the_recorded_check_is_tensorflows_outputs(fungi_root, tmp_path):
  (resolved,) = models_lib.resolve_models(["fungi_mobile_v1"], fungi_root)
  reference = runtimes.TFRuntime(resolved)
  reference.load()
  path = onnx_convert.convert_to_onnx(resolved, str(tmp_path / "m.onnx"),
                                  reference, timing_runs=1)
  session = onnx_session.OnnxSession(resolved, path)
  recorded = onnx_session.RecordedCheck.from_metadata(session.metadata)
  probe = runtimes.probe_batch(resolved.spec.input_size)
  np.testing.assert_array_equal(recorded.reference, reference.predict(probe))
  assert recorded.max_diff == runtimes.output_difference(
      session.predict(probe), reference.predict(probe))
  assert recorded.tolerance == runtimes.TOLERANCES["classifier"]
  assert recorded.tf_seconds > 0 and recorded.onnx_seconds > 0
  assert session.metadata[onnx_session.METADATA_PRECISION] == "fp32"
