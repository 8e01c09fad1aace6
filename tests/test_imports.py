"""The product's import graph has no circles (ARCHITECTURE.md, "Modules").

pipelines/ imports transforms/; tools/ imports pipelines/ and transforms/;
nothing imports back.  Inside transforms/, models.py (the registry) knows
nothing of runtimes/, which builds on it.

The graph is read from the source files with ``ast``, nothing is imported:
every import statement counts, also one inside a function or under
``if TYPE_CHECKING:``, because a lazy import is still a dependency.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pipelines", "transforms", "tools")


def _module_name(root: str, path: str) -> str:
  rel = os.path.relpath(path, root)[:-len(".py")].split(os.sep)
  if rel[-1] == "__init__":
    rel = rel[:-1]
  return ".".join(["natvision"] + rel)  # installed as natvision.<package>


def _imported(tree: ast.AST, module: str, is_package: bool, modules):
  """The modules every import statement of one module names, absolute.

  ``from natvision.transforms import models`` names
  natvision.transforms.models (a module) and not the package;
  ``from natvision.transforms.config import ConfigError`` names
  natvision.transforms.config.
  """
  package = module if is_package else module.rpartition(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parent = package.split(".")
        parent = parent[:len(parent) - (node.level - 1)]
        base = ".".join(parent + ([base] if base else []))
      submodules = [f"{base}.{alias.name}" for alias in node.names
                    if f"{base}.{alias.name}" in modules]
      if len(submodules) < len(node.names):
        yield base  # names defined in the module (or package) itself
      yield from submodules


def import_graph(root: str = REPO):
  """module -> the product's modules it imports (pipelines, transforms, tools)."""
  files = {}
  for package in PACKAGES:
    for folder, _, names in os.walk(os.path.join(root, package)):
      for name in names:
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          files[_module_name(root, path)] = path
  graph = {}
  for module, path in files.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=path)
    targets = set(_imported(tree, module, path.endswith("__init__.py"),
                            files))
    graph[module] = {t for t in targets if t in files and t != module}
  return graph


def _cycle(edges):
  """One cycle of a directed graph, as a list of nodes, or None."""
  done, on_path = set(), []

  def visit(node):
    if node in on_path:
      return on_path[on_path.index(node):] + [node]
    if node in done:
      return None
    on_path.append(node)
    for nxt in sorted(edges.get(node, ())):
      found = visit(nxt)
      if found:
        return found
    on_path.pop()
    done.add(node)
    return None

  for node in sorted(edges):
    found = visit(node)
    if found:
      return found
  return None


def _package_edges(graph):
  edges = {}
  for module, targets in graph.items():
    for target in targets:
      a, b = module.split(".")[1], target.split(".")[1]  # natvision.<pkg>
      if a != b:
        edges.setdefault(a, set()).add(b)
  return edges


def _models_runtimes_edges(graph):
  """natvision.transforms.models and natvision.transforms.runtimes (one
  node), and who imports whom between them."""

  def node(module):
    if module == "natvision.transforms.models":
      return "natvision.transforms.models"
    if module.startswith("natvision.transforms.runtimes"):
      return "natvision.transforms.runtimes"
    return None

  edges = {}
  for module, targets in graph.items():
    for target in targets:
      a, b = node(module), node(target)
      if a and b and a != b:
        edges.setdefault(a, set()).add(b)
  return edges


def test_the_graph_is_read_from_the_sources():
  graph = import_graph()
  assert "natvision.transforms.embed" in graph["natvision.pipelines.embed_images"]
  assert "natvision.transforms.models" in graph["natvision.transforms.runtimes.base"]
  assert "natvision.transforms.runtimes.base" in graph["natvision.transforms.runtimes"]


def test_no_package_imports_back():
  edges = _package_edges(import_graph())
  assert _cycle(edges) is None, " -> ".join(_cycle(edges))
  assert edges.get("pipelines", set()) <= {"transforms"}
  assert not edges.get("transforms")


def test_no_module_imports_back():
  graph = import_graph()
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_models_do_not_import_runtimes():
  edges = _models_runtimes_edges(import_graph())
  assert _cycle(edges) is None, " -> ".join(_cycle(edges))


@pytest.mark.parametrize("edges, cycle", [
    ({"a": {"b"}, "b": {"c"}}, None),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
])
def test_a_cycle_is_found(edges, cycle):
  assert _cycle(edges) == cycle


def test_lazy_and_relative_imports_count(tmp_path):
  (tmp_path / "tools").mkdir()
  (tmp_path / "tools" / "__init__.py").write_text("")
  (tmp_path / "tools" / "a.py").write_text("from . import b\n")
  (tmp_path / "tools" / "b.py").write_text("")
  (tmp_path / "pipelines").mkdir()
  (tmp_path / "pipelines" / "__init__.py").write_text("")
  (tmp_path / "pipelines" / "job.py").write_text(
      "def main():\n  from natvision.tools import a\n")
  graph = import_graph(str(tmp_path))
  assert graph["natvision.tools.a"] == {"natvision.tools.b"}
  assert graph["natvision.pipelines.job"] == {"natvision.tools.a"}
