"""transforms/runtimes/onnx.py: which file a model opens, and the check.

Tiny stand-ins in the seeds' three formats are converted by tf2onnx and run
by onnxruntime; TensorFlow's outputs are the reference, within the
tolerance of the model's kind (the conversion itself is
tests/test_runtimes_onnx_convert.py's, the session
tests/test_runtimes_onnx_session.py's).  Conversions are counted by wrapping the
converter (tests/runtime_helpers.py); each test has an ONNX cache of its
own.  The slow tier adds a conversion raced by two processes, a staged file
of other weights and the full-size stand-ins.
"""

import os
import shutil
import subprocess
import sys

import pytest

from tests.runtime_helpers import (  # noqa: F401  (fixtures)
    NAMES, REPO, conversions, loaded_tf, model_root, noise,
    nothing_remembered, onnx_cache, other_root, photos, plant_wrong_onnx,
    resolve, staged_root)
from natvision.transforms import standins as standin_models
from natvision.transforms import models as models_lib
from natvision.transforms import runtimes
from natvision.transforms.runtimes import chooser
from natvision.transforms.runtimes import base as runtimes_base
from natvision.transforms.runtimes import onnx as onnx_lib
from natvision.transforms.runtimes import onnx_convert
from natvision.transforms.runtimes import onnx_session
from natvision.transforms.runtimes import onnx_store


def test_onnx_refuses_a_model_that_differs(model_root, other_root):
  resolved, slot = plant_wrong_onnx(model_root, other_root, "onnx")
  with pytest.raises(models_lib.ModelError) as raised:
    chooser.choose(resolved)
  message = str(raised.value)
  assert "inaturalist_v2" in message
  assert "differ from TensorFlow's by" in message
  assert "tolerance 1e-04" in message and slot in message
  diff = float(message.split("by ")[1].split(" ")[0])
  assert diff > 10 * runtimes.TOLERANCES[models_lib.EMBEDDER]
  # A worker told to run ONNX refuses the same file rather than choosing.
  worker = runtimes.for_model(resolved.with_decision(
      runtimes.RuntimeDecision("onnx", note="")))
  with pytest.raises(models_lib.ModelError, match="differ from TensorFlow"):
    worker.load()
  assert worker.max_diff == pytest.approx(diff, rel=1e-2)


# Slow tier: a second child conversion; the default tier converts once
# in test_runtimes_chooser and reuses a copied folder's file in test_models.
@pytest.mark.slow
def test_conversion_happens_once_per_cache(model_root, onnx_cache,
                                           conversions):
  resolved = resolve(model_root, "inaturalist_v2", requested="onnx")
  first = chooser.choose(resolved)
  assert first.runtime == "onnx" and first.onnx_source == "converted"
  assert os.path.dirname(first.onnx_path) == onnx_cache
  mtime = os.stat(first.onnx_path).st_mtime_ns
  second = chooser.choose(resolved)
  assert second.runtime == "onnx" and second.onnx_source == "cached"
  assert second.onnx_path == first.onnx_path
  assert os.stat(second.onnx_path).st_mtime_ns == mtime
  assert conversions == {"inaturalist_v2": 1}


_CONVERT_SCRIPT = """
import sys
from natvision.transforms import models
from natvision.transforms.runtimes import chooser
from natvision.transforms.runtimes import onnx_convert
count = []
convert = onnx_convert.convert_in_child
def counting(*args, **kwargs):
  count.append(1)
  return convert(*args, **kwargs)
onnx_convert.convert_in_child = counting
(resolved,) = models.resolve_models(["inception_resnet_v2"], sys.argv[1],
                                    requested_runtime="onnx")
decision = chooser.choose(resolved)
print(decision.runtime, decision.onnx_source, len(count))
"""


@pytest.mark.slow
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
  assert sorted(o[0] for o in outputs) == ["onnx", "onnx"]
  assert sorted(o[1] for o in outputs) == ["cached", "converted"]
  assert sorted(int(o[2]) for o in outputs) == [0, 1]
  assert [f for f in os.listdir(onnx_cache) if f.endswith(".onnx")] == [
      os.path.basename(onnx_store.cached_onnx_path(
          resolve(model_root, "inception_resnet_v2"),
          runtimes_base.model_fingerprint(
              os.path.join(model_root, "inception_resnet_v2"))))]


