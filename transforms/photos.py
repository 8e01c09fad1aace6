"""The per-photo stage: read bytes, decode once, prepare for every model.

One DoFn does the three steps so that the full-size decoded photo never
leaves the worker: what travels on is a ``PreparedImage`` holding one small
uint8 array per preparation policy the chosen models need.  A failure at any
step becomes an ``ErrorRecord`` (stage ``read``, ``decode`` or ``prepare``) on
the errors output; the job goes on.

Reads that fail with a transient storage error are retried with exponential
backoff a bounded number of times before they become an error row.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import random
import time
import uuid
from typing import Callable, Iterator, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from transforms import decode as decode_lib
from transforms import preprocess
from transforms import progress
from transforms import uris
from transforms.records import (ERRORS_TAG, STAGE_DECODE, STAGE_PREPARE,
                                STAGE_READ, ErrorRecord, ImageRef,
                                PreparedImage)

DEFAULT_MAX_FILE_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_DECODE_THREADS = 2
DEFAULT_PREFETCH = 32
DEFAULT_COLOR_PROFILE = decode_lib.COLOR_PROFILE_IGNORE
COLOR_PROFILES = decode_lib.COLOR_PROFILES


class ReadError(Exception):
  """A photo's bytes could not be read; the message is the readable reason."""

  def __init__(self, message: str, transient: bool = False):
    super().__init__(message)
    self.transient = transient


_TRANSIENT_NAMES = (
    "ServiceUnavailable", "TooManyRequests", "InternalServerError",
    "GatewayTimeout", "BadGateway", "DeadlineExceeded", "RetryError",
    "ConnectionError", "ConnectionResetError", "TimeoutError",
    "TransportError", "ChunkedEncodingError", "IncompleteRead",
)


def _chain(e: BaseException):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def is_transient(e: BaseException) -> bool:
  """Whether a storage exception is worth retrying (5xx, 429, timeouts)."""
  for err in _chain(e):
    if isinstance(err, ReadError):
      return err.transient
    if type(err).__name__ in _TRANSIENT_NAMES or isinstance(
        err, (ConnectionError, TimeoutError)):
      return True
    code = getattr(err, "code", None)
    if isinstance(code, int) and (code == 429 or 500 <= code < 600):
      return True
  return False


def _is_not_found(e: BaseException) -> bool:
  for err in _chain(e):
    if isinstance(err, FileNotFoundError) or type(err).__name__ == "NotFound":
      return True
    if getattr(err, "code", None) == 404:
      return True
    if "No such file" in str(err) or "not found" in str(err).lower():
      return True
  return False


def read_bytes(uri: str, max_bytes: int,
               opener: Callable = FileSystems.open) -> bytes:
  """Reads a whole file, refusing files larger than ``max_bytes``.

  Raises:
    ReadError: missing file, too large, or a storage failure (``transient``
      set when a retry may help).
  """
  if not uri:
    raise ReadError("empty uri")
  try:
    with opener(uri) as f:
      data = f.read(max_bytes + 1)
  except ReadError:
    raise
  except Exception as e:  # noqa: BLE001 - storage clients raise many kinds
    if _is_not_found(e):
      raise ReadError(f"file not found: {uri}") from e
    raise ReadError(f"{type(e).__name__}: {e}", transient=is_transient(e)) from e
  if len(data) > max_bytes:
    raise ReadError(
        f"file is larger than --max_file_bytes {max_bytes}; raise the flag to "
        f"process it")
  return data


