"""transforms/runtimes/onnx_store.py: cache keys, one maker, writes, copies.

Remote files are ``faulty://`` ones (tests/faulty_fs.py, an in-process Beam
filesystem over local files), so a copy between filesystems needs no
server.
"""

import os
import threading
import types

import pytest

from tests import faulty_fs
from natvision.transforms.runtimes import onnx_store


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  folder = str(tmp_path / "cache")
  monkeypatch.setenv("NATVISION_ONNX_CACHE", folder)
  return folder


def test_cache_names_depend_on_content_never_on_the_model_path(cache):
  # Only the name and the path of a resolved model are read here.
  resolved = types.SimpleNamespace(name="inaturalist_v2",
                                   path="/models/inaturalist_v2")
  moved = types.SimpleNamespace(name="inaturalist_v2",
                                path="/elsewhere/inaturalist_v2")
  path = onnx_store.cached_onnx_path(resolved, "f" * 32)
  assert os.path.dirname(path) == cache
  assert os.path.basename(path).startswith("inaturalist_v2-")
  assert onnx_store.cached_onnx_path(moved, "f" * 32) == path
  assert onnx_store.cached_onnx_path(resolved, "e" * 32) != path
  # The parts are joined unambiguously: ("ab", "c") is not ("a", "bc").
  assert (onnx_store.cached_path("m", ".x", "ab", "c")
          != onnx_store.cached_path("m", ".x", "a", "bc"))
  assert onnx_store.cached_path("m", ".int8.onnx", "a").endswith(".int8.onnx")


def test_a_file_is_made_once_by_threads_that_race(cache):
  path = os.path.join(cache, "m.onnx")
  made, results = [], []
  start = threading.Barrier(4)

  def make(target):
    made.append(target)
    onnx_store.write_atomically(target, b"bytes")

  def race():
    start.wait()
    results.append(onnx_store.make_once(path, make))

  threads = [threading.Thread(target=race) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert made == [path] and sorted(results) == [False, False, False, True]
  assert onnx_store.make_once(path, make) is False and made == [path]
  # write_atomically leaves the file alone, no temporary next to it.
  assert sorted(os.listdir(cache)) == [".convert.lock", "m.onnx"]
  assert oct(os.stat(path).st_mode & 0o777) == "0o644"


def test_copies_between_filesystems_keep_an_existing_target(tmp_path):
  source = str(tmp_path / "a.onnx")
  onnx_store.write_atomically(source, b"first")
  remote = faulty_fs.remote(str(tmp_path / "bucket" / "a.onnx"))
  assert onnx_store.copy_file(source, remote) == remote
  onnx_store.write_atomically(source, b"second")
  onnx_store.copy_file(source, remote)  # kept: named by content
  assert open(faulty_fs.local(remote), "rb").read() == b"first"
  onnx_store.copy_file(source, remote, replace=True)
  assert open(faulty_fs.local(remote), "rb").read() == b"second"


def test_a_remote_file_is_copied_alone_into_the_cache(tmp_path, cache):
  local = str(tmp_path / "here.onnx")
  assert onnx_store.local_copy(local, "ignored.onnx") == local
  remote = faulty_fs.remote(str(tmp_path / "bucket" / "m.onnx"))
  onnx_store.write_atomically(remote, b"model")
  copy = onnx_store.local_copy(remote, "m-copy.onnx")
  assert copy == os.path.join(cache, "m-copy.onnx")
  assert open(copy, "rb").read() == b"model"
  missing = onnx_store.local_copy(faulty_fs.remote(str(tmp_path / "no")),
                                  "no.onnx")
  assert missing == os.path.join(cache, "no.onnx")
  assert not os.path.exists(missing)
