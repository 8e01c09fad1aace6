"""FetchConfig: defaults, checks and flags."""

import argparse

import pytest

from natvision.transforms import fetch



def test_config_validates_and_owns_its_flags():
  parser = argparse.ArgumentParser()
  fetch.FetchConfig.add_flags(parser)
  args = parser.parse_args(["--fetch_concurrency", "64",
                            "--per_host_concurrency", "4",
                            "--user_agent", " https://example.org/me "])
  config = fetch.FetchConfig.from_args(args)
  assert (config.fetch_concurrency, config.per_host_concurrency) == (64, 4)
  assert config.user_agent_header == "natvision/0.1.0 (https://example.org/me)"
  assert fetch.FetchConfig.from_args(parser.parse_args([])) == (
      fetch.FetchConfig())
  for bad in ({"fetch_concurrency": 0}, {"per_host_concurrency": 0},
              {"fetch_concurrency": 4, "per_host_concurrency": 8},
              {"read_timeout": 0}, {"max_redirects": -1},
              {"user_agent": "a\nb"}):
    with pytest.raises(ValueError, match="--"):
      fetch.FetchConfig(**bad)

def test_photo_flags_validated():
  parser = argparse.ArgumentParser()
  fetch.FetchConfig.add_flags(parser)
  config = fetch.FetchConfig.from_args(parser.parse_args(
      ["--photo_timeout", "2.5", "--host_failure_limit", "0"]))
  assert (config.photo_timeout, config.host_failure_limit) == (2.5, 0)
  defaults = fetch.FetchConfig()
  assert (defaults.photo_timeout, defaults.host_failure_limit,
          defaults.host_quiet_s) == (120.0, 20, 60.0)
  for bad, flag in (({"photo_timeout": 0}, "--photo_timeout"),
                    ({"photo_timeout": -3}, "--photo_timeout"),
                    ({"photo_timeout": float("nan")}, "--photo_timeout"),
                    ({"photo_timeout": float("inf")}, "--photo_timeout"),
                    ({"host_failure_limit": -1}, "--host_failure_limit")):
    with pytest.raises(ValueError, match=flag):
      fetch.FetchConfig(**bad)
