"""Runtimes: the interface, conversion, the check, caching, staging, the choice.

Real models throughout: tiny stand-ins in the seeds' three formats, converted
by tf2onnx and run by onnxruntime; TensorFlow's outputs are the reference.
Which runtime is faster is fixed by the probe timings recorded in a file
(rewritten by ``_record``), or, for a file that records none, by a fake
clock that the runtimes' predict advances, as Beam's RunInference tests do,
so the choice of ``auto`` is asserted both ways.  Conversions are counted by
wrapping the converter (in this process and the child-process one) here.
"""

import functools
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from pipelines import launch
from tools import standins as standin_models
from tools import stage_onnx
from transforms import models as models_lib
from transforms import runtimes
from transforms.runtimes import chooser
from transforms.runtimes import onnx as onnx_lib

NAMES = ("inaturalist_v2", "fungi_mobile_v1", "inception_resnet_v2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_root(tiny_models):
  """Tiny stand-ins of the three seeds (seed 0); tests must not modify them.

  Each test here gets an empty ONNX cache of its own (``onnx_cache``), so
  the session's converted files of these models are not seen.
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
  stage_onnx.stage_onnx(_resolve(root, "inaturalist_v2"))
  staged = os.path.join(root, "inaturalist_v2", onnx_lib.STAGED_ONNX)
  _record(staged, staged, tf_seconds=0.2, onnx_seconds=0.1)  # ONNX faster
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

  monkeypatch.setattr(onnx_lib, "convert_to_onnx",
                      counting(onnx_lib.convert_to_onnx))
  monkeypatch.setattr(onnx_lib, "convert_in_child",
                      counting(onnx_lib.convert_in_child))
  return counts


def _counting(cls, opened):
  """``cls`` that appends the path of each instance it makes to ``opened``."""

  def make(resolved, path, *args, **kwargs):
    opened.append(path)
    return cls(resolved, path, *args, **kwargs)

  return make


def _record(source, target, tf_seconds=None, onnx_seconds=None, drop=False):
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
    if key == onnx_lib.METADATA_CHECK:
      if drop:
        continue
      record = json.loads(value)
      record.update(tf_seconds=tf_seconds, onnx_seconds=onnx_seconds)
      value = json.dumps(record)
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value
  onnx.save(proto, target)


class FakeClock:
  """A clock that stands still until a runtime's predict advances it."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _slowed(monkeypatch, clock, tf_seconds, onnx_seconds):
  """Makes each predict of TF and ONNX take the given seconds on ``clock``."""
  for cls, seconds in ((runtimes.TFRuntime, tf_seconds),
                       (runtimes.OnnxRuntime, onnx_seconds)):

    def predict(self, batch, _original=cls.predict, _seconds=seconds):
      clock.now += _seconds
      return _original(self, batch)

    monkeypatch.setattr(cls, "predict", predict)


@pytest.fixture(scope="module")
def photos():
  """Real photos (scikit-image's astronaut and coffee), squashed to 299."""
  import skimage  # pylint: disable=import-outside-toplevel
  data = os.path.join(os.path.dirname(skimage.__file__), "data")
  return np.stack([
      np.asarray(Image.open(os.path.join(data, name)).convert("RGB").resize(
          (299, 299), Image.BILINEAR))
      for name in ("astronaut.png", "coffee.png")])


def _resolve(root, name, requested="auto"):
  (resolved,) = models_lib.resolve_models([name], root,
                                          requested_runtime=requested)
  return resolved


def _noise(n, seed=3):
  return np.random.default_rng(seed).integers(0, 256, (n, 299, 299, 3),
                                              dtype=np.uint8)


def _loaded_tf(resolved):
  tf_runtime = runtimes.TFRuntime(resolved)
  tf_runtime.load()
  return tf_runtime


def test_probe_batch_is_fixed_and_varied():
  probe = runtimes.probe_batch()
  assert probe.shape == (runtimes.PROBE_SIZE, 299, 299, 3)
  assert probe.dtype == np.uint8
  np.testing.assert_array_equal(probe, runtimes.probe_batch())
  for i in range(len(probe)):
    assert probe[i].min() < 30 and probe[i].max() > 225
    for j in range(i):
      assert not np.array_equal(probe[i], probe[j])


def test_best_time_reads_the_clock_around_each_call():
  clock = FakeClock()
  costs = iter([0.5, 0.2, 0.3])

  def predict(batch):
    clock.now += next(costs)
    return batch

  assert chooser.best_time(predict, np.zeros(1), 3, clock) == pytest.approx(0.2)


def test_a_decision_names_tf_or_onnx_never_auto():
  with pytest.raises(ValueError, match="auto is a request"):
    runtimes.RuntimeDecision("auto", note="")
  decision = runtimes.RuntimeDecision("onnx", note="n", max_diff=1e-6)
  assert decision.as_dict()["runtime"] == "onnx"
  with pytest.raises(AttributeError):
    decision.runtime = "tf"  # frozen


def test_unknown_runtime_is_refused(model_root):
  with pytest.raises(models_lib.ModelError, match="--runtime must be one of"):
    _resolve(model_root, "fungi_mobile_v1", requested="tensorrt")


def test_workers_get_the_decided_runtime_or_refuse(model_root):
  resolved = _resolve(model_root, "fungi_mobile_v1")
  assert resolved.runtime is None and resolved.decision is None
  with pytest.raises(ValueError, match="no runtime decision"):
    runtimes.for_model(resolved)
  on_tf = resolved.with_decision(runtimes.RuntimeDecision("tf", note="t"))
  on_onnx = resolved.with_decision(runtimes.RuntimeDecision("onnx", note="o"))
  assert isinstance(runtimes.for_model(on_tf), runtimes.TFRuntime)
  assert isinstance(runtimes.for_model(on_onnx), runtimes.OnnxRuntime)
  assert on_onnx.runtime == "onnx" and on_onnx.requested_runtime == "auto"
  assert on_onnx.describe()["runtime"] == "onnx"
  assert on_onnx.describe()["runtime_note"] == "o"
  with pytest.raises(TypeError):
    resolved.with_decision("onnx")


@pytest.mark.parametrize("name", NAMES)
def test_conversion_matches_tf_on_photos_and_noise(model_root, photos, tmp_path,
                                                   name):
  resolved = _resolve(model_root, name)
  tf_runtime = _loaded_tf(resolved)
  path = onnx_lib.convert_to_onnx(resolved, str(tmp_path / "m.onnx"),
                                  tf_runtime)
  assert os.listdir(tmp_path) == ["m.onnx"]  # no temporary file left behind
  assert "TF2ONNX_CATCH_ERRORS" not in os.environ  # restored
  session = onnx_lib.OnnxSession(resolved, path)
  assert session.metadata["natvision_fingerprint"] == (
      onnx_lib.model_fingerprint(model_root + "/" + name))
  tolerance = runtimes.TOLERANCES[resolved.spec.kind]
  # The batch dimension is dynamic: 1, 2 and 3 photos through one file.
  diffs = []
  for batch in (photos, photos[:1], _noise(3)):
    expected = tf_runtime.predict(batch)
    got = session.predict(batch)
    assert got.dtype == np.float32
    assert got.shape == (len(batch), resolved.spec.output_width)
    diffs.append(runtimes.output_difference(got, expected))
    assert diffs[-1] <= tolerance
  # The two photos' outputs differ far more than the runtimes do, so the
  # comparison is not trivially passed.
  out = session.predict(photos)
  assert np.abs(out[0] - out[1]).max() > 100 * max(diffs)


def test_uint8_and_float_inputs_agree(model_root, photos, tmp_path):
  resolved = _resolve(model_root, "inception_resnet_v2")
  path = onnx_lib.convert_to_onnx(resolved, str(tmp_path / "m.onnx"))
  session = onnx_lib.OnnxSession(resolved, path, intra_op_threads=1)
  np.testing.assert_allclose(
      session.predict(photos),
      session.predict(photos.astype(np.float32) / 255), rtol=1e-6,
      atol=1e-6)


def test_one_session_serves_many_threads(model_root, tmp_path):
  resolved = _resolve(model_root, "fungi_mobile_v1")
  session = onnx_lib.OnnxSession(
      resolved, onnx_lib.convert_to_onnx(resolved, str(tmp_path / "m.onnx")))
  batches = [_noise(2, seed) for seed in range(6)]
  expected = [session.predict(b) for b in batches]
  results = [None] * len(batches)

  def work(i):
    for _ in range(3):
      results[i] = session.predict(batches[i])

  threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for got, want in zip(results, expected):
    np.testing.assert_array_equal(got, want)


# One model in the default tier; each conversion starts a child process.
@pytest.mark.parametrize("name", [
    "inaturalist_v2",
    pytest.param("fungi_mobile_v1", marks=pytest.mark.slow),
    pytest.param("inception_resnet_v2", marks=pytest.mark.slow)])
def test_auto_picks_onnx_when_it_passes_and_workers_run_it(model_root, photos,
                                                           name, conversions,
                                                           monkeypatch):
  resolved = _resolve(model_root, name)
  decision = chooser.choose(resolved, timing_runs=0)
  assert decision.runtime == "onnx"
  assert decision.onnx_source == "converted"
  assert 0 <= decision.max_diff <= decision.tolerance
  assert decision.max_diff == decision.onnx_max_diff
  assert decision.fallback is None and decision.tf_seconds is None
  assert decision.fingerprint == onnx_lib.model_fingerprint(resolved.path)
  assert decision.note.startswith("ONNX Runtime; max difference from "
                                  "TensorFlow on the probe batch")
  assert decision.checked_against == "recorded"  # at the conversion
  # A worker of this process takes over the launcher's checked session:
  # no file is opened again.
  opened = []
  monkeypatch.setattr(onnx_lib, "OnnxSession", _counting(
      onnx_lib.OnnxSession, opened))
  worker = runtimes.for_model(resolved.with_decision(decision))
  worker.load()
  assert isinstance(worker, runtimes.OnnxRuntime)
  assert opened == [] and worker.path == decision.onnx_path
  # A worker of another process finds the launcher's file and checks it
  # against the TF outputs it records.
  runtimes.forget()
  elsewhere = runtimes.for_model(resolved.with_decision(decision))
  elsewhere.load()
  assert elsewhere.source == "converted"  # the decision's word for it
  assert elsewhere.path == decision.onnx_path
  assert elsewhere.checked_against == "recorded"
  assert elsewhere.max_diff == pytest.approx(decision.max_diff)
  assert elsewhere.describe()["onnx_source"] == "converted"
  assert opened == [decision.onnx_path]
  assert conversions == {name: 1}
  tf_out = _loaded_tf(resolved).predict(photos)
  assert runtimes.output_difference(worker.predict(photos),
                                    tf_out) <= decision.tolerance


def _staged_copy(staged_root, tmp_path, **record):
  """inaturalist_v2 and its staged file, with ``_record(**record)`` applied."""
  root = str(tmp_path / "models")
  shutil.copytree(os.path.join(staged_root, "inaturalist_v2"),
                  os.path.join(root, "inaturalist_v2"))
  staged = os.path.join(root, "inaturalist_v2", onnx_lib.STAGED_ONNX)
  _record(staged, staged, **record)
  return root


@pytest.fixture
def tf_loads(monkeypatch):
  """Counts models loaded on TensorFlow in this process."""
  loads = []
  load = models_lib.load_model

  def counting(resolved, *args, **kwargs):
    loads.append(resolved.name)
    return load(resolved, *args, **kwargs)

  monkeypatch.setattr(models_lib, "load_model", counting)
  return loads


def test_auto_keeps_onnx_when_the_recorded_timings_say_it_is_faster(
    staged_root, tmp_path, tf_loads):
  root = _staged_copy(staged_root, tmp_path, tf_seconds=0.2,
                      onnx_seconds=0.05)
  decision = chooser.choose(_resolve(root, "inaturalist_v2"), timing_runs=3)
  assert decision.runtime == "onnx" and decision.fallback is None
  assert decision.tf_seconds == pytest.approx(0.2)
  assert decision.onnx_seconds == pytest.approx(0.05)
  assert decision.timed == "recorded" and decision.onnx_source == "staged"
  assert decision.checked_against == "recorded"
  assert decision.note.endswith("probe batch 0.050 s vs TensorFlow 0.200 s "
                                "(timed when the file was made)")
  assert tf_loads == []  # checked and timed without TensorFlow


@pytest.mark.parametrize("live_tf,live_onnx,runtime",
                         [(0.1, 0.3, "tf"), (0.3, 0.1, "onnx")])
def test_recorded_timings_that_favour_tf_are_timed_again(
    staged_root, tmp_path, monkeypatch, tf_loads, live_tf, live_onnx,
    runtime):
  root = _staged_copy(staged_root, tmp_path, tf_seconds=0.1, onnx_seconds=0.3)
  clock = FakeClock()
  _slowed(monkeypatch, clock, tf_seconds=live_tf, onnx_seconds=live_onnx)
  decision = chooser.choose(_resolve(root, "inaturalist_v2"), clock=clock)
  assert decision.runtime == runtime and decision.timed == "here"
  assert (decision.tf_seconds, decision.onnx_seconds) == pytest.approx(
      (live_tf, live_onnx))
  assert decision.checked_against == "recorded"
  assert tf_loads == ["inaturalist_v2"]  # once, to time it
  if runtime == "tf":
    assert decision.max_diff == 0.0
    assert decision.fallback == ("TF ran the probe batch in 0.100 s, ONNX "
                                 "Runtime in 0.300 s")
    assert decision.note == ("TensorFlow; ONNX Runtime not used: "
                             + decision.fallback)
    # The check still ran and is recorded.
    assert decision.onnx_max_diff <= decision.tolerance
  else:
    assert decision.fallback is None


def test_a_tie_keeps_tf(staged_root, tmp_path, monkeypatch):
  root = _staged_copy(staged_root, tmp_path, tf_seconds=0.25,
                      onnx_seconds=0.25)
  clock = FakeClock()
  _slowed(monkeypatch, clock, tf_seconds=0.25, onnx_seconds=0.25)
  decision = chooser.choose(_resolve(root, "inaturalist_v2"), clock=clock)
  assert decision.runtime == "tf" and "TF ran the probe" in decision.fallback


@pytest.mark.parametrize("tf_seconds,onnx_seconds,runtime",
                         [(0.2, 0.05, "onnx"), (0.1, 0.3, "tf")])
def test_a_file_without_a_recorded_check_is_checked_and_timed_here(
    staged_root, tmp_path, monkeypatch, tf_loads, tf_seconds, onnx_seconds,
    runtime):
  root = _staged_copy(staged_root, tmp_path, drop=True)
  clock = FakeClock()
  _slowed(monkeypatch, clock, tf_seconds=tf_seconds, onnx_seconds=onnx_seconds)
  decision = chooser.choose(_resolve(root, "inaturalist_v2"), timing_runs=3,
                            clock=clock)
  assert decision.runtime == runtime and decision.timed == "here"
  assert decision.checked_against == "tf"
  assert (decision.tf_seconds, decision.onnx_seconds) == pytest.approx(
      (tf_seconds, onnx_seconds))
  assert decision.onnx_max_diff <= decision.tolerance
  assert tf_loads == ["inaturalist_v2"]  # once, for the check and the timing


def test_requested_onnx_is_not_timed(staged_root, monkeypatch):
  clock = FakeClock()
  _slowed(monkeypatch, clock, tf_seconds=0.1, onnx_seconds=9.0)
  decision = chooser.choose(
      _resolve(staged_root, "inaturalist_v2", requested="onnx"), clock=clock)
  assert decision.runtime == "onnx" and decision.onnx_seconds is None


def test_requested_tf_converts_nothing(model_root, onnx_cache, conversions):
  decision = chooser.choose(
      _resolve(model_root, "fungi_mobile_v1", requested="tf"))
  assert decision.runtime == "tf" and decision.max_diff == 0.0
  assert decision.note == "TensorFlow, as --runtime tf asked"
  assert decision.onnx_max_diff is None and decision.tolerance is None
  assert conversions == {}
  assert not os.path.exists(onnx_cache)


def test_check_models_attaches_the_decisions(staged_root, model_root,
                                             monkeypatch):
  clock = FakeClock()
  _slowed(monkeypatch, clock, tf_seconds=0.2, onnx_seconds=0.1)
  models = (_resolve(staged_root, "inaturalist_v2"),
            _resolve(model_root, "fungi_mobile_v1", requested="tf"))
  assert [m.runtime for m in models] == [None, None]
  checked = launch.check_models(
      models, choose=functools.partial(chooser.choose, clock=clock))
  assert [m.runtime for m in checked] == ["onnx", "tf"]
  assert [m.requested_runtime for m in checked] == ["auto", "tf"]
  assert checked[0].decision.onnx_source == "staged"
  assert checked[1].runtime_note == "TensorFlow, as --runtime tf asked"


def test_conversion_happens_once_per_cache(model_root, onnx_cache,
                                           conversions):
  resolved = _resolve(model_root, "inaturalist_v2", requested="onnx")
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
from transforms import models
from transforms.runtimes import chooser
from transforms.runtimes import onnx as onnx_lib
count = []
convert = onnx_lib.convert_in_child
def counting(*args, **kwargs):
  count.append(1)
  return convert(*args, **kwargs)
onnx_lib.convert_in_child = counting
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
      os.path.basename(onnx_lib.cached_onnx_path(
          _resolve(model_root, "inception_resnet_v2"),
          onnx_lib.model_fingerprint(
              os.path.join(model_root, "inception_resnet_v2"))))]


