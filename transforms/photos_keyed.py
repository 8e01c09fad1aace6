"""http(s) photos, keyed by host and slot: the job-wide per-host cap.

``HostKeyedReadDecodePrepareFn`` is transforms/photos.py's
``ReadDecodePrepareFn`` (the same fetch, decode and prepare, on the same
thread pools) made stateful over ``host#slot`` keys (transforms/hosts.py):
one fetch per key in flight, every fetch of a bundle over before the bundle
ends, and each key's breaker and pause (fetch/breaker.py's ``SlotState``)
kept in Beam state.  ``ReadAndPrepare`` is the per-photo stage the jobs use:
it keys the http(s) photos and sends the others through the plain DoFn,
and gives the two branches' prepared photos apart, never flattened (see
``PhotoOutputs``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from typing import Callable, Dict, Iterator, NamedTuple, Optional

import apache_beam as beam
from apache_beam.transforms import userstate

from natvision.transforms import fetch as fetch_lib
from natvision.transforms.fetch import breaker as breaker_lib
from natvision.transforms import hosts
from natvision.transforms import progress
from natvision.transforms import uris
from natvision.transforms.photos import PhotoConfig, ReadDecodePrepareFn
from natvision.transforms.records import ERRORS_TAG, STAGE_READ, ErrorRecord

# Photos of a bundle read ahead, waiting for their key, before the bundle
# stops taking more: an ImageRef is small (under a kilobyte), and a runner
# may hand a bundle its keys one after another (Dataflow batch groups a
# stateful DoFn's input by key), so reading this far ahead is what lets
# many keys of a bundle fetch at once.
MAX_WAITING_PER_BUNDLE = 10_000

# The breaker and pause of a key's slot (fetch/breaker.py), kept per key so
# that they follow the slot from bundle to bundle and worker to worker.
# Being stateful is also what makes runners process a key in one bundle at
# a time (see transforms/hosts.py).
_SLOT = userstate.ReadModifyWriteStateSpec("slot",
                                           breaker_lib.SLOT_STATE_CODER)


class HostKeyedReadDecodePrepareFn(ReadDecodePrepareFn):
  """(host#slot, ImageRef) -> as ``ReadDecodePrepareFn``, one fetch per key.

  The job-wide per-host cap (transforms/hosts.py): at most one photo of a
  key is being fetched at a time in this bundle, and ``finish_bundle``
  returns only when every fetch of the bundle is over, so no key is
  fetching in two bundles (two workers) at once.  Fetches of different keys
  run together on the process's fetch pool; a key's other photos wait in a
  queue.  All the bookkeeping is done on the bundle's thread (``process``
  and ``finish_bundle``); pool threads only fetch and decode.

  The job-wide breaker and pause (fetch/breaker.py): each key's
  ``SlotState`` is read from its Beam state when the key first comes in a
  bundle, guards every request of the key's photos (``SlotBreaker``), and
  is written back in ``finish_bundle``, once every fetch is over.  Beam's
  Python SDK keeps one state handle per key and window for the whole
  bundle and commits them after ``finish_bundle``
  (``bundle_processor.FnApiUserStateContext``,
  ``operations.DoOperation.finish``), so the next bundle of the key, on
  any worker, starts from what this one learnt.  Before a key's next photo
  starts: while the slot's breaker is open its photo is an error row at
  once (stage read, "host unavailable after N consecutive failures ...");
  while the slot is paused (429, Retry-After) the photo waits, its
  deadline not started, with no thread held; a pause longer than
  ``fetch.MAX_RETRY_AFTER_S`` fails the slot's photos at once instead.

  At most max(``prefetch``, ``fetch_concurrency``) photos are fetched or
  decoded ahead of what has been emitted; results are emitted as they are
  done, not in input order.

  Args:
    now: wall-clock seconds (tests).
  """

  def __init__(self, config: PhotoConfig, opener: Optional[Callable] = None,
               now: Callable[[], float] = time.time):
    super().__init__(config, opener)
    self._now = now

  def setup(self):
    super().setup()
    self._fetch_pool = fetch_lib.fetch_pool(
        self._config.fetch.fetch_concurrency)

  def start_bundle(self):
    self._waiting = collections.defaultdict(collections.deque)  # key -> refs
    self._ready = collections.deque()  # keys with photos waiting, none out
    self._fetching = {}  # key -> the future of its one fetch in flight
    self._paused = {}  # key -> wall-clock time its slot may send again
    self._results = []  # futures of started photos not yet emitted
    self._waiting_count = 0
    self._states = {}  # key -> its state handle, as given to process
    self._breakers = {}  # key -> (SlotBreaker, the state it started from)

  def process(self, element, slot_state=beam.DoFn.StateParam(_SLOT)):
    key, ref = element
    if key not in self._breakers:
      self._states[key] = slot_state
      start = breaker_lib.SlotState.from_tuple(slot_state.read())
      self._breakers[key] = (self._breaker(key, start), start)
    queue = self._waiting[key]
    queue.append(ref)
    self._waiting_count += 1
    if (len(queue) == 1 and key not in self._fetching
        and key not in self._paused):
      self._ready.append(key)
    yield from self._advance()
    while self._waiting_count > MAX_WAITING_PER_BUNDLE:
      self._wait()
      yield from self._advance()

  def finish_bundle(self):
    yield from self._advance(windowed=True)
    while self._results or self._waiting_count:
      self._wait()
      yield from self._advance(windowed=True)
    for key, (breaker, start) in self._breakers.items():
      state = breaker.state
      if state != start:
        self._states[key].write(state.as_tuple())

  def _breaker(self, key: str, state) -> breaker_lib.SlotBreaker:
    host, _, slot = key.rpartition("#")
    fetch = self._config.fetch
    return breaker_lib.SlotBreaker(
        host, fetch.host_failure_limit, fetch.host_quiet_s,
        slot=int(slot), slots=fetch.per_host_concurrency, state=state,
        now=self._now)

  def _advance(self, windowed: bool = False) -> Iterator:
    """Frees the keys whose fetch is over or whose pause has ended, emits
    the photos that are done, fails the photos of open slots, and starts
    the next photo of ready keys while there is room."""
    for key in [k for k, f in self._fetching.items() if f.done()]:
      del self._fetching[key]
      self._requeue(key)
    now = self._now()
    for key in [k for k, until in self._paused.items() if until <= now]:
      del self._paused[key]
      self._requeue(key)
    done, pending = [], []
    for future in self._results:  # one look at each: it may end meanwhile
      (done if future.done() else pending).append(future)
    self._results = pending
    for future in done:
      yield self._emit(future.result(), windowed=windowed)
    while self._ready and len(self._results) < self._window:
      key = self._ready.popleft()
      breaker = self._breakers[key][0]
      reason = breaker.blocked() or breaker.long_pause()
      wait = breaker.wait_s()
      if reason is None and wait > 0:
        self._paused[key] = self._now() + wait
        continue
      ref = self._waiting[key].popleft()
      self._waiting_count -= 1
      if reason is not None:  # no request: an error row now
        yield self._emit((ErrorRecord(ref=ref, stage=STAGE_READ,
                                      error=uris.readable(reason)), 0),
                         windowed=windowed)
        self._requeue(key)
        continue
      self._fetching[key], result = self._submit_both(ref, breaker)
      self._results.append(result)

  def _requeue(self, key: str) -> None:
    if self._waiting[key]:
      self._ready.append(key)
    else:
      del self._waiting[key]

  def _wait(self) -> None:
    """Until a fetch or a photo is done or a pause ends, with a progress
    line every interval (naming slow photos) meanwhile."""
    pending = set(self._results) | set(self._fetching.values())
    timeout = progress.DEFAULT_INTERVAL_S
    if self._paused:
      timeout = min(timeout, max(0.0, min(self._paused.values())
                                 - self._now()) + 0.01)
    if not pending:
      time.sleep(timeout)
      return
    _, not_done = concurrent.futures.wait(
        pending, timeout=timeout,
        return_when=concurrent.futures.FIRST_COMPLETED)
    if len(not_done) == len(pending) and not self._paused:
      self._progress.tick(0)


# Names of ReadAndPrepare's branches, as PhotoOutputs.branches keys: the
# plain one ("", so that its consumers keep their labels) and the keyed one.
FILES_BRANCH = ""
WEB_BRANCH = "ByHost"


class PhotoOutputs(NamedTuple):
  """What ``ReadAndPrepare`` gives.

  Attributes:
    branches: branch name (``FILES_BRANCH``, ``WEB_BRANCH``) -> its
      PCollection of PreparedImage.  Each consumer of the photos is to be
      applied to each branch: a Flatten of prepared photos (~270 KB each)
      is, on the DirectRunner, a buffer of every photo of the run (Beam's
      FnApiRunner materialises a Flatten whose inputs come from two stages,
      ``translations.sink_flattens``, and the keyed branch is a stage of its
      own), so results are flattened after the models, not photos before.
    errors: ErrorRecord values of both branches (few, small: flattened).
  """

  branches: Dict[str, beam.PCollection]
  errors: beam.PCollection


class ReadAndPrepare(beam.PTransform):
  """PCollection[ImageRef] -> ``PhotoOutputs`` (prepared per branch, errors).

  http(s) photos are keyed by host and slot and fetched by
  ``HostKeyedReadDecodePrepareFn`` (the job-wide per-host cap,
  transforms/hosts.py); other photos by ``ReadDecodePrepareFn``.

  Args:
    config: the photo settings.
    opener: replaces FileSystems.open for non-http photos (tests).
    web: whether the input may hold http(s) photos.  False (a glob: globs
      cannot list a web server) builds the plain branch alone, with no
      keying step; an http(s) photo then gets no per-host cap.
  """

  def __init__(self, config: PhotoConfig, opener: Optional[Callable] = None,
               web: bool = True):
    super().__init__()
    self._config = config
    self._opener = opener
    self._web = web

  def expand(self, refs):
    plain = refs
    if self._web:
      keyed, plain = hosts.key_by_host(
          refs, self._config.fetch.per_host_concurrency)
    files = plain | "ReadDecodePrepare" >> beam.ParDo(
        ReadDecodePrepareFn(self._config, self._opener)).with_outputs(
            ERRORS_TAG, main="prepared")
    if not self._web:
      return PhotoOutputs(branches={FILES_BRANCH: files.prepared},
                          errors=files[ERRORS_TAG])
    web = keyed | "ReadDecodePrepareByHost" >> beam.ParDo(
        HostKeyedReadDecodePrepareFn(self._config, self._opener)).with_outputs(
            ERRORS_TAG, main="prepared")
    return PhotoOutputs(
        branches={FILES_BRANCH: files.prepared, WEB_BRANCH: web.prepared},
        errors=(files[ERRORS_TAG], web[ERRORS_TAG])
        | "PhotoErrors" >> beam.Flatten())

