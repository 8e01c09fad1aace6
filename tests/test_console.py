"""transforms/console.py: the quiet console of every command (TensorFlow's
native notices dropped, errors kept; --verbose read before parsing)."""

import os
import subprocess
import sys
import textwrap

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
