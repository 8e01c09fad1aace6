"""Which scheme a URI has, what reads it, and reading through FileSystems.

Local paths and ``file://`` URIs, ``gs://`` and ``s3://`` are read through
Beam's ``FileSystems``; the Cloud Storage and S3 clients retry transient
failures themselves (with their own backoff), so a failure they raise has
already been retried.  A scheme nothing installed reads is refused before
the job starts (``check_schemes``), naming the extra to install.
"""

from __future__ import annotations

import re
import urllib.parse
import urllib.request
from typing import Callable, Iterable, Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from natvision.transforms.fetch.errors import (FetchError, SchemeError, is_not_found,
                                     is_transient, too_large)

HTTP_SCHEMES = ("http", "https")
# Schemes read through Beam's FileSystems whose clients retry on their own.
SELF_RETRYING_SCHEMES = ("gs", "s3")
# The pip extra that installs a scheme's filesystem.
SCHEME_EXTRAS = {"gs": "gcp", "s3": "aws"}



def scheme_of(uri: str) -> str:
  """The URI's scheme in lower case; ``""`` for a local path (or file://)."""
  match = re.match(r"^([A-Za-z][-A-Za-z0-9+.]*)://", uri)
  if not match:
    return ""
  scheme = match.group(1).lower()
  return "" if scheme == "file" else scheme


def local_path(uri: str) -> str:
  """A ``file://`` URI as a local path; any other URI unchanged."""
  if uri[:7].lower() != "file://":
    return uri
  parsed = urllib.parse.urlsplit(uri)
  if parsed.netloc not in ("", "localhost"):
    return uri
  return urllib.request.url2pathname(parsed.path)


def check_scheme(uri: str) -> None:
  """Checks that something installed can read ``uri``; no I/O.

  Raises:
    SchemeError: naming the scheme and the extra to install.
  """
  scheme = scheme_of(uri)
  if scheme in ("",) + HTTP_SCHEMES:
    return
  try:
    FileSystems.get_filesystem(f"{scheme}://x/y")
  except ValueError:
    extra = SCHEME_EXTRAS.get(scheme)
    if extra:
      raise SchemeError(
          f"{scheme}:// needs the {extra} extra: pip install "
          f"'natvision[{extra}]' (found in {uri})") from None
    raise SchemeError(
        f"no installed filesystem reads {scheme}:// (found in {uri}); "
        f"natvision reads local paths, file://, http(s)://, gs:// "
        f"(natvision[gcp]) and s3:// (natvision[aws])") from None


def check_schemes(uris: Iterable[str]) -> None:
  """``check_scheme`` once per distinct scheme of ``uris``.

  Raises:
    SchemeError: the first scheme nothing installed reads.
  """
  seen = set()
  for uri in uris:
    scheme = scheme_of(uri)
    if scheme not in seen:
      seen.add(scheme)
      check_scheme(uri)



def read_filesystem(uri: str, max_bytes: int,
                    opener: Optional[Callable] = None) -> bytes:
  """Reads a photo through Beam's FileSystems (local, file://, gs://, s3://).

  Args:
    uri: where the photo is.
    max_bytes: larger files are refused without being read whole.
    opener: opens a URI for reading; Beam's FileSystems by default.

  Raises:
    FetchError: missing, too large, or a storage failure.
  """
  path = local_path(uri)
  if scheme_of(uri) == "s3":
    _ensure_filesystem_options()
  try:
    if opener is None:
      f = FileSystems.open(path,
                           compression_type=CompressionTypes.UNCOMPRESSED)
    else:
      f = opener(path)
    with f:
      data = f.read(max_bytes + 1)
  except FetchError:
    raise
  except Exception as e:  # noqa: BLE001 - classified by type below
    if is_not_found(e):
      raise FetchError(f"file not found: {uri}", not_found=True) from e
    scheme = scheme_of(uri)
    if isinstance(e, ValueError) and scheme and scheme not in HTTP_SCHEMES:
      try:
        check_scheme(uri)
      except SchemeError as missing:
        raise FetchError(str(missing)) from e
    raise FetchError(f"{type(e).__name__}: {e}",
                     transient=is_transient(e)) from e
  if len(data) > max_bytes:
    raise too_large(max_bytes)
  return data


def _ensure_filesystem_options() -> None:
  """Gives Beam's FileSystems default options when none were set.

  Beam's S3 filesystem refuses to work without pipeline options, even when
  every S3 option is at its default; a pipeline sets them, a plain call
  (a test, a tool) may not have.
  """
  if FileSystems._pipeline_options is None:  # pylint: disable=protected-access
    from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
    FileSystems.set_options(PipelineOptions([]))

