"""transforms/console.py: the quiet console of every command (TensorFlow's
native notices dropped, errors kept; --verbose read before parsing)."""

import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest

from natvision.transforms import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NOTICES = [
    "WARNING: All log messages before absl::InitializeLog() is called are "
    "written to STDERR",
    "I0000 00:00:1796026827.798346   29308 port.cc:153] oneDNN custom "
    "operations are on.",
    "W0000 00:00:1796026827.801197   29308 cudart_stub.cc:31] Could not find "
    "cuda drivers on your machine, GPU will not be used.",
    "E0000 00:00:1796026834.204952   29308 cuda_platform.cc:52] failed call "
    "to cuInit: INTERNAL: CUDA error",
]
KEPT = [
    "E0000 00:00:1796026834.204952   29308 saver.cc:12] could not read "
    "variables",
    "Traceback (most recent call last):",
    "natvision-embed: error: --batch_size must be at least 1",
]


def test_notice_pattern():
  assert all(console._NATIVE_NOTICE.match(line) for line in NOTICES)
  assert not any(console._NATIVE_NOTICE.match(line) for line in KEPT)


def test_child_processes_stderr_is_filtered_but_errors_pass():
  script = textwrap.dedent(f"""
      import os, subprocess, sys
      from natvision.transforms import console
      console.configure_logging(verbose=False)
      lines = {NOTICES + KEPT!r}
      # A child process (as a model conversion) writes to the same fd 2.
      subprocess.run([sys.executable, "-c",
                      "import sys; sys.stderr.write(%r)" % "\\n".join(lines)])
      sys.stderr.flush()
      import time; time.sleep(0.3)
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, cwd=REPO, check=True)
  got = [l for l in out.stderr.splitlines() if l]
  assert got == KEPT


def test_verbose_is_read_from_the_command_line(monkeypatch):
  assert console.verbose_requested(["--input", "x", "--verbose"])
  assert not console.verbose_requested(["--input", "x"])
  monkeypatch.setattr(sys, "argv", ["natvision-embed", "--verbose"])
  assert console.verbose_requested()


# --------------------------------------------------------------------------
# Beam's forwarded worker lines (--direct_running_mode multi_processing).


def _worker_record(severity, message, location):
  """A record as Beam's local_job_service logs a worker's line."""
  # pylint: disable=import-outside-toplevel
  from apache_beam.portability.api import beam_fn_api_pb2
  from apache_beam.runners.portability import local_job_service
  entry = beam_fn_api_pb2.LogEntry(
      severity=getattr(beam_fn_api_pb2.LogEntry.Severity.Enum, severity),
      message=message, log_location=location, thread="MainThread")
  level = local_job_service.LOGENTRY_TO_LOG_LEVEL_MAP[entry.severity]
  return logging.LogRecord(console.BEAM_WORKER_LOGGER, level, __file__, 1,
                           "Worker: %s", (str(entry).replace("\n", " "),),
                           None)


def _beam_file(name):
  import apache_beam  # pylint: disable=import-outside-toplevel
  return os.path.join(os.path.dirname(apache_beam.__file__), name)


def test_beams_worker_start_up_warnings_are_dropped():
  keep = console.WorkerLogFilter().filter
  assert not keep(_worker_record(
      "WARN", "No semi_persistent_directory found: User registered objects "
      "(e.g. schema, logical type) throughregisteries may not be effective",
      _beam_file("runners/worker/sdk_worker_main.py") + ":421"))
  assert not keep(_worker_record(
      "WARN", "Discarding unparseable args: ['--pipeline_type_check']",
      _beam_file("options/pipeline_options.py") + ":570"))
  assert keep(_worker_record("ERROR", "bundle failed",
                             _beam_file("runners/worker/sdk_worker.py")
                             + ":1"))
  # Another library's warning on a worker stays, as in one process.
  assert keep(_worker_record("WARN", "DecompressionBombWarning",
                             "/x/PIL/Image.py:3"))
  assert not keep(_worker_record("INFO", "chatter", "/x/PIL/Image.py:3"))


def test_natvisions_worker_lines_read_as_in_one_process():
  import natvision.tools.report  # pylint: disable=import-outside-toplevel
  import natvision.transforms.inference  # pylint: disable=import-outside-toplevel
  keep = console.WorkerLogFilter().filter
  # tools/report.py logs through natvision.report: its INFO line shows.
  record = _worker_record("INFO", "run report written to OUT/report.html",
                          natvision.tools.report.__file__ + ":12")
  assert keep(record)
  assert record.name == "natvision.worker" and record.levelno == logging.INFO
  assert record.getMessage() == "run report written to OUT/report.html"
  # Non-ASCII text survives the protobuf text format's octal escapes.
  record = _worker_record("WARN", "photo café.jpg in flight for 31 s",
                          natvision.tools.report.__file__ + ":13")
  assert keep(record) and record.getMessage() == (
      "photo café.jpg in flight for 31 s")
  assert record.levelno == logging.WARNING
  # A module logging at INFO on the root logger (hidden in one process).
  assert not keep(_worker_record("INFO", "loading inaturalist_v2 in this "
                                 "worker process",
                                 natvision.transforms.inference.__file__
                                 + ":40"))


def test_the_quiet_console_installs_the_worker_filter(monkeypatch):
  worker = logging.getLogger(console.BEAM_WORKER_LOGGER)
  monkeypatch.setattr(worker, "filters", [])
  monkeypatch.setattr(console, "_filter_native_stderr", lambda: None)
  console.configure_logging()
  console.configure_logging()
  assert [type(f) for f in worker.filters] == [console.WorkerLogFilter]
  assert worker.level == logging.INFO


def _summary_lines(text):
  """The summary block the launcher prints, without its figures' values."""
  lines = text[text.index("natvision embed_images:"):].splitlines()
  return [re.sub(r"[\d.]+s\b|[\d.]+ photos/s|\d+", "N", line)
          for line in lines if not line.startswith("  model loads")]


@pytest.mark.slow  # two demos, one of them on two worker processes
def test_a_multi_process_run_is_as_quiet_as_a_single_process_one(
    demo_standins, tmp_path):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO] + ([os.environ["PYTHONPATH"]] if "PYTHONPATH" in os.environ
                else [])))
  runs = {}
  for mode, extra in (("single", []),
                      ("multi", ["--direct_num_workers", "2",
                                 "--direct_running_mode",
                                 "multi_processing"])):
    done = subprocess.run(
        [sys.executable, "-c",
         "import sys; from natvision.tools.report import embed_main; "
         "sys.exit(embed_main(sys.argv[1:]))",
         "--demo", "--output_dir", str(tmp_path / mode)] + extra,
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    runs[mode] = done
  multi = runs["multi"].stderr
  assert "Worker: " not in multi and "semi_persistent" not in multi
  assert "Discarding unparseable args" not in multi
  assert (_summary_lines(runs["multi"].stdout.replace(
      str(tmp_path / "multi"), "OUT")) == _summary_lines(
          runs["single"].stdout.replace(str(tmp_path / "single"), "OUT")))
  for mode, done in runs.items():
    assert f"run report written to {tmp_path / mode}" in done.stderr, mode


def test_beams_import_notice_without_the_gcp_extra_is_dropped():
  from natvision import pipelines  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  root = logging.getLogger()
  assert any(isinstance(f, console.ImportNoticeFilter) for f in root.filters)
  notice = logging.LogRecord(
      "root", logging.WARNING, "x.py", 32, "apitools not found, and bigquery "
      "client libraries are not available despite the import not raising an "
      "ImportError.", (), None)
  other = logging.LogRecord("root", logging.WARNING, "x.py", 1,
                            "disk is full", (), None)
  assert not root.filter(notice) and root.filter(other)


def test_a_handler_made_at_import_time_gets_the_console_format(monkeypatch):
  monkeypatch.setattr(console, "_filter_native_stderr", lambda: None)
  root = logging.getLogger()
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
  monkeypatch.setattr(root, "handlers", [handler])
  console.configure_logging()
  assert handler.formatter._fmt == console.FORMAT  # pylint: disable=protected-access


_LOG_THEN_PRINT = """
import logging, sys
from natvision.transforms import console
console.configure_logging()
log = logging.getLogger("natvision.progress")
for i in range(2000):
  log.info("progress line %d", i)
console.sync_stderr()
print("SUMMARY", flush=True)
"""


def test_stderr_lines_written_before_the_summary_come_out_before_it():
  """The console filter copies stderr through a thread; the launcher waits
  for it (``sync_stderr``) before printing the summary, so a `2>&1` log
  keeps the order (the last progress line used to follow the summary)."""
  done = subprocess.run([sys.executable, "-c", _LOG_THEN_PRINT],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stdout
  lines = done.stdout.splitlines()
  assert lines[-1] == "SUMMARY", lines[-3:]
  assert lines[-2].endswith("progress line 1999")
  assert not any("natvision-stderr-sync" in line for line in lines)
