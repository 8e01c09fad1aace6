"""The fetch package's face: every name other modules use is importable
from ``transforms.fetch``, whichever module of the package defines it."""

from natvision.transforms import fetch
from natvision.transforms.fetch import (body, breaker, client, errors, retries,
                              schemes, settings)


def test_the_package_re_exports_what_its_callers_use():
  assert fetch.FetchConfig is settings.FetchConfig
  assert fetch.FetchError is errors.FetchError
  assert fetch.fetch_bytes is retries.fetch_bytes
  assert fetch.fetch_pool is client.fetch_pool
  assert fetch.check_body is body.check_body
  assert fetch.scheme_of("HTTPS://a/b") == "https" == schemes.scheme_of(
      "https://a")
  assert fetch.HTTP_SCHEMES == ("http", "https")
  assert issubclass(fetch.HostUnavailable, fetch.FetchError)
  assert breaker.SlotBreaker("h", 1, 1.0).blocked() is None
  for name in ("is_transient", "is_not_found", "check_schemes", "local_path",
               "PhotoTimeout", "SchemeError", "HttpFetcher", "with_retries"):
    assert callable(getattr(fetch, name)), name
