"""The console every natvision command shares: quiet logging by default.

natvision's own progress lines and warnings show, the rest of the world
(Beam, TensorFlow, tf2onnx) only from WARNING up; TensorFlow's C++ start-up
notices, which no logging setting reaches, are filtered out of the
process's stderr.  ``--verbose`` (``verbose_requested``) brings the INFO
lines back.

It lives in transforms/ so that the jobs (pipelines/launch.py) and the
tools/ commands set up the same console without the tools importing the
jobs.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
from typing import Optional, Sequence

VERBOSE_FLAG = "--verbose"


def verbose_requested(argv: Optional[Sequence[str]] = None) -> bool:
  """Whether the command line asks for ``--verbose`` (``sys.argv`` if None).

  Read before the flags are parsed, so that the console is set up before
  anything logs.
  """
  return VERBOSE_FLAG in (argv if argv is not None else sys.argv[1:])


def configure_logging(verbose: bool = False) -> None:
  """A quiet console: natvision's progress lines and warnings from the rest.

  TensorFlow's C++ start-up notices are silenced too (``TF_CPP_MIN_LOG_LEVEL``
  before TensorFlow is imported).  ``--verbose`` brings back INFO lines from
  Beam, TensorFlow and tf2onnx.  Workers on Dataflow configure their own
  logging and keep full logs.
  """
  if not verbose:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _filter_native_stderr()
  logging.basicConfig(level=logging.INFO,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  if not verbose:
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("natvision").setLevel(logging.INFO)
    for noisy in ("apache_beam", "absl", "tf2onnx", "h5py"):
      logging.getLogger(noisy).setLevel(logging.WARNING)
    # TensorFlow's deprecation notices concern its API, not the user's run.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


# TensorFlow's C++ start-up notices (absl's format), written before absl is
# initialised, so TF_CPP_MIN_LOG_LEVEL does not reach them.
_NATIVE_NOTICE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] "
    r"|E\d{4} [\d:.]+ +\d+ \S+:\d+\] failed call to cuInit)")


def _filter_native_stderr() -> None:
  """Drops TensorFlow's native start-up notices from this process's stderr.

  The file descriptor 2 (inherited by child processes, such as model
  conversions) becomes a pipe; a thread copies every other line to the real
  stderr, so errors and tracebacks still show.  At exit the real stderr is
  put back and the thread drains what is left, so no last line is lost.
  """
  if getattr(_filter_native_stderr, "installed", False):
    return
  try:
    real = os.dup(2)
    restore = os.dup(2)
    read_end, write_end = os.pipe()
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
  except OSError:
    return  # no usable stderr descriptor (an embedded interpreter)

  def pump():
    with os.fdopen(read_end, "rb", buffering=0) as src, os.fdopen(
        real, "wb", buffering=0) as dst:
      pending = b""
      while True:
        chunk = src.read(65536)
        if not chunk:
          break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
          if not _NATIVE_NOTICE.match(line.decode("utf-8", "replace")):
            dst.write(line + b"\n")
      if pending and not _NATIVE_NOTICE.match(
          pending.decode("utf-8", "replace")):
        dst.write(pending)

  thread = threading.Thread(target=pump, name="natvision-stderr",
                            daemon=True)
  thread.start()

  def drain():
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    os.dup2(restore, 2)  # closes this process's end of the pipe
    thread.join(timeout=5)

  atexit.register(drain)
  _filter_native_stderr.installed = True
