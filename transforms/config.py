"""Configuration errors and the small parsing helpers every config shares.

Each stage's settings are a frozen dataclass that adds its own flags to the
command line (``add_flags``), builds itself from the parsed flags
(``from_args``) and checks its values once, in ``__post_init__``.  A value
that cannot work raises ``ConfigError`` (a ``ValueError``) whose message
names the flag and the fix; the launch sequence (pipelines/launch.py) turns
it into exit status 2 before the pipeline starts.  Unreadable inputs and
missing models are configuration errors too (their error types subclass
this one), so the launcher catches one type and nothing is re-wrapped.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence


class ConfigError(ValueError):
  """A flag, input or model that cannot work; the message says what to do."""


def key_values(values: Optional[Sequence[str]], flag: str) -> Dict[str, str]:
  """Parses repeated ``NAME=VALUE`` flags into a dict.

  Raises:
    ConfigError: a value without ``=``, or with an empty side.
  """
  pairs = {}
  for value in values or ():
    name, sep, rest = value.partition("=")
    if not sep or not name.strip() or not rest.strip():
      raise ConfigError(f"{flag} takes NAME=VALUE, got {value!r}")
    pairs[name.strip()] = rest.strip()
  return pairs
