"""URIs and file names that are not valid text.

On Linux a file name is any bytes.  Python hands a name that is not valid
UTF-8 (``b'caf\\xe9.jpg'``, saved by an old Latin-1 system) over as a str
with "surrogate escapes" (PEP 383): ``'caf\\udce9.jpg'``.  Such a str opens
the right file, but it cannot be encoded as UTF-8, so it cannot be hashed,
written to Parquet or JSON as is.  A JSON manifest can also hold lone
surrogates (``"\\ud800"``).

This module turns such a str into what each use needs:

- ``uri_bytes``: the bytes it stands for (for a stable id);
- ``readable``: a valid str for tables and messages, with each undecodable
  byte written as ``\\xNN`` (``'caf\\\\xe9.jpg'``);

while the original str stays the path that is read.
"""

from __future__ import annotations


def is_text(value: str) -> bool:
  """Whether ``value`` encodes as UTF-8 (no surrogates)."""
  try:
    value.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def uri_bytes(uri: str) -> bytes:
  """The bytes a URI or file name stands for.

  Args:
    uri: a str, possibly holding surrogate escapes of undecodable bytes.

  Returns:
    Its UTF-8 bytes, with surrogate escapes turned back into the original
    bytes (lone surrogates of other origins are kept as their UTF-8 form), so
    the same name gives the same bytes in every run.
  """
  try:
    return uri.encode("utf-8", "surrogateescape")
  except UnicodeEncodeError:
    return uri.encode("utf-8", "surrogatepass")


def readable(value: str) -> str:
  """``value`` itself when it is valid text, else a readable valid str.

  Args:
    value: a URI, file name or message that may hold surrogates.

  Returns:
    A str that encodes as UTF-8: undecodable bytes are written ``\\xNN``.
  """
  if is_text(value):
    return value
  return uri_bytes(value).decode("utf-8", "backslashreplace")
