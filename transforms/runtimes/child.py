"""A memory-heavy step (conversion, quantization) in a spawned child process.

Decides how: multiprocessing ``spawn`` (a fresh interpreter; nothing of the
caller's threads or TensorFlow state is copied), one worker, the child's
time and peak memory logged, a dead child (killed for memory, for
instance) turned into a ``ModelError`` that names the model; a daemonic
process, which may not start children, runs the step in-process instead.
The peak memory of the step (several GB for a full-size Inception) leaves
with the child.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import time
from typing import Any, Callable, Tuple

from natvision.transforms import models as models_lib


def _measured(function: Callable[..., Any], args: Tuple) -> dict:
  """What the child runs: the step, then its own seconds and peak RSS."""
  import resource  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.WARNING)
  start = time.perf_counter()
  result = function(*args)
  return {"result": result, "seconds": time.perf_counter() - start,
          "peak_rss_mb": resource.getrusage(
              resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def run_in_child(function: Callable[..., Any], args: Tuple, model: str,
                 doing: str, advice: str = "") -> Any:
  """``function(*args)`` in a spawned child process; in-process if daemonic.

  Args:
    function: a module-level function (spawn pickles it by name), its
      arguments picklable.
    args: its arguments.
    model: the model's name, for messages.
    doing: what the step does, e.g. "converting it to ONNX".
    advice: what to do when the child dies, appended to the message.

  Returns:
    What ``function`` returned.

  Raises:
    ModelError: the child died (killed for memory, for instance); whatever
      ``function`` raised.
  """
  if multiprocessing.current_process().daemon:
    return function(*args)
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    try:
      figures = pool.submit(_measured, function, args).result()
    except concurrent.futures.process.BrokenProcessPool as e:
      raise models_lib.ModelError(
          f"model {model}: the process {doing} died ({e}); it may have run "
          f"out of memory{advice}") from e
  logging.info("model %s: %s in a child process took %.1f s (its peak memory "
               "%.0f MiB)", model, doing, figures["seconds"],
               figures["peak_rss_mb"])
  return figures["result"]
