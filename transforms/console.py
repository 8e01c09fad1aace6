"""The console every natvision command shares: quiet logging by default.

natvision's own progress lines and warnings show, the rest of the world
(Beam, TensorFlow, tf2onnx) only from WARNING up; TensorFlow's C++ start-up
notices, which no logging setting reaches, are filtered out of the
process's stderr.  ``--verbose`` (``verbose_requested``) brings the INFO
lines back.

The DirectRunner's worker processes (``--direct_running_mode
multi_processing``) send their log lines to the launcher, where Beam logs
each as one long ``Worker: severity: ... message: "..." log_location:
...`` line (``local_job_service``).  ``WorkerLogFilter`` turns them into
what the same run prints in one process: natvision's lines as natvision's
(``natvision.worker``: the report written, progress, warnings), Beam's own
start-up warnings from its worker (no ``semi_persistent_directory``, the
launcher's flags it does not parse) dropped like TensorFlow's notices,
anything else from WARNING up kept as it was.

It lives in transforms/ so that the jobs (pipelines/launch.py) and the
tools/ commands set up the same console without the tools importing the
jobs.
"""

from __future__ import annotations

import atexit
import codecs
import logging
import os
import re
import sys
import threading
from typing import FrozenSet, Optional, Sequence, Tuple

VERBOSE_FLAG = "--verbose"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Notices logged on the root logger while a library is imported, before any
# command has set up its console: Beam's, on an install without the gcp
# extra (``pip install .``), which reads gs:// and BigQuery not at all.
IMPORT_NOTICES = (
    "apitools not found, and bigquery client libraries are not available",
)


class ImportNoticeFilter(logging.Filter):
  """Drops ``IMPORT_NOTICES`` (on the root logger)."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(notice in message for notice in IMPORT_NOTICES)


def drop_import_notices() -> None:
  """Installs ``ImportNoticeFilter`` on the root logger, once.

  Called by the packages' ``__init__`` (pipelines/, tools/), so that it is
  in place before their modules import Beam; ``--verbose`` does not bring
  these back (they are printed before the flags are read).
  """
  root = logging.getLogger()
  if not any(isinstance(f, ImportNoticeFilter) for f in root.filters):
    root.addFilter(ImportNoticeFilter())


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
  logging.basicConfig(level=logging.INFO, format=FORMAT)
  # A handler that a library's import-time ``logging.warning`` made with
  # basicConfig's defaults (Beam without the gcp extra) gets the format.
  for handler in logging.getLogger().handlers:
    formatter = handler.formatter
    if (type(handler) is logging.StreamHandler  # pylint: disable=unidiomatic-typecheck
        and formatter is not None
        and getattr(formatter, "_fmt", None) == logging.BASIC_FORMAT):
      handler.setFormatter(logging.Formatter(FORMAT))
  if not verbose:
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("natvision").setLevel(logging.INFO)
    for noisy in ("apache_beam", "absl", "tf2onnx", "h5py"):
      logging.getLogger(noisy).setLevel(logging.WARNING)
    # TensorFlow's deprecation notices concern its API, not the user's run.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    worker = logging.getLogger(BEAM_WORKER_LOGGER)
    if not any(isinstance(f, WorkerLogFilter) for f in worker.filters):
      worker.addFilter(WorkerLogFilter())
    worker.setLevel(logging.INFO)


# Where Beam logs its worker processes' lines (multi_processing).
BEAM_WORKER_LOGGER = "apache_beam.runners.portability.local_job_service"
_WORKER_FIELD = re.compile(r'(\w+): "((?:[^"\\]|\\.)*)"')
_WORKER_SEVERITY = re.compile(r"severity: (\w+)")
_SEVERITIES = {"TRACE": logging.DEBUG, "DEBUG": logging.DEBUG,
               "INFO": logging.INFO, "NOTICE": logging.INFO,
               "WARN": logging.WARNING, "ERROR": logging.ERROR,
               "CRITICAL": logging.CRITICAL}


def _unescape(text: str) -> str:
  """A protobuf text-format string's content (octal-escaped UTF-8)."""
  try:
    raw = codecs.escape_decode(text.encode("utf-8"))[0]
    return raw.decode("utf-8", "replace")
  except ValueError:
    return text