def _plant_wrong_onnx(model_root, other_root, requested):
  """Converts the seed-1 model into the cache slot of the seed-0 model."""
  resolved = _resolve(model_root, "inaturalist_v2", requested)
  slot = onnx_lib.cached_onnx_path(
      resolved, onnx_lib.model_fingerprint(resolved.path))
  onnx_lib.convert_to_onnx(_resolve(other_root, "inaturalist_v2"), slot)
  return resolved, slot


def test_onnx_refuses_a_model_that_differs(model_root, other_root):
  resolved, slot = _plant_wrong_onnx(model_root, other_root, "onnx")
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


def test_auto_falls_back_to_tf_when_the_check_fails(model_root, other_root):
  resolved, _ = _plant_wrong_onnx(model_root, other_root, "auto")
  decision = chooser.choose(resolved)
  assert decision.runtime == "tf" and decision.max_diff == 0.0
  assert decision.onnx_max_diff > decision.tolerance
  assert "differ from TensorFlow's" in decision.fallback
  assert decision.tf_seconds is None  # not timed once the check failed
  assert isinstance(runtimes.for_model(resolved.with_decision(decision)),
                    runtimes.TFRuntime)


def test_staging_cli_writes_a_file_that_workers_use(model_root, tmp_path,
                                                    capsys, conversions):
  root = str(tmp_path / "models")
  for name in ("inaturalist_v2", "inception_resnet_v2"):
    shutil.copytree(os.path.join(model_root, name), os.path.join(root, name))
  args = ["--model_root", root,
          "--models", "inaturalist_v2,inception_resnet_v2"]
  assert stage_onnx.main(args) == 0
  assert "staged inaturalist_v2" in capsys.readouterr().out
  assert conversions == {"inaturalist_v2": 1, "inception_resnet_v2": 1}
  for name in ("inaturalist_v2", "inception_resnet_v2"):
    staged = os.path.join(root, name, onnx_lib.STAGED_ONNX)
    assert os.path.exists(staged)
    decision = chooser.choose(_resolve(root, name, "onnx"))
    assert decision.runtime == "onnx" and decision.onnx_source == "staged"
    assert decision.onnx_path == staged
  assert conversions == {"inaturalist_v2": 1, "inception_resnet_v2": 1}
  # A second staging does not replace the files unless asked to.
  assert stage_onnx.main(args) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert stage_onnx.main(args[:-1] + ["inaturalist_v2", "--overwrite"]) == 0
  assert conversions["inaturalist_v2"] == 2


