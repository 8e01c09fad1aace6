"""--help of every command: defaults once, required flags marked, examples."""

import argparse
import re

import pytest

from natvision.pipelines import build_prior
from natvision.pipelines import embed_images
from natvision.pipelines import ingest_observations
from natvision.tools import evaluate
from natvision.tools import label
from natvision.tools import report
from natvision.tools import search
from natvision.tools import stage_onnx
from natvision.tools import standins
from natvision.transforms import helptext

PARSERS = {
    "natvision-embed": embed_images._parser,  # pylint: disable=protected-access
    "natvision-ingest": ingest_observations._parser,  # pylint: disable=protected-access
    "natvision-evaluate": evaluate.parser,
    "natvision-search": search.parser,
    "natvision-index": search.index_parser,
    "natvision-label": label.parser,
    "natvision-report": report.parser,
    "natvision-standins": standins.parser,
    "natvision-stage-onnx": stage_onnx._parser,  # pylint: disable=protected-access
    "natvision-prior": build_prior._parser,  # pylint: disable=protected-access
}

# Flags a command needs although argparse does not require them (another
# flag can stand in), and what --help says of each.
CONDITIONALLY_REQUIRED = {
    "natvision-embed": {
        "--input": "(required unless --demo)",
        "--output_dir": "(required unless --demo)",
        "--model_root": "(required unless --demo, or --model_handle names "
                        "every model)"},
    "natvision-ingest": {
        "--snapshot_dir": "(required)",
        "--photo_uri_template": "(required)",
        "--output_dir": "(required)",
        "--model_root": "(required unless --model_handle names every model)"},
    "natvision-stage-onnx": {
        "--model_root": "(required unless --model_handle names every model)"},
    "natvision-prior": {
        "--observations": "(required)", "--output": "(required)"},
}


def _help(command):
  parser = PARSERS[command]()
  # A fixed width, so that the text does not depend on the terminal.
  parser.formatter_class = lambda prog: helptext.HelpFormatter(prog, width=100)
  return parser, parser.format_help()


def _blocks(text):
  """Option string -> its entry in --help, joined into one line."""
  blocks, current = {}, None
  for line in text.splitlines():
    if re.match(r"^  -", line):
      current = []
      for flag in re.findall(r"(--?[\w-]+)", line.split("  ")[1]):
        blocks.setdefault(flag, current)
      current.append(line.strip())
    elif current is not None and line.startswith("    "):
      current.append(line.strip())
    else:
      current = None
  return {flag: " ".join(" ".join(lines).split())
          for flag, lines in blocks.items()}


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_default_shown_once_and_required_flags_marked(command):
  parser, text = _help(command)
  blocks = _blocks(text)
  checked = 0
  for action in parser._actions:  # pylint: disable=protected-access
    if isinstance(action, argparse._HelpAction):  # pylint: disable=protected-access
      continue
    flag = action.option_strings[-1]
    entry = blocks[flag]
    default = action.default
    if default not in (None, False, "", []):
      assert f"(default: {default})" in entry, (flag, entry)
      assert entry.count("(default") == 1, (flag, entry)
      assert entry.count("default") == 1, (flag, entry)
      checked += 1
    if action.required:
      assert entry.endswith("(required)"), (flag, entry)
  for flag, mark in CONDITIONALLY_REQUIRED.get(command, {}).items():
    assert blocks[flag].endswith(mark), (flag, blocks[flag])
  assert checked or command in ("natvision-search", "natvision-stage-onnx")


def test_embed_shows_the_defaults_that_were_missing():
  _, text = _help("natvision-embed")
  blocks = _blocks(text)
  assert blocks["--batch_size"].endswith("(default: 16)")
  assert blocks["--runtime"].endswith("(default: auto)")
  assert blocks["--shard_rows"].endswith("(default: 5000)")
  assert blocks["--manifest_encoding"].endswith("(default: utf-8)")


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_description_paragraph_and_an_example(command):
  parser, text = _help(command)
  assert parser.prog == command
  description = parser.description
  assert len(description) > 150 and "\n\n" not in description, description
  examples = text.split("examples:\n", 1)[1].splitlines()
  assert examples[0].startswith(f"  {command} --"), examples
  # natvision-prior writes one file (--output), not a folder of tables.
  assert ("--output_dir" in _blocks(text) or "--output" in _blocks(text)
          or command == "natvision-stage-onnx")
  for flag in ("--output_dir", "--output"):
    if flag in _blocks(text):
      assert len(_blocks(text)[flag]) > len(flag) + 30, _blocks(text)[flag]


@pytest.mark.parametrize("command", ["natvision-embed", "natvision-ingest"])
def test_beam_flags_are_pointed_to_not_listed(command):
  _, text = _help(command)
  assert "Beam pipeline options such as --runner" in text
  assert "https://beam.apache.org/documentation/runners/" in text
  assert "--runner" not in _blocks(text)
  assert "--temp_location" not in _blocks(text)


def test_formatter_marks_and_defaults():
  parser = argparse.ArgumentParser(
      prog="x", formatter_class=lambda prog: helptext.HelpFormatter(
          prog, width=100))
  parser.add_argument("--a", type=int, default=3, help="three")
  parser.add_argument("--b", required=True, help="bee")
  parser.add_argument("--c", help="sea")
  parser.add_argument("--d", action="store_true", help="dee")
  parser.add_argument("--e", default="50%", help="half")
  helptext.mark_required(parser, "--c", unless="--d")
  blocks = _blocks(parser.format_help())
  assert blocks["--a"] == "--a A three (default: 3)"
  assert blocks["--b"] == "--b B bee (required)"
  assert blocks["--c"] == "--c C sea (required unless --d)"
  assert blocks["--d"] == "--d dee"
  assert blocks["--e"] == "--e E half (default: 50%)"


def test_tools_refuse_an_unknown_flag_first_with_the_nearest_known_one(
    capsys):
  """A typo in a required flag's name is named as a typo, not as the
  required flag missing (plain argparse reports the latter first)."""
  p = helptext.ArgumentParser(prog="t", formatter_class=helptext.HelpFormatter)
  p.add_argument("--output_dir", required=True)
  p.add_argument("--image_id")
  with pytest.raises(SystemExit) as info:
    p.parse_args(["--outptu_dir", "x", "--image_id", "a"])
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert "unknown flag --outptu_dir" in err and "required" not in err
  with pytest.raises(SystemExit):
    p.parse_args(["--output_dir", "x", "--colour", "y"])
  assert "unknown flag --colour; see --help" in capsys.readouterr().err
  # An abbreviation argparse accepts, and a value after "--", are not typos.
  assert p.parse_args(["--output", "x"]).output_dir == "x"
  assert "--zzz" in p.parse_known_args(["--output_dir", "x", "--", "--zzz"])[1]


def test_a_typo_gets_did_you_mean(capsys):
  p = helptext.ArgumentParser(prog="t")
  p.add_argument("--output_dir", required=True)
  with pytest.raises(SystemExit):
    p.parse_args(["--outdir", "x"])
  assert "unknown flag --outdir; did you mean --output_dir?" in (
      capsys.readouterr().err)
