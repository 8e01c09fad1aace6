"""The --help every natvision command prints: defaults, required flags, examples.

argparse shows neither a flag's default nor, for a flag that is required
only in some cases, that it is required.  Every command's parser uses
``HelpFormatter`` so that ``--help`` says both in one form after the help
text, and keeps the description and the examples as written::

    --batch_size BATCH_SIZE   photos per forward pass (default: 16)
    --output_dir OUTPUT_DIR   folder for the tables (required)
    --input INPUT             ... (required unless --demo)

(the last one marked by ``mark_required(parser, "--input", "--demo")``).

A default of None, False or empty is not shown: such a flag is off or
absent, and where leaving it out means something its help says what in
words.  Beam's own flags are pointed to (``BEAM_OPTIONS``), not listed.
The description is filled to the terminal's width; the examples are kept
as written.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import textwrap
from typing import List, Optional, Sequence, Tuple

BEAM_OPTIONS = (
    "Beam pipeline options such as --runner, --direct_num_workers or "
    "--temp_location are passed through to Apache Beam; see "
    "https://beam.apache.org/documentation/runners/direct/ and "
    "https://beam.apache.org/documentation/runners/dataflow/")


class HelpFormatter(argparse.HelpFormatter):
  """Adds "(required)" or "(default: ...)" to each flag's help.

  The description and the epilog are filled to the width by paragraph
  (blank lines between them kept), except paragraphs with indented lines,
  such as the examples, which are kept as written.
  """

  def _fill_text(self, text: str, width: int, indent: str) -> str:
    paragraphs = []
    for paragraph in text.split("\n\n"):
      if any(line.startswith(" ") for line in paragraph.splitlines()):
        paragraphs.append(paragraph)
      else:
        paragraphs.append(textwrap.fill(" ".join(paragraph.split()), width,
                                        initial_indent=indent,
                                        subsequent_indent=indent,
                                        break_on_hyphens=False))
    return "\n\n".join(paragraphs)

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ""
    if action.required:
      text += " (required)"
    elif getattr(action, "required_unless", None) is not None:
      text += (f" (required unless {action.required_unless})"
               if action.required_unless else " (required)")
    if shows_default(action):
      # argparse %-formats help strings: a % in the value must stay one.
      text += f" (default: {action.default})".replace("%", "%%")
    return text.strip()


def shows_default(action: argparse.Action) -> bool:
  """Whether --help states the flag's default: a value that is not None,
  False or empty (``--help`` itself has none)."""
  default = action.default
  if default is None or default is False or default == argparse.SUPPRESS:
    return False
  return not (isinstance(default, (str, list, tuple)) and not default)


def mark_required(parser: argparse.ArgumentParser, flag: str,
                  unless: Optional[str] = None) -> None:
  """Marks ``flag`` as one the command needs (unless ``unless`` holds).

  For flags that the job's configure step requires (raising a
  ``ConfigError`` that names the flag) rather than argparse, because
  another flag can stand in for them; --help then says "(required)" or
  "(required unless UNLESS)".
  """
  action = parser._option_string_actions[flag]  # pylint: disable=protected-access
  action.required_unless = unless or ""


def epilog(examples: Sequence[str], beam: bool = False) -> str:
  """The text after the flags: example command lines, then (for the
  pipelines) where Beam's own flags are described."""
  paragraphs = ["examples:\n" + "\n".join(f"  {e}" for e in examples)]
  if beam:
    paragraphs.append(BEAM_OPTIONS)
  return "\n\n".join(paragraphs)


class ArgumentParser(argparse.ArgumentParser):
  """The tools' parser: an unknown flag is refused first, with the nearest
  known flag suggested (``--imag_id`` -> "did you mean --image_id?").

  Plain argparse reports a missing required flag before an unknown one, so
  a typo in a required flag's name read as "--image_id is required".  The
  pipelines refuse unknown flags the same way, after Beam has had its own
  (pipelines/launch.py ``split_beam_args``).  Tokens after a bare ``--``
  are left alone; an unambiguous prefix of a flag (argparse's
  abbreviations) counts as known.
  """

  def parse_known_args(self, args=None, namespace=None
                       ) -> Tuple[argparse.Namespace, List[str]]:
    tokens = list(sys.argv[1:] if args is None else args)
    known = [o for a in self._actions for o in a.option_strings]
    for token in tokens:
      if token == "--":
        break
      if not token.startswith("--"):
        continue
      name = token.split("=", 1)[0]
      if name in known or any(k.startswith(name) for k in known):
        continue
      close = difflib.get_close_matches(name, known, n=1)
      self.error(f"unknown flag {name}; "
                 + (f"did you mean {close[0]}?" if close else "see --help"))
    return super().parse_known_args(tokens, namespace)
