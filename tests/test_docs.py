"""README.md and docs/: every link resolves and every flag they name exists.

The user documentation is README.md (what natvision is, the quickstart)
and one page per topic under docs/.  These checks keep the text in step
with the code: a relative link names a file of the repository, and a
``--snake_case`` flag is a flag of one of natvision's commands or a Beam
pipeline option.
"""

import argparse
import glob
import os
import re

import pytest

from natvision.pipelines import build_prior
from natvision.pipelines import embed_images
from natvision.pipelines import ingest_observations
from natvision.pipelines import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(REPO, "README.md"), os.path.join(REPO, "ARCHITECTURE.md")]
PAGES += sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
# Flags of other programs that the pages quote: pytest's (tests/conftest.py
# adds --runslow and --all-storage-calls) and the aws command's, and the
# typo docs/flags.md gives as an example of a flag that is refused.
NOT_OURS = {"runslow", "all-storage-calls", "no-sign-request", "output-dir"}


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _parsers():
  from natvision.tools import evaluate, label, report, search, stage_onnx, standins  # pylint: disable=import-outside-toplevel
  return [embed_images._parser(), ingest_observations._parser(),  # pylint: disable=protected-access
          evaluate.parser(), label.parser(), report.parser(), search.parser(),
          search.index_parser(), stage_onnx._parser(),  # pylint: disable=protected-access
          standins.parser(), build_prior._parser()]  # pylint: disable=protected-access


def _ours():
  flags = set()
  for parser in _parsers():
    assert isinstance(parser, argparse.ArgumentParser)
    for action in parser._actions:  # pylint: disable=protected-access
      flags |= {o[2:] for o in action.option_strings if o.startswith("--")}
  return flags


def test_readme_links_every_docs_page():
  readme = _read(os.path.join(REPO, "README.md"))
  pages = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
  assert pages
  for page in pages:
    assert f"docs/{os.path.basename(page)}" in readme, page


@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_relative_links_name_files_that_exist(page):
  for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _read(page)):
    if re.match(r"[a-z]+:", target):
      continue
    path = os.path.normpath(os.path.join(os.path.dirname(page), target))
    assert os.path.exists(path), f"{os.path.basename(page)} links {target}"


def _unknown_to_beam(name):
  try:
    return bool(launch.unknown_beam_flags([f"--{name}=1"]))
  except SystemExit:
    return False  # a Beam option that refuses the value 1: known


@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_flags_named_are_known(page):
  named = set(re.findall(r"(?<![\w-])--([a-z0-9][a-z0-9_-]*[a-z0-9])",
                         _read(page)))
  named -= _ours() | NOT_OURS
  unknown = sorted(n for n in named if _unknown_to_beam(n))
  assert not unknown, f"{os.path.basename(page)} names unknown flags {unknown}"
