"""transforms/runtimes/child.py: a step in a spawned child process.

The steps are plain functions of this module, so that ``spawn`` can find
them; the child's process id tells that it ran elsewhere.  A spawned child
takes seconds to start, so those tests are in the slow tier; the default
tier runs the daemonic (in-process) path here, and a real conversion in a
child in tests/test_runtimes_chooser.py.
"""

import multiprocessing
import os

import pytest

from natvision.transforms import models as models_lib
from natvision.transforms.runtimes import child


def _pid_and_square(x):
  return os.getpid(), x * x


def _die():
  os._exit(9)  # pylint: disable=protected-access  (as the OOM killer would)


@pytest.mark.slow
def test_a_step_runs_in_another_process_and_returns_its_result():
  pid, square = child.run_in_child(_pid_and_square, (7,), "m", "squaring")
  assert square == 49 and pid != os.getpid()


@pytest.mark.slow
def test_a_child_that_dies_names_the_model_and_the_advice():
  with pytest.raises(models_lib.ModelError) as raised:
    child.run_in_child(_die, (), "fungi_mobile_v1", "converting it",
                       advice=": pass --runtime tf")
  message = str(raised.value)
  assert message.startswith("model fungi_mobile_v1: the process converting "
                            "it died")
  assert message.endswith("out of memory: pass --runtime tf")


def test_a_daemonic_process_runs_the_step_itself(monkeypatch):
  monkeypatch.setattr(multiprocessing.current_process(), "daemon", True,
                      raising=False)
  pid, _ = child.run_in_child(_pid_and_square, (2,), "m", "squaring")
  assert pid == os.getpid()
