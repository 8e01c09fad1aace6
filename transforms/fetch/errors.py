"""What can go wrong fetching a photo, and which failures a retry may fix.

The error types of the fetch layer (``FetchError`` and its kinds), and the
typed predicates ``is_transient`` and ``is_not_found``: whether a failure
is worth retrying, or means "no such photo", is decided by the types of
the exception and its causes (builtins, ``google.api_core``, urllib3,
requests, botocore and Beam's S3 client, each imported only when
installed), never from its message.
"""

from __future__ import annotations

import functools
import http.client
from typing import Optional, Tuple

from natvision.transforms import config

# Statuses that mean "no such photo", and those whose Retry-After counts.
NOT_FOUND_STATUS = (404, 410)
RETRY_AFTER_STATUS = (429, 503)


class FetchError(Exception):
  """A photo's bytes could not be fetched; the message is the reason.

  Attributes:
    transient: a retry may succeed (reset, timeout, 429, 5xx).
    not_found: storage answered that there is no such photo.
    retry_after: seconds the server asked to wait before retrying.
  """

  def __init__(self, message: str, transient: bool = False,
               not_found: bool = False, retry_after: Optional[float] = None):
    super().__init__(message)
    self.transient = transient
    self.not_found = not_found
    self.retry_after = retry_after


class PhotoTimeout(FetchError):
  """A photo's fetch ran past ``--photo_timeout``; not retried."""


class HostUnavailable(FetchError):
  """The photo's host has its circuit breaker open; no request was sent."""


def photo_timeout_error(seconds: float, url: str,
                        detail: str = "") -> PhotoTimeout:
  """The error of a photo with no complete response within ``seconds``."""
  more = f"; {detail}" if detail else ""
  return PhotoTimeout(f"photo_timeout: no complete response within "
                      f"{seconds:g} s ({url}){more}")


class HttpStatusError(Exception):
  """An HTTP response whose status is not 200."""

  def __init__(self, status: int, reason: str, url: str,
               retry_after: Optional[float] = None):
    super().__init__(f"HTTP {status} {reason} from {url}")
    self.status = status
    self.retry_after = retry_after


class SchemeError(config.ConfigError):
  """A URI scheme that nothing installed can read; says what to install."""

def too_large(max_bytes: int) -> FetchError:
  """The error of a photo over ``--max_file_bytes``."""
  return FetchError(f"file is larger than --max_file_bytes {max_bytes}; raise "
                    f"the flag to process it")


@functools.lru_cache(maxsize=None)
def _transient_types() -> Tuple[type, ...]:
  """Exception types that mean "try again", from what is installed."""
  kinds = [ConnectionError, TimeoutError, http.client.IncompleteRead]
  try:
    from google.api_core import exceptions as gexc  # pylint: disable=import-outside-toplevel
    kinds += [gexc.TooManyRequests, gexc.InternalServerError,
              gexc.BadGateway, gexc.ServiceUnavailable, gexc.GatewayTimeout,
              gexc.DeadlineExceeded]
  except ImportError:
    pass
  try:
    import urllib3.exceptions as uexc  # pylint: disable=import-outside-toplevel
    kinds += [uexc.ProtocolError, uexc.TimeoutError, uexc.NewConnectionError,
              uexc.IncompleteRead]
  except ImportError:
    pass
  try:
    import requests.exceptions as rexc  # pylint: disable=import-outside-toplevel
    kinds += [rexc.ConnectionError, rexc.Timeout, rexc.ChunkedEncodingError]
  except ImportError:
    pass
  try:
    import botocore.exceptions as bexc  # pylint: disable=import-outside-toplevel
    kinds += [bexc.ConnectionError, bexc.HTTPClientError,
              bexc.IncompleteReadError]
    if hasattr(bexc, "ResponseStreamingError"):
      kinds.append(bexc.ResponseStreamingError)
  except ImportError:
    pass
  return tuple(kinds)


@functools.lru_cache(maxsize=None)
def _not_found_types() -> Tuple[type, ...]:
  kinds = [FileNotFoundError]
  try:
    from google.api_core import exceptions as gexc  # pylint: disable=import-outside-toplevel
    kinds.append(gexc.NotFound)
  except ImportError:
    pass
  return tuple(kinds)


def _status_of(err: BaseException) -> Optional[int]:
  """The HTTP status a typed storage error carries, if any."""
  if isinstance(err, HttpStatusError):
    return err.status
  try:
    from apache_beam.io.aws.clients.s3 import messages  # pylint: disable=import-outside-toplevel
    if isinstance(err, messages.S3ClientError):
      return err.code if isinstance(err.code, int) else None
  except ImportError:
    pass
  try:
    import botocore.exceptions as bexc  # pylint: disable=import-outside-toplevel
    if isinstance(err, bexc.ClientError):
      return err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
  except ImportError:
    pass
  try:
    from google.api_core import exceptions as gexc  # pylint: disable=import-outside-toplevel
    if isinstance(err, gexc.GoogleAPICallError):
      return err.code if isinstance(err.code, int) else None
  except ImportError:
    pass
  return None


def _chain(e: Optional[BaseException]):
  """The exception, its causes and wrapped reasons, each once."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    reason = getattr(e, "reason", None)  # urllib3's MaxRetryError
    if isinstance(reason, BaseException):
      yield from _chain(reason)
    details = getattr(e, "exception_details", None)  # Beam's BeamIOError
    if isinstance(details, dict):
      for inner in details.values():
        if isinstance(inner, BaseException):
          yield from _chain(inner)
    e = e.__cause__ or e.__context__


def is_transient(e: BaseException) -> bool:
  """Whether a storage or HTTP error is worth retrying (5xx, 429, resets,
  timeouts), by the types of the exception and its causes."""
  for err in _chain(e):
    if isinstance(err, FetchError):
      return err.transient
    if isinstance(err, FileNotFoundError):
      return False
    status = _status_of(err)
    if status is not None:
      return status == 429 or 500 <= status < 600
    if isinstance(err, _transient_types()):
      return True
  return False


def is_not_found(e: BaseException) -> bool:
  """Whether storage answered that there is no such file (404, 410,
  ENOENT), by the types of the exception and its causes."""
  for err in _chain(e):
    if isinstance(err, FetchError):
      return err.not_found
    if isinstance(err, _not_found_types()):
      return True
    if _status_of(err) in NOT_FOUND_STATUS:
      return True
  return False

