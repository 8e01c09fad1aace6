"""Fetch: the one place that decides how a photo's bytes come from a URI.

A reader (globs, manifests, Darwin Core archives, snapshots) decides which
photos exist; this package decides how their bytes are fetched, by scheme,
one module a concern:

- ``schemes``: which scheme a URI has, whether something installed reads
  it, and reading local paths, ``file://``, ``gs://`` and ``s3://`` through
  Beam's ``FileSystems`` (whose Cloud Storage and S3 clients retry on
  their own).
- ``client``: http(s), one pooled urllib3 client per worker process, with
  connect and read timeouts, redirects, a ``User-Agent``, a per-process
  cap per host, the ``Retry-After`` pause shared by a process's photos of
  a host, and the ``--photo_timeout`` deadline, which bounds everything
  from the connection to the last byte of the body, the status line and
  headers included (a watchdog shuts the socket down at the deadline).
- ``breaker``: the circuit breaker and Retry-After pause of one slot of a
  host (``host#slot``, transforms/hosts.py); kept in Beam state by the
  host-keyed stateful DoFn (transforms/photos.py), which makes them hold
  for the whole job.
- ``body``: what a 200 body is, by its bytes rather than its Content-Type.
- ``retries``: retries with backoff (tenacity) within the photo's deadline,
  and ``fetch_bytes``, the entry point.
- ``errors``: ``FetchError`` and its kinds; transient vs not-found, by the
  exception's type.
- ``settings``: ``FetchConfig`` and its flags.
- ``s3``: public S3 buckets read without credentials (installed on import).

Importing ``transforms.fetch`` gives every public name of these modules.
"""

from natvision.transforms.fetch import s3
from natvision.transforms.fetch.body import check_body
from natvision.transforms.fetch.client import (HttpFetcher, fetch_pool, http_fetcher,
                                     retry_after_s)
from natvision.transforms.fetch.errors import (FetchError, HostUnavailable,
                                     HttpStatusError, PhotoTimeout,
                                     SchemeError, is_not_found, is_transient,
                                     photo_timeout_error, too_large)
from natvision.transforms.fetch.retries import fetch_bytes, with_retries
from natvision.transforms.fetch.schemes import (HTTP_SCHEMES, SCHEME_EXTRAS,
                                      SELF_RETRYING_SCHEMES, check_scheme,
                                      check_schemes, local_path,
                                      read_filesystem, scheme_of)
from natvision.transforms.fetch.settings import (DEFAULT_ATTEMPTS, DEFAULT_BASE_DELAY,
                                       DEFAULT_CONNECT_TIMEOUT,
                                       DEFAULT_FETCH_CONCURRENCY,
                                       DEFAULT_HOST_FAILURE_LIMIT,
                                       DEFAULT_HOST_QUIET_S,
                                       DEFAULT_MAX_REDIRECTS,
                                       DEFAULT_PER_HOST_CONCURRENCY,
                                       DEFAULT_PHOTO_TIMEOUT,
                                       DEFAULT_READ_TIMEOUT,
                                       MAX_RETRY_AFTER_S, FetchConfig)

s3.install_unsigned_s3()