def read_with_retries(uri: str, max_bytes: int, attempts: int = 4,
                      base_delay: float = 0.5,
                      opener: Callable = FileSystems.open,
                      sleep: Callable[[float], None] = time.sleep,
                      on_retry: Optional[Callable[[], None]] = None) -> bytes:
  """``read_bytes`` with exponential backoff (and jitter) on transient errors.

  Args:
    attempts: total tries, at least 1.
    base_delay: seconds before the first retry; doubled each time.
    opener, sleep: injectable for tests.
    on_retry: called before each retry (to count them).
  """
  for attempt in range(1, attempts + 1):
    try:
      return read_bytes(uri, max_bytes, opener=opener)
    except ReadError as e:
      if not e.transient or attempt == attempts:
        if e.transient:
          raise ReadError(f"{e} (gave up after {attempts} attempts)") from e
        raise
      if on_retry is not None:
        on_retry()
      delay = base_delay * (2 ** (attempt - 1)) * (0.5 + random.random())
      logging.warning("transient read failure for %s (%s); retrying in %.1fs",
                      uri, e, delay)
      sleep(delay)
  raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class PhotoConfig:
  """How photos are read, decoded and prepared.

  Attributes:
    policies: preparation policies needed by the chosen models.
    size: model input size in pixels.
    max_file_bytes: files larger than this are refused (stage read).
    max_pixels: photos declaring more pixels are refused before decoding.
    read_attempts: tries per read on transient storage errors.
    retry_base_delay: seconds before the first retry, doubled each time.
    expected_total: number of inputs when known, for progress lines.
    run_id: the run whose progress counter the photos tick; None: a
      counter of its own for each pipeline built.
    decode_threads: threads reading and decoding ahead; 0 decodes inline.
    prefetch: photos in flight ahead of what has been emitted.
    color_profile: ``ignore`` (embedded ICC profiles are not applied, as
      the seed models were trained) or ``srgb`` (non-sRGB profiles are
      converted to sRGB).
  """

  policies: Tuple[str, ...]
  size: int = 299
  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
  max_pixels: int = DEFAULT_MAX_PIXELS
  read_attempts: int = 4
  retry_base_delay: float = 0.5
  expected_total: Optional[int] = None
  run_id: Optional[str] = None
  decode_threads: int = DEFAULT_DECODE_THREADS
  prefetch: int = DEFAULT_PREFETCH
  color_profile: str = DEFAULT_COLOR_PROFILE

  def __post_init__(self):
    if not self.policies:
      raise ValueError("PhotoConfig needs at least one preparation policy")
    if self.max_file_bytes <= 0:
      raise ValueError("--max_file_bytes must be positive")
    if self.max_pixels <= 0:
      raise ValueError("--max_pixels must be positive")
    if self.read_attempts < 1:
      raise ValueError("--read_attempts must be at least 1")
    if self.decode_threads < 0:
      raise ValueError("--decode_threads must be 0 (no pool) or more")
    if self.prefetch < 1:
      raise ValueError("--prefetch must be at least 1")
    decode_lib.check_color_profile(self.color_profile)


def read_decode_prepare(ref: ImageRef, config: PhotoConfig, min_side: int,
                        opener: Callable = FileSystems.open):
  """One photo through read, decode and prepare; never raises.

  Returns:
    (result, retries): a PreparedImage or an ErrorRecord naming the stage
    that failed, and the number of read retries it took.
  """
  retries = []
  stage = STAGE_READ
  try:
    data = read_with_retries(
        ref.location, config.max_file_bytes, attempts=config.read_attempts,
        base_delay=config.retry_base_delay, opener=opener,
        on_retry=lambda: retries.append(1))
    stage = STAGE_DECODE
    image = decode_lib.decode_image(data, min_side=min_side,
                                    max_pixels=config.max_pixels,
                                    color_profile=config.color_profile,
                                    filename=ref.uri)
    del data
    stage = STAGE_PREPARE
    arrays = preprocess.prepare_all(image, config.policies, config.size)
    source_width, source_height = image.info[decode_lib.ORIGINAL_SIZE_KEY]
  except Exception as e:  # noqa: BLE001 - one bad photo never stops a job
    return ErrorRecord(ref=ref, stage=stage, error=_reason(e)), len(retries)
  prepared = PreparedImage(
      ref=ref, arrays=arrays, source_width=source_width,
      source_height=source_height, decoded_width=image.width,
      decoded_height=image.height)
  return prepared, len(retries)


