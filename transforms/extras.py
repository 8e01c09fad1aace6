"""Which install extra a command needs, and the message when it is missing.

``pip install .`` installs the jobs for local files and http(s); the rest
comes in extras (setup.py): ``gcp`` and ``aws`` (storage schemes, checked
per URI by ``fetch.check_scheme``), and ``tools``, what the
``natvision-evaluate``, ``-index``, ``-search`` and ``-report`` commands
need beyond the jobs.  A command whose extra is missing stops before it
does anything, naming the extra to install, instead of failing later with
an ImportError traceback.

Whether a package is there is asked of the import system
(``importlib.util.find_spec``), without importing it: a command's
``--help`` and its checks stay fast.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Dict, List, Optional, Tuple

# extra -> (importable module, the PyPI distribution it comes from).  Keep
# in step with setup.py's extras_require.
EXTRAS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "tools": (("faiss", "faiss-cpu"), ("matplotlib", "matplotlib"),
              ("pandas", "pandas")),
    "gcp": (("google.cloud.storage", "google-cloud-storage"),),
    "aws": (("boto3", "boto3"),),
}


def installed(module: str) -> bool:
  """Whether ``module`` can be imported here (nothing is imported).

  A name set to None in ``sys.modules`` (how Python marks a module that
  must not be imported) counts as missing.
  """
  if module in sys.modules:
    return sys.modules[module] is not None
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # a missing parent package
    return False


def missing(extra: str) -> List[str]:
  """The distributions of ``extra`` that are not installed, in setup order.

  Raises:
    KeyError: ``extra`` is not one of ``EXTRAS``.
  """
  return [dist for module, dist in EXTRAS[extra] if not installed(module)]


def missing_message(extra: str, command: str) -> Optional[str]:
  """None when ``extra`` is installed, else the line the command prints.

  Example: ``natvision-evaluate: error: this command needs the tools extra
  (missing: faiss-cpu): pip install 'natvision[tools]'``.
  """
  absent = missing(extra)
  if not absent:
    return None
  return (f"{command}: error: this command needs the {extra} extra "
          f"(missing: {', '.join(absent)}): pip install "
          f"'natvision[{extra}]'")


def check_command(extra: str, command: str) -> Optional[int]:
  """For a command's ``main``: prints the message and returns exit status 2
  when ``extra`` is missing; None (go on) when it is installed."""
  message = missing_message(extra, command)
  if message is None:
    return None
  print(message, file=sys.stderr)
  return 2
