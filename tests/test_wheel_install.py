"""The package as Dataflow workers get it, run from outside the repository.

``--setup_file ./setup.py`` makes Beam build a source distribution of the
repository (``setup.py sdist``) and every worker ``pip install`` it, which
builds a wheel from it.  This test does the same from a copy of the
checkout, installs the wheel into a separate folder and runs the demo job
from another working directory with only that folder on ``PYTHONPATH``:
anything setup.py leaves out (a module, the sample photos, a console
script's target) fails here.  Dependencies come from the test environment.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from natvision import transforms

# Slow tier: builds and installs a wheel, then runs the demo from it.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pipelines", "transforms", "tools")
NOT_COPIED = {".git", "__pycache__", ".pytest_cache", "build", "dist",
              ".venv", ".ci-venv", "natvision_demo", "demo_output", "out"}

IMPORT_ALL = r"""
import importlib, json, pkgutil, sys
import importlib.metadata as md
found = {}
for package in ("natvision.pipelines", "natvision.transforms",
                "natvision.tools"):
  module = importlib.import_module(package)
  found[package] = module.__file__
  for info in pkgutil.iter_modules(module.__path__):
    name = f"{package}.{info.name}"
    found[name] = importlib.import_module(name).__file__
scripts = {}
for ep in md.distribution("natvision").entry_points:
  if ep.group == "console_scripts":
    scripts[ep.name] = callable(ep.load())
print(json.dumps({"modules": found, "scripts": scripts, "path": sys.path}))
"""


def _copy_checkout(target):
  """Copies the working tree without VCS data, caches and build outputs."""
  def ignore(directory, names):
    skip = {n for n in names if n in NOT_COPIED or n.endswith(".egg-info")}
    if os.path.basename(directory) == "benchmarks":
      skip.add("work")
    return skip
  shutil.copytree(REPO, target, ignore=ignore, symlinks=True)


def _run(cmd, cwd, env=None, timeout=300):
  proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)
  assert proc.returncode == 0, (
      f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
      f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


def _package_files(root):
  """Paths of every file of the packages, relative to ``root``: the
  checkout's top-level folders, or an install's ``natvision/`` folder."""
  files = set()
  for package in PACKAGES:
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, package)):
      dirnames[:] = [d for d in dirnames if d != "__pycache__"]
      for name in filenames:
        if not name.endswith(".pyc"):
          files.add(os.path.relpath(os.path.join(dirpath, name), root))
  return files


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  """sdist -> wheel -> ``pip install --target``, as a worker would."""
  tmp = tmp_path_factory.mktemp("wheel")
  src, dist, site_dir = tmp / "src", tmp / "dist", tmp / "site"
  _copy_checkout(src)
  _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=src)
  (sdist,) = [p for p in dist.iterdir() if p.name.endswith(".tar.gz")]
  _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
        "--no-build-isolation", "-w", str(dist), str(sdist)], cwd=tmp)
  (wheel,) = [p for p in dist.iterdir() if p.name.endswith(".whl")]
  _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
        "--no-compile", "--target", str(site_dir), str(wheel)], cwd=tmp)
  return site_dir


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory, site):
  """A working directory and environment that see only the installed copy."""
  cwd = tmp_path_factory.mktemp("elsewhere")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(PYTHONPATH=str(site), TF_CPP_MIN_LOG_LEVEL="2")
  return cwd, env


def test_wheel_holds_every_file_of_the_packages(site):
  missing = (_package_files(REPO)
             - _package_files(os.path.join(site, "natvision")))
  assert not missing, f"setup.py leaves out {sorted(missing)}"


def test_modules_and_console_scripts_import_from_the_installed_copy(
    site, elsewhere):
  cwd, env = elsewhere
  proc = _run([sys.executable, "-c", IMPORT_ALL], cwd=cwd, env=env)
  found = json.loads(proc.stdout.strip().splitlines()[-1])
  assert REPO not in found["path"]
  for name, path in found["modules"].items():
    assert path.startswith(str(site) + os.sep), f"{name} from {path}"
  assert "natvision.pipelines.embed_images" in found["modules"]
  assert "natvision.pipelines.ingest_observations" in found["modules"]
  assert found["scripts"] == {"natvision-embed": True,
                              "natvision-ingest": True,
                              "natvision-prior": True,
                              "natvision-standins": True,
                              "natvision-evaluate": True,
                              "natvision-index": True,
                              "natvision-search": True,
                              "natvision-label": True,
                              "natvision-report": True,
                              "natvision-stage-onnx": True}


def test_demo_job_runs_from_the_installed_copy(site, elsewhere):
  cwd, env = elsewhere
  out = cwd / "demo"
  proc = _run([sys.executable, "-m", "natvision.pipelines.embed_images", "--demo",
               "--output_dir", str(out), "--runtime", "tf"], cwd=cwd, env=env)
  assert "stand-in models were used" in proc.stdout
  with open(out / "run.json") as f:
    report = json.load(f)
  assert report["package"]["version"] == transforms.__version__
  assert report["inputs"] == 5
  rows = {m["table"]: m["rows"] for m in report["models"].values()}
  assert rows == {"embeddings/inaturalist_v2": 4,
                  "predictions/fungi_mobile_v1": 4,
                  "embeddings/inception_resnet_v2": 4}
  assert report["errors"]["by_stage"] == {"decode": 1}
  assert report["model_loads"] == {"inaturalist_v2": 1, "fungi_mobile_v1": 1,
                                   "inception_resnet_v2": 1}
  # The photos the job read are the package data installed with the wheel.
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  uris = pq.read_table(out / "embeddings" / "inaturalist_v2").column(
      "uri").to_pylist()
  photos = os.path.join(str(site), "natvision", "pipelines", "sample_photos")
  assert uris and all(u.startswith(photos + os.sep) for u in uris), uris