@pytest.mark.slow
def test_staged_file_of_other_weights_is_ignored(model_root, other_root,
                                                 tmp_path):
  root = str(tmp_path / "models")
  shutil.copytree(os.path.join(model_root, "inaturalist_v2"),
                  os.path.join(root, "inaturalist_v2"))
  # Staged from the seed-1 model, then the folder got the seed-0 model.
  onnx_lib.convert_to_onnx(
      _resolve(other_root, "inaturalist_v2"),
      os.path.join(root, "inaturalist_v2", onnx_lib.STAGED_ONNX))
  decision = chooser.choose(_resolve(root, "inaturalist_v2", "onnx"))
  assert decision.runtime == "onnx" and decision.onnx_source == "converted"
  assert decision.max_diff <= decision.tolerance


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_full_size_standins_pass_the_check(tmp_path, photos, name):
  path = str(tmp_path / name)
  standin_models.write_standin(path, name)
  resolved = _resolve(str(tmp_path), name, "onnx")
  decision = chooser.choose(resolved)
  assert decision.runtime == "onnx" and decision.max_diff <= decision.tolerance
  worker = runtimes.for_model(resolved.with_decision(decision))
  worker.load()
  assert runtimes.output_difference(
      worker.predict(photos),
      _loaded_tf(resolved).predict(photos)) <= decision.tolerance
