"""A command whose install extra is missing says which extra to install.

A package is made missing the way Python marks a module that must not be
imported: ``sys.modules[name] = None`` (then ``import name`` raises
ImportError), so no environment has to be uninstalled.
"""

import sys

import pytest

from natvision.tools import evaluate
from natvision.tools import label
from natvision.tools import report
from natvision.tools import search
from natvision.transforms import extras

TOOLS_HINT = "pip install 'natvision[tools]'"


@pytest.fixture
def no_faiss(monkeypatch):
  monkeypatch.setitem(sys.modules, "faiss", None)


def test_installed_extra_has_nothing_missing():
  # The test environment installs '.[test]', which holds every extra.
  for extra in extras.EXTRAS:
    assert extras.missing(extra) == []
    assert extras.missing_message(extra, "cmd") is None


def test_missing_package_is_named_with_its_distribution(no_faiss):
  assert extras.missing("tools") == ["faiss-cpu"]
  message = extras.missing_message("tools", "natvision-index")
  assert message.startswith("natvision-index: error: ")
  assert "faiss-cpu" in message and TOOLS_HINT in message


def test_missing_parent_package_counts_as_missing(monkeypatch):
  monkeypatch.setitem(sys.modules, "google.cloud", None)
  monkeypatch.delitem(sys.modules, "google.cloud.storage", raising=False)
  assert extras.missing("gcp") == ["google-cloud-storage"]


@pytest.mark.parametrize("command,main,argv", [
    ("natvision-evaluate", evaluate.main,
     ["--output_dir", "OUT", "--label_column", "taxon"]),
    ("natvision-index", search.index_main,
     ["--output_dir", "OUT", "--model", "inaturalist_v2"]),
    ("natvision-search", search.main,
     ["--output_dir", "OUT", "--model", "inaturalist_v2",
      "--image_id", "x"]),
    ("natvision-report", report.main, ["--output_dir", "OUT"]),
    ("natvision-label", label.main,
     ["--output_dir", "OUT", "--reference", "OUT", "--model",
      "inaturalist_v2", "--taxa", "OUT"]),
])
def test_tools_commands_fail_naming_the_extra(no_faiss, tmp_path, capsys,
                                              command, main, argv):
  argv = [str(tmp_path / a) if a == "OUT" else a for a in argv]
  status = main(argv)
  err = capsys.readouterr().err
  assert status == 2
  assert f"{command}: error: this command needs the tools extra" in err
  assert TOOLS_HINT in err
  assert "Traceback" not in err


def test_help_works_without_the_extra(no_faiss, capsys):
  with pytest.raises(SystemExit) as e:
    evaluate.main(["--help"])
  assert e.value.code == 0
  assert "--output_dir" in capsys.readouterr().out