class ReadDecodePrepareFn(beam.DoFn):
  """ImageRef -> PreparedImage, or ErrorRecord on the ``errors`` output.

  Photos are read and decoded by a small thread pool, ``prefetch`` photos
  ahead of what has been emitted, so that storage reads and JPEG decoding
  (which release the GIL) overlap with the model's forward pass downstream
  in the same bundle.  Results are emitted in input order; what is still in
  flight at the end of a bundle is emitted in ``finish_bundle``.
  """

  def __init__(self, config: PhotoConfig, opener: Optional[Callable] = None):
    self._config = config
    self._opener = opener
    self._min_side = decode_lib.decoded_size_needed(config.policies,
                                                    config.size)
    self._ok = beam.metrics.Metrics.counter("natvision", "photos_prepared")
    self._failed = beam.metrics.Metrics.counter("natvision", "photos_failed")
    self._retries = beam.metrics.Metrics.counter("natvision", "read_retries")
    self._pool = None
    self._in_flight = None
    self._progress = None
    # Made here, in the launcher, so that every copy of this DoFn in a
    # process ticks the same counter, and a later pipeline another one.
    self._run_key = config.run_id or f"pipeline-{uuid.uuid4().hex}"

  def setup(self):
    self._progress = progress.for_run(self._run_key,
                                      self._config.expected_total)
    if self._config.decode_threads > 0:
      self._pool = concurrent.futures.ThreadPoolExecutor(
          self._config.decode_threads, thread_name_prefix="natvision-decode")

  def teardown(self):
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)

  def start_bundle(self):
    self._in_flight = collections.deque()

  def _work(self, ref: ImageRef):
    return read_decode_prepare(ref, self._config, self._min_side,
                               self._opener or FileSystems.open)

  def _emit(self, outcome, windowed: bool = False):
    # Counters are updated here, on the bundle's thread: Beam's metrics
    # container is thread-local, so increments in pool threads would be lost.
    result, retries = outcome
    if retries:
      self._retries.inc(retries)
    self._progress.tick()
    failed = isinstance(result, ErrorRecord)
    (self._failed if failed else self._ok).inc()
    value = result
    if windowed:  # outputs of finish_bundle need an explicit window
      value = WindowedValue(result, MIN_TIMESTAMP, [GlobalWindow()])
    return beam.pvalue.TaggedOutput(ERRORS_TAG, value) if failed else value

  def process(self, ref: ImageRef) -> Iterator:
    if self._pool is None:
      yield self._emit(self._work(ref))
      return
    self._in_flight.append(self._pool.submit(self._work, ref))
    while self._in_flight and (len(self._in_flight) > self._config.prefetch
                               or self._in_flight[0].done()):
      yield self._emit(self._in_flight.popleft().result())

  def finish_bundle(self) -> Iterator:
    while self._in_flight:
      yield self._emit(self._in_flight.popleft().result(), windowed=True)


def _reason(e: BaseException) -> str:
  # A file name that is not UTF-8 may be quoted in the message: keep the
  # message valid text for the errors table.
  if isinstance(e, (ReadError, decode_lib.DecodeError)):
    return uris.readable(str(e))
  return uris.readable(f"{type(e).__name__}: {e}")


class ReadAndPrepare(beam.PTransform):
  """PCollection[ImageRef] -> (prepared, errors) tagged outputs."""

  def __init__(self, config: PhotoConfig, opener: Optional[Callable] = None):
    super().__init__()
    self._config = config
    self._opener = opener

  def expand(self, refs):
    return refs | "ReadDecodePrepare" >> beam.ParDo(
        ReadDecodePrepareFn(self._config, self._opener)).with_outputs(
            ERRORS_TAG, main="prepared")


def needed_policies(resize_policies: Sequence[str]) -> Tuple[str, ...]:
  """The distinct policies, in a stable order."""
  return tuple(sorted(set(resize_policies)))