@pytest.mark.slow
def test_staged_file_of_other_weights_is_ignored(model_root, other_root,
                                                 tmp_path):
  root = str(tmp_path / "models")
  shutil.copytree(os.path.join(model_root, "inaturalist_v2"),
                  os.path.join(root, "inaturalist_v2"))
  # Staged from the seed-1 model, then the folder got the seed-0 model.
  onnx_convert.convert_to_onnx(
      resolve(other_root, "inaturalist_v2"),
      os.path.join(root, "inaturalist_v2", onnx_store.STAGED_ONNX))
  decision = chooser.choose(resolve(root, "inaturalist_v2", "onnx"))
  assert decision.runtime == "onnx" and decision.onnx_source == "converted"
  assert decision.max_diff <= decision.tolerance


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_full_size_standins_pass_the_check(tmp_path, photos, name):
  path = str(tmp_path / name)
  standin_models.write_standin(path, name)
  resolved = resolve(str(tmp_path), name, "onnx")
  decision = chooser.choose(resolved)
  assert decision.runtime == "onnx" and decision.max_diff <= decision.tolerance
  worker = runtimes.for_model(resolved.with_decision(decision))
  worker.load()
  assert runtimes.output_difference(
      worker.predict(photos),
      loaded_tf(resolved).predict(photos)) <= decision.tolerance


# --------------------------------------------------------------------------
# convert_missing: every conversion of a run in one child process.


def test_convert_missing_leaves_tf_staged_and_cached_models_alone(
    model_root, staged_root, onnx_cache, session_caches, monkeypatch):
  # The session's conversions of the tiny stand-ins (conftest), cached here.
  session_cache = str(session_caches / "onnx")
  os.makedirs(onnx_cache, exist_ok=True)
  for name in os.listdir(session_cache):
    if name.endswith(".onnx"):
      shutil.copy(os.path.join(session_cache, name), onnx_cache)
  started = []
  monkeypatch.setattr(onnx_convert, "_convert_many_job",
                      lambda *a: started.append(a) or {})
  models = [resolve(model_root, "fungi_mobile_v1"),  # cached
            resolve(staged_root, "inaturalist_v2"),  # staged
            resolve(model_root, "inception_resnet_v2", requested="tf")]
  assert onnx_lib.convert_missing(models) == []
  assert started == []


@pytest.mark.slow  # a child converts two models (TensorFlow starts once)
def test_convert_missing_converts_a_runs_models_in_one_child(
    model_root, onnx_cache, monkeypatch, caplog):
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  pools = []
  real_pool = concurrent.futures.ProcessPoolExecutor

  def counting_pool(*args, **kwargs):
    pools.append(1)
    return real_pool(*args, **kwargs)

  monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor",
                      counting_pool)
  caplog.set_level("INFO", logger="natvision")
  models = [resolve(model_root, "inaturalist_v2"),
            resolve(model_root, "fungi_mobile_v1")]
  assert onnx_lib.convert_missing(models) == ["inaturalist_v2",
                                              "fungi_mobile_v1"]
  assert pools == [1]
  announced = [r.getMessage() for r in caplog.records
               if r.name == "natvision"]
  assert len(announced) == 1
  assert announced[0].startswith("converting 2 model(s) to ONNX in one "
                                 "child process")
  assert announced[0].endswith("s)")  # "(about N s)"
  for resolved in models:
    path = onnx_store.cached_onnx_path(
        resolved, runtimes_base.model_fingerprint(resolved.path))
    session = onnx_session.OnnxSession(resolved, path)
    assert onnx_session.RecordedCheck.from_metadata(
        session.metadata) is not None
  # The chooser then finds them: nothing is converted again.
  assert onnx_lib.convert_missing(models) == []
  decision = chooser.choose(models[0], timing_runs=0)
  assert decision.onnx_source == "cached"
