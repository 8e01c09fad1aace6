"""transforms/config.py: the configuration error and NAME=VALUE flags.

``ConfigError`` is a ``ValueError`` (the launcher turns it into exit status
2), and ``key_values`` parses repeated ``NAME=VALUE`` flags, refusing a
value it cannot split with a message naming the flag.
"""

import pytest

from natvision.transforms import config


def test_config_error_is_a_value_error():
  assert issubclass(config.ConfigError, ValueError)
  with pytest.raises(ValueError, match="--flag is wrong"):
    raise config.ConfigError("--flag is wrong")


def test_key_values_parses_and_strips_each_pair():
  assert config.key_values(None, "--header") == {}
  assert config.key_values([" a = 1 ", "b=x=y", "a=2"], "--header") == {
      "a": "2", "b": "x=y"}  # split at the first "=", the last one wins


@pytest.mark.parametrize("value", ["novalue", "=1", "a=", " = "])
def test_key_values_refuses_a_pair_it_cannot_split(value):
  with pytest.raises(config.ConfigError) as raised:
    config.key_values(["ok=1", value], "--header")
  assert str(raised.value) == f"--header takes NAME=VALUE, got {value!r}"
