"""embed_images on Beam's distributed paths, compared with the DirectRunner.

Two runs put the DoFns in processes other than the one that built the graph:

* PortableRunner with an embedded job server and an external SDK worker pool
  (``worker_pool_main``) started here: the Fn API path Dataflow Runner v2
  uses, with pickled DoFns unpickled and run in SDK harness processes;
* the DirectRunner in ``multi_processing`` mode with two worker processes.

Each run's tables must equal the in-process DirectRunner's (embeddings and
predictions per image_id, the same error rows), and each model must be
loaded at least once and at most once per worker process: by the run
report's ``model_loads`` (Beam counters) and by the workers' own log line
"loading <model> from <path> in this worker process", written to a file by a
``sitecustomize`` the worker processes import (they log nowhere else: the
pool's harnesses configure no logging).

What the worker processes need, found while writing this: the package on
their ``sys.path`` (``PYTHONPATH``; the DoFns are pickled by reference to
``transforms``), and for the worker pool a ``python`` on ``PATH`` that is
this interpreter (``worker_pool_main`` starts harnesses as ``python -c``).
"""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from natvision.pipelines import embed_images
from tests.report_helpers import table_rows

# Slow tier: Beam's other runners (a worker pool, processes) take a
# minute to start; the DirectRunner is tested everywhere else.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("inaturalist_v2", "fungi_mobile_v1")
WORKER_LOG_ENV = "NATVISION_TEST_WORKER_LOG"
LOAD_LINE = "loading {model} from {path} in this worker process"
POOL_STARTED_WORKER = "Starting worker with command"

SITECUSTOMIZE = f'''"""Test hook: worker processes log INFO records to ${WORKER_LOG_ENV}."""
import logging
import os

_path = os.environ.get("{WORKER_LOG_ENV}")
if _path:
  _handler = logging.FileHandler(_path)
  _handler.setFormatter(logging.Formatter("%(process)d %(message)s"))
  logging.getLogger().addHandler(_handler)
  logging.getLogger().setLevel(logging.INFO)
'''


def _worker_env(tmp_path, log_path):
  """Environment for worker processes: the package, the hook, this python."""
  hook_dir = tmp_path / "hook"
  hook_dir.mkdir()
  (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
  paths = [str(hook_dir), REPO]
  if os.environ.get("PYTHONPATH"):
    paths.append(os.environ["PYTHONPATH"])
  return {
      "PYTHONPATH": os.pathsep.join(paths),
      "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get(
          "PATH", ""),
      WORKER_LOG_ENV: str(log_path),
      "TF_CPP_MIN_LOG_LEVEL": "2",
  }


def _run(out, photo_dir, model_root, *beam_flags):
  return embed_images.run([
      "--input", str(photo_dir / "*"), "--output_dir", str(out),
      "--models", ",".join(MODELS), "--model_root", model_root,
      "--runtime", "tf", "--batch_size", "4", "--top_k", "3", *beam_flags])


def _read(directory):
  return pa.concat_tables([
      pq.read_table(os.path.join(directory, f))
      for f in sorted(os.listdir(directory)) if f.endswith(".parquet")])


def _tables(out):
  """The run's tables keyed by image_id, in comparable form."""
  emb = _read(os.path.join(out, "embeddings", "inaturalist_v2")).to_pylist()
  pred = _read(os.path.join(out, "predictions", "fungi_mobile_v1")).to_pylist()
  errors = _read(os.path.join(out, "errors")).to_pylist()
  return {
      "embeddings": {r["image_id"]: np.asarray(r["embedding"], np.float32)
                     for r in emb},
      "embedding_rows": len(emb),
      "predictions": {r["image_id"]: r for r in pred},
      "prediction_rows": len(pred),
      "errors": sorted((e["image_id"], e["stage"], e["model"] or "")
                       for e in errors),
  }


def _assert_same_tables(got_out, want_out):
  got, want = _tables(got_out), _tables(want_out)
  assert got["errors"] == want["errors"]
  assert got["embeddings"].keys() == want["embeddings"].keys()
  assert got["embedding_rows"] == len(got["embeddings"])
  for image_id, vector in want["embeddings"].items():
    np.testing.assert_allclose(got["embeddings"][image_id], vector,
                               rtol=1e-4, atol=1e-5, err_msg=image_id)
  assert got["predictions"].keys() == want["predictions"].keys()
  assert got["prediction_rows"] == len(got["predictions"])
  for image_id, row in want["predictions"].items():
    other = got["predictions"][image_id]
    np.testing.assert_allclose(other["top_k_scores"], row["top_k_scores"],
                               rtol=1e-4, atol=1e-7, err_msg=image_id)
    for i, (a, b) in enumerate(zip(other["top_k_label_ids"],
                                   row["top_k_label_ids"])):
      # Batches differ between runners, so scores may differ in the last
      # bits; labels may only swap where their scores tie that closely.
      if a != b:
        assert abs(other["top_k_scores"][i] - row["top_k_scores"][i]) < 1e-6


