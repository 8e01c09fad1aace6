"""The host-keyed stateful DoFn (transforms/photos_keyed.py): in-process,
every photo comes out once within each host's cap, and a slot's breaker and
Retry-After pause follow the slot from one worker's bundle to the next's.
The job-wide checks with two worker processes are tests/test_hosts.py's."""

import time

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from tests.conftest import real_photo_paths
from tests.http_server import PhotoServer
from natvision.transforms import fetch
from natvision.transforms import hosts
from natvision.transforms import photos
from natvision.transforms import photos_keyed
from natvision.transforms.records import ImageRef


def _prepared(out):
  """ReadAndPrepare's branches in one PCollection (small test inputs)."""
  return tuple(out.branches.values()) | "AllPrepared" >> beam.Flatten()


def _photo_bytes():
  return open(real_photo_paths()[0], "rb").read()


@pytest.mark.parametrize("decode_threads", [0, 2])
def test_keyed_fetch_keeps_every_photo_within_the_cap(tmp_path,
                                                      decode_threads):
  """In-process: web and local photos each come out once (a missing one as
  an error row of stage read), and each host sees at most its cap."""
  data = _photo_bytes()
  local = tmp_path / "local.jpg"
  local.write_bytes(data)
  files = {f"/p/{i}.jpg": data for i in range(8)}
  with PhotoServer(files, latency=0.05,
                   hosts=("127.0.0.2", "127.0.0.3", "127.0.0.4")) as server:
    refs = [ImageRef(f"h{h}-{i}", server.url(f"/p/{i}.jpg", h))
            for h in range(3) for i in range(8)]
    refs += [ImageRef("local", str(local)),
             ImageRef("missing", server.url("/p/none.jpg", 1))]
    config = photos.PhotoConfig(
        policies=("squash",), size=32, decode_threads=decode_threads,
        fetch=fetch.FetchConfig(per_host_concurrency=2))
    with beam.Pipeline() as p:
      out = p | beam.Create(refs) | photos_keyed.ReadAndPrepare(config)
      assert_that(_prepared(out) | beam.Map(lambda x: x.ref.image_id),
                  equal_to([r.image_id for r in refs[:-1]]), label="prepared")
      assert_that(out.errors | beam.Map(lambda e: (e.ref.image_id, e.stage)),
                  equal_to([("missing", "read")]), label="errors")
  assert sorted(server.peak.values()) == [2, 2, 2], dict(server.peak)


# --------------------------------------------------------------------------
# The breaker and the Retry-After pause follow a slot from worker to worker.


class _KeyState:
  """What Beam hands ``process`` for one key's state: read and write."""

  def __init__(self):
    self.value = None

  def read(self):
    return self.value

  def write(self, value):
    self.value = value

  def clear(self):
    self.value = None


def _worker(config, monkeypatch):
  """The keyed DoFn as a new worker process has it: its own HTTP client,
  hence no per-process breaker or pause learnt by the worker before."""
  monkeypatch.setattr(fetch.client, "_HTTP_FETCHERS", {})
  fn = photos_keyed.HostKeyedReadDecodePrepareFn(config)
  fn.setup()
  return fn


def _bundle(fn, refs, states, slots):
  """One bundle of ``refs`` through ``fn``, the keys' state in ``states``;
  the ErrorRecords it emits."""
  fn.start_bundle()
  out = []
  for ref in refs:
    key = hosts.host_key(ref, slots)
    out += list(fn.process((key, ref), states.setdefault(key, _KeyState())))
  out += list(fn.finish_bundle())
  errors = []
  for item in out:
    value = getattr(item, "value", item)  # TaggedOutput
    errors.append(getattr(value, "value", value))  # WindowedValue
  return errors


def _refs_on_both_slots(base, count, slots=2, prefix="p"):
  """``count`` photos whose first ``slots`` land on different slots."""
  refs = [ImageRef(f"{prefix}-{i}", f"{base}/{i}.jpg") for i in range(200)]
  first = {}
  for r in refs:
    first.setdefault(hosts.slot_of(r.image_id, slots), r)
  rest = [r for r in refs if r not in first.values()]
  return list(first.values()) + rest[:count - slots]


def test_an_open_slot_stays_open_in_the_next_worker(monkeypatch):
  """A dead host (503 to everything), 2 slots, --host_failure_limit 3: the
  first bundle spends at most 2 x 3 requests and opens both slots; a second
  bundle in another worker process sends none, each of its photos an error
  row at once.  (A breaker per process would spend 3 more there.)"""
  with PhotoServer({}, hosts=("127.0.0.41",),
                   always=("status", 503, {}, b"down")) as server:
    config = photos.PhotoConfig(
        policies=("squash",), size=32, decode_threads=0, read_attempts=4,
        retry_base_delay=0.01,
        fetch=fetch.FetchConfig(per_host_concurrency=2, host_failure_limit=3))
    refs = _refs_on_both_slots(server.url(""), 12)
    states = {}
    first = _bundle(_worker(config, monkeypatch), refs[:6], states, 2)
    spent = sum(server.requests.values())
    assert 3 <= spent <= 6, dict(server.requests)
    second = _bundle(_worker(config, monkeypatch), refs[6:], states, 2)
    assert sum(server.requests.values()) == spent
  assert len(states) == 2 and len(first) == len(second) == 6
  assert {e.stage for e in first + second} == {"read"}
  assert all(e.error.startswith("host unavailable after 3 consecutive "
                                "failures (connection failures, timeouts or "
                                "5xx) of its slot ") for e in second), second


def test_a_retry_after_pauses_the_slot_in_the_next_worker(monkeypatch):
  """A 429 with Retry-After: 2 to a slot's photo in one worker: the slot's
  next photo, in a bundle of another worker that starts at once, is not
  requested before the 2 s are over (with 0.1 s for clock reads)."""
  times = []
  data = _photo_bytes()
  with PhotoServer({}, hosts=("127.0.0.42",)) as server:
    refs = _refs_on_both_slots(server.url(""), 2, slots=1, prefix="q")
    refs.append(ImageRef("q-next", server.url("/next.jpg")))
    server.files = {"/0.jpg": data, "/next.jpg": data}
    server.plan("/0.jpg", ("status", 429, {"Retry-After": "2"}, b""))
    real_next = server._next  # pylint: disable=protected-access

    def timed(path):
      times.append((path, time.time()))
      return real_next(path)

    server._next = timed  # pylint: disable=protected-access
    config = photos.PhotoConfig(
        policies=("squash",), size=32, decode_threads=0, read_attempts=1,
        fetch=fetch.FetchConfig(per_host_concurrency=1))
    states = {}
    first = _bundle(_worker(config, monkeypatch), refs[:1], states, 1)
    assert [e.error for e in first][0].startswith("HTTP 429")
    second = _bundle(_worker(config, monkeypatch), refs[-1:], states, 1)
  assert second and all(not hasattr(x, "error") for x in second), second
  assert [p for p, _ in times] == ["/0.jpg", "/next.jpg"], times
  assert times[1][1] - times[0][1] >= 2.0 - 0.1, times