def _source_roots() -> Tuple[str, ...]:
  """The folders of natvision's packages, wherever they are installed."""
  here = os.path.dirname(os.path.abspath(__file__))  # transforms/
  parent = os.path.dirname(here)
  return tuple(os.path.join(parent, p) + os.sep
               for p in ("transforms", "pipelines", "tools"))


def natvision_logging_files(roots: Sequence[str]) -> FrozenSet[str]:
  """The source files under ``roots`` that log through a ``natvision``
  logger: the INFO lines of a worker that one process would show too.

  A forwarded worker line names its file and line, not its logger, so the
  file stands for the logger (read once, when the console is set up).
  """
  found = set()
  for root in roots:
    for folder, _, names in os.walk(root):
      for name in names:
        if not name.endswith(".py"):
          continue
        path = os.path.join(folder, name)
        try:
          with open(path, encoding="utf-8") as f:
            if 'getLogger("natvision' in f.read():
              found.add(path)
        except OSError:
          pass
  return frozenset(found)


class WorkerLogFilter(logging.Filter):
  """Beam's forwarded worker lines, as the quiet console shows them.

  Installed on ``BEAM_WORKER_LOGGER`` (set to INFO, so that natvision's INFO
  lines from workers reach it): a line logged by natvision's code on a
  worker (told by its ``log_location``, a path under natvision's packages)
  is rewritten as a ``natvision.worker`` record of the worker's own
  severity and message, and kept from WARNING up, or from INFO up when its
  file logs through a ``natvision`` logger (``natvision_logging_files``:
  what one process shows); any other worker line below WARNING, and
  Beam's own below ERROR (its start-up notices), is dropped.  Lines that
  are not forwarded worker lines keep the quiet console's WARNING
  threshold.
  """

  def __init__(self, roots: Optional[Sequence[str]] = None):
    super().__init__()
    self._roots = tuple(roots) if roots is not None else _source_roots()
    self._info_files = natvision_logging_files(self._roots)

  def filter(self, record: logging.LogRecord) -> bool:
    if record.msg != "Worker: %s" or not record.args:
      return record.levelno >= logging.WARNING
    entry = str(record.args[0])
    fields = dict(_WORKER_FIELD.findall(entry))
    severity = _WORKER_SEVERITY.search(entry)
    level = _SEVERITIES.get(severity.group(1) if severity else "",
                            record.levelno)
    message = _unescape(fields.get("message", ""))
    location = _unescape(fields.get("log_location", ""))
    if location.startswith(self._roots):
      record.name = "natvision.worker"
      record.levelno, record.levelname = level, logging.getLevelName(level)
      record.msg, record.args = message, ()
      path = location.rpartition(":")[0]
      return level >= (logging.INFO if path in self._info_files
                       else logging.WARNING)
    if f"{os.sep}apache_beam{os.sep}" in location:
      return level >= logging.ERROR
    return level >= logging.WARNING


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
          if line == _SYNC_MARK:
            _SYNCED.set()
          elif not _NATIVE_NOTICE.match(line.decode("utf-8", "replace")):
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


# A line the stderr filter's thread swallows, telling ``sync_stderr`` that
# everything written to fd 2 before it has been copied out.
_SYNC_MARK = b"\x00natvision-stderr-sync"
_SYNCED = threading.Event()


def sync_stderr(timeout_s: float = 2.0) -> None:
  """Waits until what was written to stderr has reached the real stderr.

  With the console filter installed (``configure_logging``), stderr lines
  pass through a thread; without this wait, a log line written just before
  the summary is printed on stdout can come out after it (a `2>&1` log).
  Without the filter this only flushes.
  """
  try:
    sys.stderr.flush()
  except (OSError, ValueError):
    return
  if not getattr(_filter_native_stderr, "installed", False):
    return
  _SYNCED.clear()
  try:
    os.write(2, _SYNC_MARK + b"\n")
  except OSError:
    return
  _SYNCED.wait(timeout_s)