def _load_lines(log_path, model_root):
  """(pid, model) for each worker-side model load in the log."""
  loads = []
  if not os.path.exists(log_path):
    return loads
  with open(log_path) as f:
    for line in f:
      pid, _, message = line.rstrip("\n").partition(" ")
      for model in MODELS:
        path = os.path.join(model_root, model)
        if message == LOAD_LINE.format(model=model, path=path):
          loads.append((int(pid), model))
  return loads


def _assert_loads_once_per_process(report, loads, workers):
  """Counters and worker logs agree: 1 <= loads per model <= workers."""
  assert workers >= 1
  assert set(report["model_loads"]) == set(MODELS), report["model_loads"]
  for model in MODELS:
    assert 1 <= report["model_loads"][model] <= workers, report["model_loads"]
    logged = [pid for pid, m in loads if m == model]
    assert len(logged) == report["model_loads"][model], loads
    assert len(set(logged)) == len(logged), f"{model} loaded twice in a process"
  pids = {pid for pid, _ in loads}
  assert os.getpid() not in pids
  assert 1 <= len(pids) <= workers


@pytest.fixture(scope="module")
def direct(tiny_models, photo_dir, tmp_path_factory):
  """The reference: the in-process DirectRunner."""
  out = tmp_path_factory.mktemp("direct") / "out"
  report = _run(out, photo_dir, tiny_models)
  assert report["model_loads"] == {m: 1 for m in MODELS}
  return out, report


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _wait_for_port(port, proc, timeout_s=120):
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"worker pool exited with status {proc.returncode}")
    try:
      with socket.create_connection(("localhost", port), timeout=1):
        return
    except OSError:
      time.sleep(0.2)
  raise RuntimeError(f"worker pool did not listen on port {port}")


@pytest.fixture(scope="module")
def worker_pool(tmp_path_factory):
  """An external SDK worker pool, as a subprocess outside the repository."""
  tmp = tmp_path_factory.mktemp("pool")
  log_path = tmp / "workers.log"
  pool_log = tmp / "pool.log"
  port = _free_port()
  env = dict(os.environ, **_worker_env(tmp, log_path))
  with open(pool_log, "wb") as err:
    proc = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
         f"--service_port={port}"],
        cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=err, start_new_session=True)
  try:
    _wait_for_port(port, proc)
    yield port, log_path, pool_log
  finally:
    # The pool and the harnesses it started, by the pool's process group.
    for sig in (signal.SIGTERM, signal.SIGKILL):
      try:
        os.killpg(proc.pid, sig)
      except ProcessLookupError:
        break
      try:
        proc.wait(timeout=10)
        break
      except subprocess.TimeoutExpired:
        continue


@pytest.fixture(scope="module")
def portable(worker_pool, tiny_models, photo_dir, tmp_path_factory):
  port, log_path, pool_log = worker_pool
  out = tmp_path_factory.mktemp("portable") / "out"
  report = _run(out, photo_dir, tiny_models,
                "--runner=PortableRunner", "--job_endpoint=embed",
                "--environment_type=EXTERNAL",
                f"--environment_config=localhost:{port}")
  workers = 0
  for path in (pool_log, log_path):  # the hook's handler takes the pool's log
    if os.path.exists(path):
      with open(path, encoding="utf-8", errors="replace") as f:
        workers += sum(POOL_STARTED_WORKER in line for line in f)
  return out, report, _load_lines(log_path, tiny_models), workers


def test_portable_runner_tables_equal_direct_runner(portable, direct):
  out, report, _, _ = portable
  _assert_same_tables(out, direct[0])
  assert table_rows(report) == table_rows(direct[1])
  assert report["inputs"] == direct[1]["inputs"]
  assert report["errors"]["by_stage"] == {"decode": 1}


def test_portable_runner_loads_models_once_per_worker_process(portable):
  _, report, loads, workers = portable
  _assert_loads_once_per_process(report, loads, workers)


@pytest.fixture(scope="module")
def multi_process(tiny_models, photo_dir, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multi")
  log_path = tmp / "workers.log"
  with pytest.MonkeyPatch.context() as mp:
    for key, value in _worker_env(tmp, log_path).items():
      mp.setenv(key, value)
    report = _run(tmp / "out", photo_dir, tiny_models,
                  "--direct_running_mode=multi_processing",
                  "--direct_num_workers=2")
  return tmp / "out", report, _load_lines(log_path, tiny_models)


def test_multi_process_direct_runner_tables_equal_direct_runner(multi_process,
                                                                direct):
  out, report, _ = multi_process
  _assert_same_tables(out, direct[0])
  assert table_rows(report) == table_rows(direct[1])


def test_multi_process_direct_runner_loads_models_once_per_process(
    multi_process):
  _, report, loads = multi_process
  _assert_loads_once_per_process(report, loads, workers=2)
