"""Real inputs at real scale: the launcher, the job's cost per photo, hosts.

    nice -n 10 python -m benchmarks.scale [--launch_sizes 10000,1000000]
        [--job_sizes 1000,10000,100000] [--hosts 200] [--host_counts 200,2]
        [--hosts_photos 2000] [--faults_photos 2000]
        [--output benchmarks/scale.json] [--work_dir DIR]

Inputs, made here in seconds:

- a manifest (CSV) of photo URLs spread round-robin over ``--hosts``
  loopback hosts, 127.0.0.2 upward, each its own listener of the tests'
  photo server (tests/http_server.py), which serves a few photos under
  every name and records the peak of requests in progress per host;
- a glob of local files: hard links of four photos in one folder.

Measured, each in a fresh process (its peak RSS from ``os.wait4``):

1. the launcher (``pipelines.launch.plan_job``: flags, input check, model
   check, plan) at each of ``--launch_sizes`` inputs, manifest and glob:
   wall time and peak RSS; and the whole job's time to its first photo (the
   first request a server sees; for the glob, the first file opened in the
   folder, from inotify), the job being stopped there;
2. the whole job (one tiny stand-in, ``--runtime tf``, DirectRunner) on
   globs of each of ``--job_sizes`` photos: CPU time per photo (core-ms:
   user + system of the job and its children over photos), peak RSS, the
   marginal cost and memory between sizes (start-up left out), and their
   ratios from ``FLAT_FROM`` photos to the largest size (``flat``: both
   at most ``FLAT_LIMIT``);
3. the per-host peak of requests in progress the servers saw with two
   worker processes, each host answering after 0.1 s, over 200 hosts and
   over 2 (``--direct_running_mode multi_processing
   --direct_num_workers 2``), against ``--per_host_concurrency``;
4. what one dead host (it accepts connections and never answers) and one
   trickling host (64 bytes every 0.5 s) add to a run of
   ``--faults_photos`` photos over the farm, against the same run with
   every host healthy, measured in the same session.

Figures are ratios between sizes measured in one session; the machine may
be shared (``others_cpu_pct`` per measurement, from /proc/stat).
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

from benchmarks import measure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO, "benchmarks", "scale.json")
MODEL = "fungi_mobile_v1"
PHOTO_SIZE = (128, 96)
LINKS_PER_FILE = 60_000
FIRST_PHOTO_TIMEOUT_S = 240.0
# The cost part's flatness: core-ms per photo and peak RSS of the largest
# size over those of the smallest size of at least FLAT_FROM photos.
FLAT_FROM = 10_000
FLAT_LIMIT = 1.1
# Seconds a healthy host takes to answer in the in-flight measurement, so
# that requests overlap as they do over a network.
HOST_LATENCY_S = 0.1
FAULT_RUNS = tuple(os.environ.get("NATVISION_SCALE_FAULTS",
                                  "healthy,dead,trickle").split(","))
# Short timeouts for the fault runs, so that a dead host costs seconds,
# not minutes; the same flags in the healthy run they are compared with.
FAULT_FLAGS = ("--connect_timeout", "2", "--read_timeout", "3",
               "--photo_timeout", "6")


def make_photos(count: int = 4) -> List[bytes]:
  """``count`` small JPEGs of seeded noise, the same bytes every run."""
  photos = []
  for i in range(count):
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 256, (PHOTO_SIZE[1], PHOTO_SIZE[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    photos.append(buf.getvalue())
  return photos


class _AnyName(dict):
  """URL path -> one of a few photos, for any ``/p/<n>.jpg``."""

  def __init__(self, photos: Sequence[bytes]):
    super().__init__()
    self._photos = list(photos)

  def get(self, path, default=None):
    try:
      n = int(path.rsplit("/", 1)[-1].split(".")[0])
    except ValueError:
      return default
    return self._photos[n % len(self._photos)]


class Farm:
  """``hosts`` loopback listeners (127.0.0.2 upward; the dead and
  trickling hosts are 127.0.0.251 and 127.0.0.250) serving any name.

  Args:
    hosts: number of healthy hosts.
    dead: add one host that accepts connections and never answers.
    trickle: add one host that sends every photo 64 bytes every 0.5 s.
    latency: seconds before each healthy response.
  """

  def __init__(self, hosts: int, photos: Sequence[bytes], dead: bool = False,
               trickle: bool = False, latency: float = 0.0):
    from tests.http_server import PhotoServer  # pylint: disable=import-outside-toplevel
    if not 0 < hosts <= 240:
      raise ValueError("1 to 240 hosts: 127.0.0.2 to 127.0.0.241")
    addresses = [f"127.0.0.{i + 2}" for i in range(hosts)]
    # http.server looks each address's name up (socket.getfqdn): with no
    # DNS server that takes seconds per listener.
    real_getfqdn, socket.getfqdn = socket.getfqdn, lambda name="": name
    try:
      self.server = PhotoServer({}, hosts=addresses, latency=latency)
      self.trickler = (PhotoServer({}, hosts=["127.0.0.250"],
                                   always=("trickle", 64, 0.5))
                       if trickle else None)
    finally:
      socket.getfqdn = real_getfqdn
    self.server.files = _AnyName(photos)
    self._servers = [self.server]
    if self.trickler is not None:
      self.trickler.files = _AnyName(photos)
      self._servers.append(self.trickler)
    for s in self._servers:  # 200 listeners: poll rarely (shutdown only)
      s._threads = [threading.Thread(target=l.serve_forever,  # pylint: disable=protected-access
                                     kwargs={"poll_interval": 1.0},
                                     daemon=True)
                    for l in s._servers]  # pylint: disable=protected-access
    self.dead_socket = None
    if dead:
      self.dead_socket = socket.socket()
      self.dead_socket.bind(("127.0.0.251", 0))
      self.dead_socket.listen(4096)  # never accepted: requests hang

  def __enter__(self) -> "Farm":
    for s in self._servers:
      s.__enter__()
    return self

  def __exit__(self, *exc) -> None:
    for s in self._servers:
      s.__exit__(*exc)
    if self.dead_socket is not None:
      self.dead_socket.close()

  def bases(self) -> List[str]:
    bases = list(self.server.bases)
    if self.trickler is not None:
      bases += self.trickler.bases
    if self.dead_socket is not None:
      host, port = self.dead_socket.getsockname()
      bases.append(f"http://{host}:{port}")
    return bases

  def requests(self) -> int:
    return sum(sum(s.requests.values()) for s in self._servers)


def write_manifest(path: str, bases: Sequence[str], n: int) -> str:
  """A CSV of ``n`` URLs, round-robin over ``bases``, written in blocks."""
  with open(path, "w") as f:
    f.write("uri\n")
    for start in range(0, n, 100_000):
      f.write("".join(f"{bases[i % len(bases)]}/p/{i:08d}.jpg\n"
                      for i in range(start, min(n, start + 100_000))))
  return path


def make_glob(folder: str, n: int, photos: Sequence[bytes]) -> str:
  """``n`` hard links of the photos in ``folder`` (made again from scratch
  unless the folder holds them already); returns the pattern."""
  os.makedirs(folder, exist_ok=True)
  sources = []
  # ext4 allows 65,000 links to a file: copies of the photos, each linked
  # at most LINKS_PER_FILE times.
  copies = max(len(photos), -(-n // LINKS_PER_FILE))
  for i in range(copies):
    data = photos[i % len(photos)]
    path = os.path.join(folder, f"_src{i}.jpeg")
    with open(path, "wb") as f:
      f.write(data)
    sources.append(path)
  have = sum(1 for e in os.scandir(folder) if e.name.endswith(".jpg"))
  if have > n:
    raise ValueError(f"{folder} holds {have} links, more than {n}")
  for i in range(have, n):
    os.link(sources[i % len(sources)], os.path.join(folder, f"{i:08d}.jpg"))
  return os.path.join(folder, "*.jpg")


class FirstOpen:
  """Watches a folder with inotify for the first file opened in it."""

  _IN_OPEN = 0x20
  _IN_ISDIR = 0x40000000

  def __init__(self, folder: str):
    self._libc = ctypes.CDLL("libc.so.6", use_errno=True)
    self._fd = self._libc.inotify_init1(os.O_NONBLOCK)
    self._libc.inotify_add_watch(self._fd, folder.encode(), self._IN_OPEN)
    self.first_ts: Optional[float] = None

  def poll(self) -> bool:
    """True once a file (not the folder) has been opened."""
    while self.first_ts is None:
      try:
        data = os.read(self._fd, 65536)
      except BlockingIOError:
        return False
      offset = 0
      while offset < len(data):
        _, mask, _, length = struct.unpack_from("iIII", data, offset)
        offset += 16 + length
        if not mask & self._IN_ISDIR:
          self.first_ts = time.time()
          break
    return True

  def close(self) -> None:
    os.close(self._fd)


def _job_cmd(inp: str, out: str, model_root: str, *flags: str) -> List[str]:
  return [sys.executable, "-m", "natvision.pipelines.embed_images", "--input", inp,
          "--output_dir", out, "--model_root", model_root, "--models", MODEL,
          "--runtime", "tf", *flags]


def measure_launcher(inp: str, work: str, model_root: str, label: str
                     ) -> dict:
  """``plan_job`` alone in a fresh process: wall time and peak RSS."""
  cmd = [sys.executable, "-m", "benchmarks.scale", "--_plan_only",
         *_job_cmd(inp, os.path.join(work, f"out-{label}"), model_root)[3:]]
  m = measure.run_measured(cmd, os.path.join(work, f"launch-{label}.log"),
                           cwd=REPO)
  with open(os.path.join(work, f"launch-{label}.log")) as f:
    lines = [l for l in f.read().splitlines() if l.startswith("{")]
  inner = json.loads(lines[-1]) if lines else {}
  return {"returncode": m.returncode, "process_wall_s": round(m.wall_s, 2),
          "plan_job_s": inner.get("plan_job_s"),
          "expected_total": inner.get("expected_total"),
          "peak_rss_mib": round(m.peak_rss_mb, 1),
          "others_cpu_pct": round(m.others_cpu_pct or 0, 1)}


def _plan_only(argv: Sequence[str]) -> None:
  from natvision.pipelines import embed_images, launch  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  plan, _ = launch.plan_job(embed_images.JOB, list(argv))
  print(json.dumps({"plan_job_s": round(time.perf_counter() - start, 3),
                    "expected_total": plan.checked.expected_total}))


def time_to_first_photo(cmd: Sequence[str], seen, log_path: str) -> dict:
  """Starts the job, stops it at its first photo; seconds from the start.

  Args:
    seen: returns True once the first photo was asked for.
  """
  start = time.time()
  with open(log_path, "wb") as log:
    proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    first, peak = None, 0
    while time.time() - start < FIRST_PHOTO_TIMEOUT_S:
      peak = max(peak, _rss_mib(proc.pid))
      if seen():
        first = time.time() - start
        break
      if proc.poll() is not None:
        break
      time.sleep(0.01)
    proc.kill()
    proc.wait()
  return {"first_photo_s": round(first, 2) if first else None,
          "timed_out": first is None, "peak_rss_mib_until_then": peak}


def _rss_mib(pid: int) -> float:
  """The peak RSS so far of ``pid`` and its children, in MiB (VmHWM)."""
  total = 0.0
  for p in [pid] + _children(pid):
    try:
      with open(f"/proc/{p}/status") as f:
        for line in f:
          if line.startswith("VmHWM:"):
            total = max(total, int(line.split()[1]) / 1024)
    except OSError:
      pass
  return round(total, 1)


def _children(pid: int) -> List[int]:
  try:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
      return [int(p) for p in f.read().split()]
  except OSError:
    return []


def run_job(cmd: Sequence[str], log_path: str) -> dict:
  m = measure.run_measured(cmd, log_path, cwd=REPO)
  return {"returncode": m.returncode, "wall_s": round(m.wall_s, 2),
          "cpu_s": round(m.cpu_s, 2), "peak_rss_mib": round(m.peak_rss_mb, 1),
          "others_cpu_pct": round(m.others_cpu_pct or 0, 1),
          "load_after": m.loadavg_after}


def _standins(root: str) -> None:
  if not os.path.exists(os.path.join(root, MODEL, "saved_model.pb")):
    subprocess.run([sys.executable, "-m", "natvision.tools.standins", "--output_dir",
                    root, "--tiny", "--models", MODEL], cwd=REPO, check=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def part_launcher(sizes: Sequence[int], hosts: int, work: str,
                  model_root: str, photos) -> dict:
  results = {"manifest": {}, "glob": {}}
  with Farm(hosts, photos) as farm:
    for n in sizes:
      manifest = write_manifest(os.path.join(work, f"m{n}.csv"),
                                farm.bases(), n)
      row = measure_launcher(manifest, work, model_root, f"m{n}")
      before = farm.requests()
      row.update(time_to_first_photo(
          _job_cmd(manifest, os.path.join(work, f"first-m{n}"), model_root),
          lambda b=before: farm.requests() > b,
          os.path.join(work, f"first-m{n}.log")))
      results["manifest"][str(n)] = row
      print("launcher manifest", n, row, flush=True)
  for n in sizes:
    folder = os.path.join(work, f"g{n}")
    made = time.perf_counter()
    pattern = make_glob(folder, n, photos)
    row = {"making_links_s": round(time.perf_counter() - made, 1)}
    row.update(measure_launcher(pattern, work, model_root, f"g{n}"))
    watch = FirstOpen(folder)
    try:
      row.update(time_to_first_photo(
          _job_cmd(pattern, os.path.join(work, f"first-g{n}"), model_root),
          watch.poll, os.path.join(work, f"first-g{n}.log")))
    finally:
      watch.close()
    results["glob"][str(n)] = row
    print("launcher glob", n, row, flush=True)
  return results


def part_cost(sizes: Sequence[int], work: str, model_root: str,
              photos, source: str = "glob", hosts: int = 200) -> dict:
  """The job at each size: core-ms per photo, peak RSS.

  Args:
    source: ``glob`` (hard links) or ``manifest`` (URLs over ``hosts``
      loopback hosts; the servers' CPU is this process's, not the job's).
  """
  rows = {}
  for n in sizes:
    label = f"cost-{source}-{n}"
    if source == "glob":
      inp = make_glob(os.path.join(work, f"g{n}"), n, photos)
      row = run_job(_job_cmd(inp, os.path.join(work, label), model_root),
                    os.path.join(work, f"{label}.log"))
    else:
      with Farm(hosts, photos) as farm:
        inp = write_manifest(os.path.join(work, f"{label}.csv"),
                             farm.bases(), n)
        row = run_job(_job_cmd(inp, os.path.join(work, label), model_root),
                      os.path.join(work, f"{label}.log"))
    row["core_ms_per_photo"] = round(row["cpu_s"] / n * 1000, 3)
    rows[str(n)] = row
    print("cost", source, n, row, flush=True)
  return cost_summary(rows)


def cost_summary(rows: dict, flat_from: int = FLAT_FROM) -> dict:
  """Ratios of the job's cost and memory between sizes (``rows``: size ->
  ``run_job``'s row with ``core_ms_per_photo``).

  ``ratio_largest_to_smallest`` compares core-ms per photo over the whole
  run, start-up included, so a small size looks dearer; the ``*_from_N``
  ratios compare the largest size with the smallest one of at least
  ``flat_from`` photos, where start-up is a few percent, and are what "flat"
  (at most ``FLAT_LIMIT``) is judged on.  The marginal cost between
  neighbouring sizes leaves start-up out altogether; the marginal memory is
  MiB per photo (0 when flat).
  """
  ns = sorted(int(n) for n in rows)
  small, large = rows[str(ns[0])], rows[str(ns[-1])]
  result = {"sizes": rows,
            "ratio_largest_to_smallest": round(
                large["core_ms_per_photo"] / small["core_ms_per_photo"], 3),
            "rss_ratio_largest_to_smallest": round(
                large["peak_rss_mib"] / small["peak_rss_mib"], 3)}
  big = [n for n in ns if n >= flat_from]
  if len(big) > 1:
    base = rows[str(big[0])]
    key = f"from_{big[0]}_to_{big[-1]}"
    cost = large["core_ms_per_photo"] / base["core_ms_per_photo"]
    rss = large["peak_rss_mib"] / base["peak_rss_mib"]
    result["core_ms_ratio_" + key] = round(cost, 3)
    result["rss_ratio_" + key] = round(rss, 3)
    result["flat"] = bool(cost <= FLAT_LIMIT and rss <= FLAT_LIMIT)
  if len(ns) > 1:
    margins, memory = [], []
    for a, b in zip(ns, ns[1:]):
      margins.append(round((rows[str(b)]["cpu_s"] - rows[str(a)]["cpu_s"])
                           / (b - a) * 1000, 3))
      memory.append(round((rows[str(b)]["peak_rss_mib"]
                           - rows[str(a)]["peak_rss_mib"]) / (b - a), 5))
    result["marginal_core_ms_per_photo"] = margins
    result["marginal_rss_mib_per_photo"] = memory
    result["startup_core_s"] = round(
        small["cpu_s"] - margins[0] * ns[0] / 1000, 1)
  return result


def part_hosts(photos_n: int, host_counts: Sequence[int], work: str,
               model_root: str, photos) -> dict:
  """Per-host peak in flight with two worker processes, each healthy host
  answering after ``HOST_LATENCY_S``."""
  result = {}
  for hosts in host_counts:
    with Farm(hosts, photos, latency=HOST_LATENCY_S) as farm:
      manifest = write_manifest(os.path.join(work, f"hosts{hosts}.csv"),
                                farm.bases(), photos_n)
      row = run_job(_job_cmd(manifest, os.path.join(work, f"hosts{hosts}-out"),
                             model_root, "--direct_running_mode",
                             "multi_processing", "--direct_num_workers", "2"),
                    os.path.join(work, f"hosts{hosts}.log"))
      peaks = list(farm.server.peak.values())
      row.update({"photos": photos_n, "hosts": hosts,
                  "latency_s": HOST_LATENCY_S, "requests": farm.requests(),
                  "per_host_peak_max": max(peaks) if peaks else None,
                  "per_host_peak_median": (float(np.median(peaks)) if peaks
                                           else None),
                  "per_host_concurrency": 8})
    result[str(hosts)] = row
    print("hosts", row, flush=True)
  return result


def part_faults(photos_n: int, hosts: int, work: str, model_root: str,
                photos) -> dict:
  result = {"photos": photos_n, "flags": list(FAULT_FLAGS)}
  for name, dead, trickle in (("healthy", False, False),
                              ("dead", True, False),
                              ("trickle", False, True)):
    if name not in FAULT_RUNS:
      continue
    with Farm(hosts, photos, dead=dead, trickle=trickle) as farm:
      manifest = write_manifest(os.path.join(work, f"faults-{name}.csv"),
                                farm.bases(), photos_n)
      row = run_job(_job_cmd(manifest, os.path.join(work, f"f-{name}"),
                             model_root, *FAULT_FLAGS),
                    os.path.join(work, f"faults-{name}.log"))
      summary = os.path.join(work, f"f-{name}", "run.json")
      if os.path.exists(summary):
        with open(summary) as f:
          errors = json.load(f).get("errors", {})
        row["error_photos"] = errors.get("photos")
        row["errors_by_reason"] = errors.get("by_reason")
      row["photos_on_bad_host"] = photos_n // len(farm.bases()) if (
          dead or trickle) else 0
      result[name] = row
      print("faults", name, row, flush=True)
  base = result.get("healthy", {}).get("wall_s")
  for name in ("dead", "trickle"):
    if name in result and base is not None:
      result[name]["added_s"] = round(result[name]["wall_s"] - base, 1)
  return result


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "--_plan_only":
    _plan_only(argv[1:])
    return 0
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--launch_sizes", default="10000,1000000")
  p.add_argument("--job_sizes", default="1000,10000,100000")
  p.add_argument("--hosts", type=int, default=200)
  p.add_argument("--hosts_photos", type=int, default=2000)
  p.add_argument("--host_counts", default="200,2",
                 help="hosts of each in-flight run")
  p.add_argument("--faults_photos", type=int, default=2000)
  p.add_argument("--parts", default="launcher,cost,hosts,faults")
  p.add_argument("--cost_source", choices=("glob", "manifest"),
                 default="glob")
  p.add_argument("--work_dir")
  p.add_argument("--output", default=DEFAULT_OUTPUT)
  args = p.parse_args(argv)
  work = args.work_dir or tempfile.mkdtemp(prefix="natvision-scale-")
  os.makedirs(work, exist_ok=True)
  model_root = os.path.join(work, "models")
  _standins(model_root)
  photos = make_photos()
  started = time.time()
  result = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"processor": platform.processor() or _cpu_model(),
                        "cores": measure.cores(),
                        "loadavg_start": list(os.getloadavg())},
            "model": MODEL, "photo_size": list(PHOTO_SIZE), "work_dir": work}
  parts = args.parts.split(",")
  if "launcher" in parts:
    result["launcher"] = part_launcher(
        [int(n) for n in args.launch_sizes.split(",")], args.hosts, work,
        model_root, photos)
  if "cost" in parts:
    result["cost"] = part_cost([int(n) for n in args.job_sizes.split(",")],
                               work, model_root, photos, args.cost_source,
                               args.hosts)
  if "hosts" in parts:
    result["hosts"] = part_hosts(
        args.hosts_photos, [int(n) for n in args.host_counts.split(",")],
        work, model_root, photos)
  if "faults" in parts:
    result["faults"] = part_faults(args.faults_photos, args.hosts, work,
                                   model_root, photos)
  result["took_s"] = round(time.time() - started, 1)
  result["machine"]["loadavg_end"] = list(os.getloadavg())
  with open(args.output, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
  print(json.dumps(result, indent=2, sort_keys=True))
  return 0


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown"


if __name__ == "__main__":
  sys.exit(main())
