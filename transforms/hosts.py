"""Job-wide per-host cap: which photos are keyed by host, and by what key.

``--per_host_concurrency N`` is a limit for the whole job, across every
worker process and machine.  A semaphore in each process cannot give that
(a job of 100 processes would send a host 100 N requests at once), so the
limit is built from Beam's own guarantee about keyed state:

1. ``KeyByHost`` gives every http(s) photo the key ``host#slot``, where
   ``slot`` is a stable hash of its ``image_id`` modulo N.  A host thus has
   at most N keys, and a photo always gets the same one (on any worker, in
   any attempt).  Photos on local files, ``file://``, ``gs://`` and
   ``s3://`` are not web hosts: they leave on the ``unkeyed`` output and are
   fetched as before, on the process's fetch pool, with no cap of this kind.
   A glob input (which cannot list a web server) has no keying step at all
   (``photos_keyed.ReadAndPrepare(web=False)``).
2. ``photos_keyed.HostKeyedReadDecodePrepareFn``, a stateful DoFn over those keys,
   fetches one photo of a key at a time: within a bundle a key's photos wait
   in a queue while one of them is fetched (on the process's fetch pool, so
   that many keys, hence many hosts, are in flight at once), and
   ``finish_bundle`` returns only when every fetch of the bundle is over.
   So a key is never fetching in two bundles at once as long as the runner
   never runs one key in two bundles at once, and then a host never has more
   than N requests in flight in the whole job.

The guarantee relied on: a runner processes a stateful DoFn's key in one
bundle at a time (its state is per key and window, and a bundle's state
changes are committed with the bundle, so two bundles of one key at once
would race on that state).  Where it comes from, per runner:

- the DirectRunner (Beam's ``FnApiRunner``), in memory or
  ``--direct_running_mode multi_processing``: a stage holding a stateful
  DoFn starts its own stage (``translations.annotate_stateful_dofns_as_roots``)
  and is run by a plain ``BundleManager``, never the
  ``ParallelBundleManager`` that splits a stage's input over the worker
  processes: ``fn_runner.FnApiRunner._get_bundle_manager``, "State is keyed,
  and a single key cannot be processed concurrently" (Beam 2.77,
  apache_beam/runners/portability/fn_api_runner/fn_runner.py).  That stage
  runs in one worker process at a time.
- Dataflow, batch: the input of a stateful ParDo is grouped by key and
  window, and each group is exploded into the DoFn on one worker
  (``BatchStatefulParDoOverrides.BatchStatefulDoFn``: "A key-preserving DoFn
  that explodes an iterable that has been grouped by key and window"), so
  all of a key's elements are one work item.
- Dataflow, streaming, and the portable runners: the runner owns the state
  of a key and hands a key to one bundle at a time (Beam's model of
  stateful processing; e.g. apache/beam#28543 for Prism: "no other bundle
  processing that transform may execute with the same key").

The circuit breaker and the 429 / ``Retry-After`` pause are kept per key in
the same DoFn's state (``transforms/fetch/breaker.py``), so they too hold
for the whole job, per slot: a dead host gets at most N requests per slot
(K x N in all) before its photos fail at once, and during a Retry-After a
host gets at most one request per slot.  What is not job-wide: a redirect
to another host is capped by the first host's keys only.  A
bundle that fails while fetches are in flight may be retried elsewhere
while those fetches end: for that moment a key may have two requests out.
"""

from __future__ import annotations

import hashlib
import urllib.parse
from typing import Optional

import apache_beam as beam
from apache_beam import typehints

from natvision.transforms import fetch as fetch_lib
from natvision.transforms.records import ImageRef

# Tag of KeyByHost's output of photos that are not on a web host.
UNKEYED_TAG = "unkeyed"


def host_of(uri: str) -> Optional[str]:
  """The web host of an http(s) URI (``netloc``, lower case, port kept, as
  the HTTP client counts hosts); None for any other URI."""
  if fetch_lib.scheme_of(uri) not in fetch_lib.HTTP_SCHEMES:
    return None
  return (urllib.parse.urlsplit(uri).netloc or uri).lower()


def slot_of(image_id: str, slots: int) -> int:
  """A stable slot in ``range(slots)`` for a photo: the same in every
  process and run (Python's ``hash`` of a str is salted per process)."""
  digest = hashlib.blake2b(image_id.encode("utf-8", "surrogatepass"),
                           digest_size=8).digest()
  return int.from_bytes(digest, "big") % slots


def host_key(ref: ImageRef, slots: int) -> Optional[str]:
  """``host#slot`` for a photo on a web host; None for any other photo."""
  host = host_of(ref.location)
  if host is None:
    return None
  return f"{host}#{slot_of(ref.image_id, slots)}"


class KeyByHost(beam.DoFn):
  """ImageRef -> (host#slot, ImageRef) for http(s) photos; any other photo
  unchanged on the ``unkeyed`` output."""

  def __init__(self, per_host_concurrency: int):
    self._slots = per_host_concurrency

  def process(self, ref: ImageRef):
    key = host_key(ref, self._slots)
    if key is None:
      yield beam.pvalue.TaggedOutput(UNKEYED_TAG, ref)
    else:
      yield key, ref


def key_by_host(refs, per_host_concurrency: int):
  """``refs`` split into (keyed, unkeyed) PCollections.

  The keyed one is typed ``KV[str, Any]`` so that its key coder is Beam's
  deterministic str coder (a stateful DoFn needs one).
  """
  split = refs | "KeyByHost" >> beam.ParDo(
      KeyByHost(per_host_concurrency)).with_output_types(
          typehints.KV[str, typehints.Any]).with_outputs(UNKEYED_TAG,
                                                         main="keyed")
  return split.keyed, split[UNKEYED_TAG]
