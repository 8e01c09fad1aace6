"""transforms/runtimes/chooser.py: the launcher's choice of runtime per model.

``choose`` turns auto, tf or onnx into a decision: ONNX Runtime when it
passes the check and is faster, otherwise TensorFlow with the reason.  Real
tiny models throughout (tests/runtime_helpers.py); which runtime is faster
is fixed by the probe timings recorded in a file, or by a fake clock that
the runtimes' predict advances, so the choice of ``auto`` is asserted both
ways.  Also here: the launcher attaching the decisions
(``launch.check_models``).
"""

import dataclasses
import functools
import os
import subprocess
import sys

import pytest

from natvision.pipelines import launch
from tests.runtime_helpers import (  # noqa: F401  (fixtures)
    FakeClock, conversions, counting_opens, loaded_tf, model_root,
    nothing_remembered, onnx_cache, other_root, photos, plant_wrong_onnx,
    resolve, slowed, staged_copy, staged_root, tf_loads)
from natvision.transforms import runtimes
from natvision.transforms.runtimes import chooser
from natvision.transforms.runtimes import base as runtimes_base
from natvision.transforms.runtimes import onnx as onnx_lib


# One model in the default tier; each conversion starts a child process.
@pytest.mark.parametrize("name", [
    "inaturalist_v2",
    pytest.param("fungi_mobile_v1", marks=pytest.mark.slow),
    pytest.param("inception_resnet_v2", marks=pytest.mark.slow)])
