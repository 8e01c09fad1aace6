"""Running one measured configuration in a fresh process.

Each configuration runs as its own child process, so that its peak memory is
its own: ``os.wait4`` returns the child's resource usage, whose ``ru_maxrss``
is the largest resident set of the child or of any descendant it waited for
(the peak of the largest process, not a sum).  While the child runs, the
machine's CPU counters (``/proc/stat``) are read so that the share of the
CPU used by *other* processes during the measurement can be reported: this
machine is shared, and a figure taken while others were busy is flagged
(and retried by the caller).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from typing import Dict, List, Optional, Sequence


def cpu_times() -> Optional[tuple]:
  """(busy, total) CPU seconds of the machine since boot, from /proc/stat."""
  try:
    with open("/proc/stat") as f:
      fields = f.readline().split()[1:]
  except OSError:
    return None
  ticks = [int(v) for v in fields]
  hz = os.sysconf("SC_CLK_TCK")
  idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
  total = sum(ticks[:8])
  return (total - idle) / hz, total / hz


def cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


@dataclasses.dataclass
class Measured:
  """What one child process cost.

  Attributes:
    returncode: the child's exit status (negative: killed by that signal).
    wall_s: seconds from start to exit.
    cpu_s: user + system CPU seconds of the child and its descendants.
    peak_rss_mb: peak resident set of the child (or of its largest waited-for
      descendant), in MiB.
    others_cpu_pct: CPU used by other processes during the run, in percent of
      the whole machine (all cores); None where /proc/stat is missing.
    loadavg_before, loadavg_after: ``os.getloadavg()`` around the run.
    timed_out: the child ran past the timeout and was killed.
  """

  returncode: int
  wall_s: float
  cpu_s: float
  peak_rss_mb: float
  others_cpu_pct: Optional[float]
  loadavg_before: List[float]
  loadavg_after: List[float]
  timed_out: bool = False

  def as_dict(self) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v)
            for k, v in dataclasses.asdict(self).items()}


def run_measured(cmd: Sequence[str], log_path: str,
                 env: Optional[Dict[str, str]] = None,
                 cwd: Optional[str] = None,
                 timeout_s: Optional[float] = None) -> Measured:
  """Runs ``cmd`` in a fresh process, output to ``log_path``; measures it."""
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  full_env = dict(os.environ)
  full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  full_env.update(env or {})
  load_before = [round(v, 2) for v in os.getloadavg()]
  cpu_before = cpu_times()
  timed_out = False
  with open(log_path, "wb") as log:
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                            env=full_env, cwd=cwd)
    while True:
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      if timeout_s is not None and time.perf_counter() - start > timeout_s:
        proc.kill()
        timed_out = True
        pid, status, usage = os.wait4(proc.pid, 0)
        break
      time.sleep(0.02)
    wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)
  cpu_after = cpu_times()
  child_cpu = usage.ru_utime + usage.ru_stime
  others = None
  if cpu_before and cpu_after and wall > 0:
    busy = cpu_after[0] - cpu_before[0]
    others = max(0.0, busy - child_cpu) / (wall * cores()) * 100
  return Measured(
      returncode=proc.returncode, wall_s=wall, cpu_s=child_cpu,
      peak_rss_mb=usage.ru_maxrss / 1024.0, others_cpu_pct=others,
      loadavg_before=load_before,
      loadavg_after=[round(v, 2) for v in os.getloadavg()],
      timed_out=timed_out)


def busy_share(window_s: float = 2.0) -> Optional[float]:
  """Share of the machine's CPU (all cores) busy over ``window_s``, 0..1."""
  before = cpu_times()
  time.sleep(window_s)
  after = cpu_times()
  if not before or not after or after[1] <= before[1]:
    return None
  return (after[0] - before[0]) / (after[1] - before[1])


def wait_for_quiet(max_share: float, max_wait_s: float,
                   window_s: float = 2.0) -> float:
  """Waits until the machine is quieter than ``max_share``, or gives up.

  Returns:
    The seconds waited.
  """
  start = time.perf_counter()
  while time.perf_counter() - start < max_wait_s:
    share = busy_share(window_s)
    if share is None or share <= max_share:
      break
    time.sleep(3.0)
  return time.perf_counter() - start


def tail(path: str, lines: int = 15) -> str:
  try:
    with open(path, "rb") as f:
      text = f.read().decode("utf-8", errors="replace")
  except OSError:
    return ""
  return "\n".join(text.splitlines()[-lines:])
