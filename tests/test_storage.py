"""transforms/storage.py: storage calls that never read a failure as "nothing".

On local files: ``match``, ``match_metadata``, ``exists``, ``read_bytes``
and ``write_bytes`` answer what is there ("nothing" only for what is not
there).  A failing filesystem call (``FileSystems`` patched to raise) comes
out as a ``StorageError`` naming the operation and the path, never as an
empty answer.  tests/test_storage_faults.py and tests/test_commit.py run
whole jobs and the commit against failing storage.
"""

import os

import pytest
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import storage


def test_local_files_round_trip(tmp_path):
  a, b = str(tmp_path / "a.bin"), str(tmp_path / "b.bin")
  storage.write_bytes(a, b"alpha")
  storage.write_bytes(b, b"")
  assert storage.read_bytes(a) == b"alpha" and storage.read_bytes(b) == b""
  assert storage.exists(a) and storage.exists(str(tmp_path))
  assert storage.match(str(tmp_path / "*.bin")) == [a, b]
  assert [(p, size) for p, size, _ in storage.match_metadata(
      str(tmp_path / "*.bin"))] == [(a, 5), (b, 0)]
  # What is not there is an empty answer, not an error...
  assert storage.match(str(tmp_path / "nowhere" / "*")) == []
  assert storage.exists(str(tmp_path / "nowhere")) is False
  # ...except for a read, which needs the file.
  with pytest.raises(storage.StorageError, match="reading .*nowhere"):
    storage.read_bytes(str(tmp_path / "nowhere"))


def _failing(*args, **kwargs):
  raise BeamIOError("match failed", {"gs://b/t/*": PermissionError("403")})


@pytest.mark.parametrize("call,method,words", [
    (lambda: storage.match("gs://b/t/*"), "match", "listing gs://b/t/*"),
    (lambda: storage.match_metadata("gs://b/t/*"), "match",
     "listing gs://b/t/*"),
    (lambda: storage.exists("gs://b/t/x"), "exists",
     "checking whether gs://b/t/x exists"),
    (lambda: storage.read_bytes("gs://b/t/x"), "open", "reading gs://b/t/x"),
    (lambda: storage.write_bytes("gs://b/t/x", b"1"), "create",
     "writing gs://b/t/x"),
])
def test_a_failure_raises_naming_the_path(monkeypatch, call, method, words):
  monkeypatch.setattr(FileSystems, method, staticmethod(_failing))
  with pytest.raises(storage.StorageError) as raised:
    call()
  # The reason is Beam's inner exception, not its wrapper.
  assert str(raised.value) == f"{words} failed: PermissionError: 403"


def test_a_failed_write_is_abandoned_and_named():
  closed = []

  class Broken:
    def write(self, data):
      raise OSError("disk full")

    def terminate(self):
      closed.append("terminated")

  with pytest.raises(storage.StorageError,
                     match="writing /x/y failed: disk full"):
    with storage.failing_as("writing", "/x/y", abandon=Broken()):
      Broken().write(b"data")
  assert closed == ["terminated"]


def test_same_folder_relative_and_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.same_folder(os.path.join(str(tmp_path), "out", "f"), "out")
  assert not storage.same_folder(os.path.join(str(tmp_path), "out", "sub",
                                              "f"), "out")