def test_auto_picks_onnx_when_it_passes_and_workers_run_it(model_root, photos,
                                                           name, conversions,
                                                           monkeypatch):
  resolved = resolve(model_root, name)
  decision = chooser.choose(resolved, timing_runs=0)
  assert decision.runtime == "onnx"
  assert decision.onnx_source == "converted"
  assert 0 <= decision.max_diff <= decision.tolerance
  assert decision.max_diff == decision.onnx_max_diff
  assert decision.fallback is None and decision.tf_seconds is None
  assert decision.fingerprint == runtimes_base.model_fingerprint(resolved.path)
  assert decision.note.startswith("ONNX Runtime; max difference from "
                                  "TensorFlow on the probe batch")
  assert decision.checked_against == "recorded"  # at the conversion
  # A worker of this process takes over the launcher's checked session:
  # no file is opened again.
  opened = []
  monkeypatch.setattr(onnx_lib, "OnnxSession", counting_opens(
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
  tf_out = loaded_tf(resolved).predict(photos)
  assert runtimes.output_difference(worker.predict(photos),
                                    tf_out) <= decision.tolerance


RECORDED_NOTE = (" (timed when the ONNX file was made; --retime_runtimes "
                 "times them again here)")


def _reason_lines(caplog):
  return [r.getMessage() for r in caplog.records
          if r.name == "natvision" and " runs on " in r.getMessage()]


def test_auto_keeps_onnx_when_the_recorded_timings_say_it_is_faster(
    staged_root, tmp_path, tf_loads, caplog):
  caplog.set_level("INFO", logger="natvision")
  root = staged_copy(staged_root, tmp_path, tf_seconds=0.2,
                     onnx_seconds=0.05)
  decision = chooser.choose(resolve(root, "inaturalist_v2"), timing_runs=3)
  assert decision.runtime == "onnx" and decision.fallback is None
  assert decision.tf_seconds == pytest.approx(0.2)
  assert decision.onnx_seconds == pytest.approx(0.05)
  assert decision.timed == "recorded" and decision.onnx_source == "staged"
  assert decision.checked_against == "recorded"
  assert decision.note.endswith("probe batch 0.050 s vs TensorFlow 0.200 s"
                                + RECORDED_NOTE)
  assert tf_loads == []  # checked and timed without TensorFlow
  (line,) = _reason_lines(caplog)
  assert line.startswith("model inaturalist_v2 runs on ONNX Runtime "
                         "(--runtime auto): ONNX Runtime matched "
                         "TensorFlow's outputs recorded in the file within ")
  assert line.endswith("probe batch 0.050 s vs TensorFlow 0.200 s"
                       + RECORDED_NOTE)


def test_recorded_timings_that_favour_tf_decide_without_timing_again(
    staged_root, tmp_path, monkeypatch, tf_loads, caplog):
  caplog.set_level("INFO", logger="natvision")
  root = staged_copy(staged_root, tmp_path, tf_seconds=0.1, onnx_seconds=0.3)
  clock = FakeClock()
  # Timed here, ONNX Runtime would win: the record decides instead.
  slowed(monkeypatch, clock, tf_seconds=0.3, onnx_seconds=0.1)
  decision = chooser.choose(resolve(root, "inaturalist_v2"), clock=clock)
  assert decision.runtime == "tf" and decision.timed == "recorded"
  assert (decision.tf_seconds, decision.onnx_seconds) == pytest.approx(
      (0.1, 0.3))
  assert clock.now == 0.0  # nothing was timed
  assert tf_loads == ["inaturalist_v2"]  # once, to run on it
  assert decision.fallback == ("TF ran the probe batch in 0.100 s, ONNX "
                               "Runtime in 0.300 s" + RECORDED_NOTE)
  (line,) = _reason_lines(caplog)
  assert line == ("model inaturalist_v2 runs on TensorFlow (--runtime auto): "
                  "faster than ONNX Runtime: " + decision.fallback)


@pytest.mark.parametrize("live_tf,live_onnx,runtime",
                         [(0.1, 0.3, "tf"), (0.3, 0.1, "onnx")])
def test_retime_runtimes_times_both_again(
    staged_root, tmp_path, monkeypatch, tf_loads, live_tf, live_onnx,
    runtime):
  root = staged_copy(staged_root, tmp_path, tf_seconds=0.1, onnx_seconds=0.3)
  clock = FakeClock()
  slowed(monkeypatch, clock, tf_seconds=live_tf, onnx_seconds=live_onnx)
  resolved = dataclasses.replace(resolve(root, "inaturalist_v2"),
                                 retime_runtimes=True)
  decision = chooser.choose(resolved, clock=clock)
  assert decision.runtime == runtime and decision.timed == "here"
  assert (decision.tf_seconds, decision.onnx_seconds) == pytest.approx(
      (live_tf, live_onnx))
  assert decision.checked_against == "recorded"
  assert tf_loads == ["inaturalist_v2"]  # once, to time it
  if runtime == "tf":
    assert decision.max_diff == 0.0
    assert decision.fallback == ("TF ran the probe batch in 0.100 s, ONNX "
                                 "Runtime in 0.300 s (timed here)")
    assert decision.note == ("TensorFlow; ONNX Runtime not used: "
                             + decision.fallback)
    # The check still ran and is recorded.
    assert decision.onnx_max_diff <= decision.tolerance
  else:
    assert decision.fallback is None


def test_a_tie_keeps_tf(staged_root, tmp_path, monkeypatch):
  root = staged_copy(staged_root, tmp_path, tf_seconds=0.25,
                     onnx_seconds=0.25)
  clock = FakeClock()
  slowed(monkeypatch, clock, tf_seconds=0.25, onnx_seconds=0.25)
  decision = chooser.choose(resolve(root, "inaturalist_v2"), clock=clock)
  assert decision.runtime == "tf" and "TF ran the probe" in decision.fallback


@pytest.mark.parametrize("tf_seconds,onnx_seconds,runtime",
                         [(0.2, 0.05, "onnx"), (0.1, 0.3, "tf")])
def test_a_file_without_a_recorded_check_is_checked_and_timed_here(
    staged_root, tmp_path, monkeypatch, tf_loads, tf_seconds, onnx_seconds,
    runtime):
  root = staged_copy(staged_root, tmp_path, drop=True)
  clock = FakeClock()
  slowed(monkeypatch, clock, tf_seconds=tf_seconds, onnx_seconds=onnx_seconds)
  decision = chooser.choose(resolve(root, "inaturalist_v2"), timing_runs=3,
                            clock=clock)
  assert decision.runtime == runtime and decision.timed == "here"
  assert decision.checked_against == "tf"
  assert (decision.tf_seconds, decision.onnx_seconds) == pytest.approx(
      (tf_seconds, onnx_seconds))
  assert decision.onnx_max_diff <= decision.tolerance
  assert tf_loads == ["inaturalist_v2"]  # once, for the check and the timing


def test_requested_onnx_is_not_timed(staged_root, monkeypatch):
  clock = FakeClock()
  slowed(monkeypatch, clock, tf_seconds=0.1, onnx_seconds=9.0)
  decision = chooser.choose(
      resolve(staged_root, "inaturalist_v2", requested="onnx"), clock=clock)
  assert decision.runtime == "onnx" and decision.onnx_seconds is None


def test_requested_tf_converts_nothing(model_root, onnx_cache, conversions):
  decision = chooser.choose(
      resolve(model_root, "fungi_mobile_v1", requested="tf"))
  assert decision.runtime == "tf" and decision.max_diff == 0.0
  assert decision.note == "TensorFlow, as --runtime tf asked"
  assert decision.onnx_max_diff is None and decision.tolerance is None
  assert conversions == {}
  assert not os.path.exists(onnx_cache)


def test_check_models_attaches_the_decisions(staged_root, model_root,
                                             monkeypatch):
  clock = FakeClock()
  slowed(monkeypatch, clock, tf_seconds=0.2, onnx_seconds=0.1)
  models = (resolve(staged_root, "inaturalist_v2"),
            resolve(model_root, "fungi_mobile_v1", requested="tf"))
  assert [m.runtime for m in models] == [None, None]
  checked = launch.check_models(
      models, choose=functools.partial(chooser.choose, clock=clock))
  assert [m.runtime for m in checked] == ["onnx", "tf"]
  assert [m.requested_runtime for m in checked] == ["auto", "tf"]
  assert checked[0].decision.onnx_source == "staged"
  assert checked[1].runtime_note == "TensorFlow, as --runtime tf asked"


def test_auto_falls_back_to_tf_when_the_check_fails(model_root, other_root):
  resolved, _ = plant_wrong_onnx(model_root, other_root, "auto")
  decision = chooser.choose(resolved)
  assert decision.runtime == "tf" and decision.max_diff == 0.0
  assert decision.onnx_max_diff > decision.tolerance
  assert "differ from TensorFlow's" in decision.fallback
  assert decision.tf_seconds is None  # not timed once the check failed
  assert isinstance(runtimes.for_model(resolved.with_decision(decision)),
                    runtimes.TFRuntime)


# The child decides and then reports whether TensorFlow was imported; the
# console is the commands' own (transforms/console.py), on its stderr.
_DECIDE_IN_CHILD = """
import sys
from natvision.transforms import console
from natvision.transforms import models as models_lib
from natvision.transforms.runtimes import chooser
console.configure_logging()
(resolved,) = models_lib.resolve_models(["inaturalist_v2"], sys.argv[1])
decision = chooser.choose(resolved)
print(decision.runtime, decision.timed, "tensorflow" in sys.modules)
"""


@pytest.mark.slow  # a child process (~10 s); the default tier's cheaper
# test_auto_keeps_onnx_when_the_recorded_timings_say_it_is_faster counts TF
# loads and reads the same line in this process.
def test_auto_with_recorded_timings_imports_no_tensorflow(staged_root,
                                                          tmp_path):
  root = staged_copy(staged_root, tmp_path, tf_seconds=0.2,
                     onnx_seconds=0.05)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [repo] + ([os.environ["PYTHONPATH"]] if "PYTHONPATH" in os.environ
                else [])),
             NATVISION_ONNX_CACHE=str(tmp_path / "child_cache"))
  done = subprocess.run([sys.executable, "-c", _DECIDE_IN_CHILD, root],
                        capture_output=True, text=True, env=env, timeout=120,
                        check=False)
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ["onnx", "recorded", "False"]
  reasons = [line for line in done.stderr.splitlines()
             if "model inaturalist_v2 runs on ONNX Runtime (--runtime auto)"
             in line]
  assert len(reasons) == 1, done.stderr
  assert reasons[0].endswith("probe batch 0.050 s vs TensorFlow 0.200 s"
                             + RECORDED_NOTE)
