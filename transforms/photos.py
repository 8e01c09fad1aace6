"""The per-photo stage: read bytes, decode once, prepare for every model.

One DoFn does the three steps so that the full-size decoded photo never
leaves the worker: what travels on is a ``PreparedImage`` holding one small
uint8 array per preparation policy the chosen models need.  A failure at any
step becomes an ``ErrorRecord`` (stage ``read``, ``decode`` or ``prepare``) on
the errors output; the job goes on.

Bytes are fetched by ``transforms.fetch`` (by scheme: Beam's FileSystems or
a pooled HTTP client), on a pool of fetch threads shared by the worker
process (``--fetch_concurrency``) and apart from the decode threads, so that
many slow requests can be in flight while a few threads decode.

Local, gs:// and s3:// photos go through ``ReadDecodePrepareFn`` here as
they are; http(s) photos are keyed by host and slot first
(transforms/hosts.py) and go through transforms/photos_keyed.py's
``HostKeyedReadDecodePrepareFn``, a stateful DoFn built on this one that
fetches one photo of a key at a time, so that ``--per_host_concurrency``
holds for the whole job.  Both decode and prepare the same way, once per
photo for all models; ``photos_keyed.ReadAndPrepare`` wires the two.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
import uuid
from typing import Callable, Iterator, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from natvision.transforms import config
from natvision.transforms import decode as decode_lib
from natvision.transforms import fetch as fetch_lib
from natvision.transforms.fetch import breaker as breaker_lib
from natvision.transforms import preprocess
from natvision.transforms import progress
from natvision.transforms import rgb
from natvision.transforms import uris
from natvision.transforms.records import (ERRORS_TAG, STAGE_DECODE, STAGE_PREPARE,
                                STAGE_READ, ErrorRecord, ImageRef,
                                PreparedImage)

DEFAULT_MAX_FILE_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_DECODE_THREADS = 2
DEFAULT_PREFETCH = 32
DEFAULT_COLOR_PROFILE = rgb.COLOR_PROFILE_IGNORE
COLOR_PROFILES = rgb.COLOR_PROFILES


# How bytes are fetched (and which failures are retried) is decided by
# transforms.fetch; its error, by the name the stages here use.
ReadError = fetch_lib.FetchError


def read_bytes(uri: str, max_bytes: int,
               opener: Optional[Callable] = None) -> bytes:
  """One attempt at a photo's bytes, refusing more than ``max_bytes``.

  Raises:
    ReadError: missing file, too large, or a storage failure (``transient``
      set when a retry may help).
  """
  return fetch_lib.fetch_bytes(uri, max_bytes, attempts=1, opener=opener)


def read_with_retries(uri: str, max_bytes: int, attempts: int = 4,
                      base_delay: float = 0.5,
                      opener: Optional[Callable] = None,
                      sleep: Callable[[float], None] = time.sleep,
                      on_retry: Optional[Callable[[], None]] = None,
                      fetch: Optional[fetch_lib.FetchConfig] = None,
                      guard: Optional[breaker_lib.SlotBreaker] = None
                      ) -> bytes:
  """A photo's bytes, with retries where its scheme needs them.

  See ``transforms.fetch.fetch_bytes``: http(s) and local reads are retried
  on transient errors with exponential backoff (Retry-After honoured);
  gs:// and s3:// reads are tried once, their clients having retried.

  Args:
    attempts: total tries, at least 1.
    base_delay: seconds before the first retry; doubled each time.
    opener, sleep: injectable for tests.
    on_retry: called before each retry (to count them).
    fetch: the fetch flags (http(s) client, timeouts, per-host cap).
    guard: the breaker of the photo's host slot; None: the host's breaker
      in this worker process.

  Raises:
    ReadError: the reason the photo could not be read.
  """
  return fetch_lib.fetch_bytes(uri, max_bytes, fetch, attempts=attempts,
                               base_delay=base_delay, sleep=sleep,
                               on_retry=on_retry, opener=opener,
                               guard=guard)


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
    fetch: how bytes are fetched (concurrency, per-host cap, http client).
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
  fetch: fetch_lib.FetchConfig = fetch_lib.FetchConfig()

  def __post_init__(self):
    if not self.policies:
      raise config.ConfigError("PhotoConfig needs at least one preparation policy")
    if self.max_file_bytes <= 0:
      raise config.ConfigError("--max_file_bytes must be positive")
    if self.max_pixels <= 0:
      raise config.ConfigError("--max_pixels must be positive")
    if self.read_attempts < 1:
      raise config.ConfigError("--read_attempts must be at least 1")
    if self.decode_threads < 0:
      raise config.ConfigError("--decode_threads must be 0 (no pool) or more")
    if self.prefetch < 1:
      raise config.ConfigError("--prefetch must be at least 1")
    rgb.check_color_profile(self.color_profile)

  @staticmethod
  def add_flags(parser) -> None:
    """Adds the reading and decoding flags (and the fetch flags)."""
    parser.add_argument(
        "--max_file_bytes", type=int, default=DEFAULT_MAX_FILE_BYTES,
        help="files larger than this become errors (stage read)")
    parser.add_argument(
        "--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
        help="photos declaring more pixels are refused before decoding "
        "(decompression bombs)")
    parser.add_argument(
        "--color_profile", choices=COLOR_PROFILES,
        default=DEFAULT_COLOR_PROFILE,
        help="ignore: embedded ICC colour profiles are not applied (as the "
        "seed models were trained); srgb: photos with a non-sRGB profile "
        "(Adobe RGB, Display P3...) are converted to sRGB")
    parser.add_argument(
        "--read_attempts", type=int, default=4,
        help="tries per photo on transient storage errors")
    parser.add_argument(
        "--decode_threads", type=int, default=DEFAULT_DECODE_THREADS,
        help="threads per worker process decoding photos ahead of the "
        "models (0: decode inline)")
    parser.add_argument(
        "--prefetch", type=int, default=DEFAULT_PREFETCH,
        help="photos read and decoded ahead of the models, per bundle")
    fetch_lib.FetchConfig.add_flags(parser)

  @classmethod
  def from_args(cls, args, policies: Tuple[str, ...],
                size: int) -> "PhotoConfig":
    """Builds the config from parsed flags and the models' needs.

    Args:
      args: parsed flags (``add_flags``).
      policies: the preparation policies the job's models need.
      size: the models' input size in pixels.

    Raises:
      config.ConfigError: naming the flag that is wrong.
    """
    return cls(
        policies=policies, size=size, max_file_bytes=args.max_file_bytes,
        max_pixels=args.max_pixels, read_attempts=args.read_attempts,
        decode_threads=args.decode_threads, prefetch=args.prefetch,
        color_profile=args.color_profile,
        fetch=fetch_lib.FetchConfig.from_args(args))


def fetch_step(ref: ImageRef, config: PhotoConfig,
               opener: Optional[Callable] = None,
               guard: Optional[breaker_lib.SlotBreaker] = None):
  """Fetches one photo's bytes; never raises.

  Args:
    guard: the breaker of the photo's host slot (see ``read_with_retries``).

  Returns:
    (bytes or ErrorRecord of stage read, number of retries it took).
  """
  retries = []
  try:
    data = read_with_retries(
        ref.location, config.max_file_bytes, attempts=config.read_attempts,
        base_delay=config.retry_base_delay, opener=opener,
        on_retry=lambda: retries.append(1), fetch=config.fetch, guard=guard)
  except Exception as e:  # noqa: BLE001 - one bad photo never stops a job
    return ErrorRecord(ref=ref, stage=STAGE_READ, error=_reason(e)), len(
        retries)
  return data, len(retries)


def decode_step(ref: ImageRef, fetched, config: PhotoConfig, min_side: int):
  """Decodes and prepares fetched bytes; never raises.

  Args:
    fetched: what ``fetch_step`` returned.

  Returns:
    (PreparedImage or ErrorRecord naming the stage, number of retries).
  """
  data, retries = fetched
  if isinstance(data, ErrorRecord):
    return data, retries
  stage = STAGE_DECODE
  try:
    image = decode_lib.decode_image(data, min_side=min_side,
                                    max_pixels=config.max_pixels,
                                    color_profile=config.color_profile,
                                    filename=ref.uri)
    del data
    stage = STAGE_PREPARE
    arrays = preprocess.prepare_all(image, config.policies, config.size)
    source_width, source_height = image.info[decode_lib.ORIGINAL_SIZE_KEY]
  except Exception as e:  # noqa: BLE001 - one bad photo never stops a job
    return ErrorRecord(ref=ref, stage=stage, error=_reason(e)), retries
  prepared = PreparedImage(
      ref=ref, arrays=arrays, source_width=source_width,
      source_height=source_height, decoded_width=image.width,
      decoded_height=image.height)
  return prepared, retries


def read_decode_prepare(ref: ImageRef, config: PhotoConfig, min_side: int,
                        opener: Optional[Callable] = None):
  """One photo through read, decode and prepare, inline; never raises.

  Returns:
    (result, retries): a PreparedImage or an ErrorRecord naming the stage
    that failed, and the number of read retries it took.
  """
  return decode_step(ref, fetch_step(ref, config, opener), config, min_side)


class ReadDecodePrepareFn(beam.DoFn):
  """ImageRef -> PreparedImage, or ErrorRecord on the ``errors`` output.

  Each photo's bytes are fetched on the worker process's shared fetch
  pool (``--fetch_concurrency`` threads, see ``transforms.fetch``), then
  decoded and prepared on this DoFn's small decode pool
  (``--decode_threads``), so that many slow requests are in flight while a
  few threads decode, and both overlap with the model's forward pass
  downstream in the same bundle.  Up to max(``prefetch``,
  ``fetch_concurrency``) photos are in flight ahead of what has been
  emitted.  Results are emitted in input order; what is still in flight at
  the end of a bundle is emitted in ``finish_bundle``.  With no decode
  threads, photos are fetched and decoded inline.
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
    self._fetch_pool = None
    self._window = max(config.prefetch, config.fetch.fetch_concurrency)
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
      self._fetch_pool = fetch_lib.fetch_pool(
          self._config.fetch.fetch_concurrency)

  def teardown(self):
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)

  def start_bundle(self):
    self._in_flight = collections.deque()

  def _work(self, ref: ImageRef):
    return decode_step(ref, self._fetch(ref), self._config, self._min_side)

  def _fetch(self, ref: ImageRef, guard=None):
    """``fetch_step``, with the photo in the progress counter's in-flight
    list meanwhile (so that a slow host shows in the progress lines)."""
    token = self._progress.started(ref.uri)
    try:
      return fetch_step(ref, self._config, self._opener, guard)
    finally:
      self._progress.finished(token)

  def _result(self, future: concurrent.futures.Future):
    """The photo's outcome; while waiting, a progress line every interval
    (naming slow photos) even when none completes."""
    while not future.done():
      concurrent.futures.wait([future], timeout=progress.DEFAULT_INTERVAL_S)
      self._progress.tick(0)
    return future.result()

  def _submit(self, ref: ImageRef) -> concurrent.futures.Future:
    """Fetch on the shared fetch pool, then decode on this DoFn's pool;
    the future of the photo's outcome."""
    return self._submit_both(ref)[1]

  def _submit_both(self, ref: ImageRef, guard=None
                   ) -> Tuple[concurrent.futures.Future,
                              concurrent.futures.Future]:
    """As ``_submit``; also the future of the fetch alone (done when the
    bytes are in, before they are decoded).  With no decode pool, the
    photo is decoded on the fetch thread."""
    done = concurrent.futures.Future()

    def settle(step: concurrent.futures.Future) -> None:
      try:
        done.set_result(step.result())
      except BaseException as e:  # noqa: BLE001 - handed to the bundle
        done.set_exception(e)

    def decode(fetched: concurrent.futures.Future) -> None:
      try:
        if self._pool is None:
          done.set_result(decode_step(ref, fetched.result(), self._config,
                                      self._min_side))
          return
        self._pool.submit(decode_step, ref, fetched.result(), self._config,
                          self._min_side).add_done_callback(settle)
      except BaseException as e:  # noqa: BLE001 - e.g. pool shut down
        done.set_exception(e)

    fetching = self._fetch_pool.submit(self._fetch, ref, guard)
    fetching.add_done_callback(decode)
    return fetching, done

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
    self._in_flight.append(self._submit(ref))
    while self._in_flight and (len(self._in_flight) > self._window
                               or self._in_flight[0].done()):
      yield self._emit(self._result(self._in_flight.popleft()))

  def finish_bundle(self) -> Iterator:
    while self._in_flight:
      yield self._emit(self._result(self._in_flight.popleft()),
                       windowed=True)


def _reason(e: BaseException) -> str:
  # A file name that is not UTF-8 may be quoted in the message: keep the
  # message valid text for the errors table.
  if isinstance(e, (ReadError, decode_lib.DecodeError)):
    return uris.readable(str(e))
  return uris.readable(f"{type(e).__name__}: {e}")


def needed_policies(resize_policies: Sequence[str]) -> Tuple[str, ...]:
  """The distinct policies, in a stable order."""
  return tuple(sorted(set(resize_policies)))
