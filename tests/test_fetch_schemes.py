"""Schemes: local paths, file:// URIs, and what an unknown scheme needs."""


import pytest

from natvision.transforms import fetch



def test_file_uri_is_a_local_path(tmp_path):
  (tmp_path / "a b.jpg").write_bytes(b"abc")
  uri = "file://" + str(tmp_path / "a%20b.jpg")
  assert fetch.local_path(uri) == str(tmp_path / "a b.jpg")
  assert fetch.fetch_bytes(uri, 10) == b"abc"
  assert fetch.scheme_of(uri) == "" and fetch.scheme_of("HTTPS://x/y") == "https"

def test_unknown_scheme_names_the_extra(monkeypatch):
  with pytest.raises(fetch.SchemeError, match="no installed filesystem reads "
                     "ftp://"):
    fetch.check_schemes(["/a.jpg", "https://x/y.jpg", "ftp://h/a.jpg"])
  fetch.check_schemes(["/a.jpg", "https://x/y.jpg", "gs://b/a", "s3://b/a"])
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel

  def no_fs(path):
    raise ValueError("Unable to get filesystem from specified path")

  monkeypatch.setattr(FileSystems, "get_filesystem", staticmethod(no_fs))
  with pytest.raises(fetch.SchemeError,
                     match=r"s3:// needs the aws extra: pip install "
                     r"'natvision\[aws\]'"):
    fetch.check_scheme("s3://bucket/a.jpg")
