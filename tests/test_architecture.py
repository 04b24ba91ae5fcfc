"""The package's architecture, read from its imports: no cycles, and every arrow runs one way.

Every module under saejax/ is parsed with `ast` (imports inside functions count: a cycle through
a deferred import is still a cycle, only a later one). `LAYERS` is the one written order of the
layers, lowest first; a module may import modules of its own layer and of lower layers, never of a
higher one. So models know no file format and no trainer, and loading, export, interpretation and
evaluation know no training loop: `train` is the top layer and nothing imports it.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "saejax"

# Lowest first. "core" is the modules directly in saejax/ (`CORE`); every other layer is the
# subpackage of that name. saejax/__init__.py describes the same layers in the same order.
LAYERS = ("core", "data", "models", "sae", "retrieval", "hub", "interpret", "eval", "train")
CORE = ("__init__", "errors", "cli", "sharding", "paths", "hostmem")


def modules(root: Path, package: str) -> dict[str, Path]:
  """{dotted module name: file} of every .py file of `package` under `root`."""
  found = {}
  for file in sorted((root / package).rglob("*.py")):
    parts = list(file.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    found[".".join(parts)] = file
  return found


def _target(name: str, known: dict[str, Path]) -> str | None:
  """The module `name` refers to: itself, else its nearest enclosing module or package."""
  while name and name not in known:
    name = name.rpartition(".")[0]
  return name or None


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
  """{module: the package's modules it imports}, from every import statement (nested ones too)."""
  known = modules(root, package)
  graph: dict[str, set[str]] = {m: set() for m in known}
  for module, file in known.items():
    is_package = file.name == "__init__.py"
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
      names: list[str] = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolved against this module's package
          anchor = module.split(".")[:len(module.split(".")) - node.level + is_package]
          base = ".".join(anchor + ([base] if base else []))
        # `from a import b` imports a.b when b is a module, else a name defined in a.
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
      for name in names:
        if name == package or name.startswith(package + "."):
          target = _target(name, known)
          if target and target != module:
            graph[module].add(target)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def layer_of(module: str, package: str = PACKAGE) -> str:
  """The layer of a module: "core" for saejax itself and the modules directly in it."""
  parts = module.split(".")
  if len(parts) == 1:
    return "core"
  return "core" if parts[1] in CORE else parts[1]


def layer_graph(graph: dict[str, set[str]], package: str = PACKAGE) -> dict[str, set[str]]:
  """The module graph collapsed to layers (arrows inside one layer dropped)."""
  out: dict[str, set[str]] = {}
  for a, targets in graph.items():
    out.setdefault(layer_of(a, package), set()).update(
        layer_of(b, package) for b in targets if layer_of(b, package) != layer_of(a, package))
  return out


def upward_imports(graph: dict[str, set[str]], layers: tuple[str, ...],
                   package: str = PACKAGE) -> list[str]:
  """Every import from a module to a module of a higher layer, as "a -> b (layer -> layer)"."""
  rank = {name: i for i, name in enumerate(layers)}
  return [f"{a} -> {b} ({layer_of(a, package)} -> {layer_of(b, package)})"
          for a, targets in sorted(graph.items()) for b in sorted(targets)
          if rank[layer_of(b, package)] > rank[layer_of(a, package)]]


GRAPH = import_graph(REPO, PACKAGE)


def test_every_module_belongs_to_a_layer():
  top = {m.split(".")[1] for m in GRAPH if "." in m}
  unplaced = sorted(t for t in top if t not in CORE and t not in LAYERS)
  assert not unplaced, (f"saejax.{unplaced[0]} is in no layer: add it to LAYERS (a subpackage) or "
                        "CORE (a module every layer may use) in tests/test_architecture.py, and to "
                        "the layer list in saejax/__init__.py")
  for layer in LAYERS[1:]:
    init = REPO / PACKAGE / layer / "__init__.py"
    assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), (
        f"saejax/{layer}/__init__.py needs a docstring: what the package owns, what it imports")


def test_no_import_cycle_between_modules():
  cycle = find_cycle(GRAPH)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_layers():
  cycle = find_cycle(layer_graph(GRAPH))
  assert cycle is None, "layers import each other: " + " -> ".join(cycle)


def test_every_import_runs_down_the_layers():
  upward = upward_imports(GRAPH, LAYERS)
  assert not upward, (f"{len(upward)} imports run up the layers {' < '.join(LAYERS)}:\n  "
                      + "\n  ".join(upward))


def test_nothing_imports_the_trainer():
  """Inference, export, interpretation and evaluation build and load models through saejax.hub."""
  users = sorted(a for a, targets in GRAPH.items() if layer_of(a) != "train"
                 for b in targets if layer_of(b) == "train")
  assert not users, f"{users} import saejax.train"


def test_the_package_docstring_lists_the_layers_in_order():
  doc = ast.get_docstring(ast.parse((REPO / PACKAGE / "__init__.py").read_text()))
  listed = [line.split()[0] for line in doc.splitlines()
            if line.startswith("  ") and not line.startswith("   ")]
  assert tuple(listed) == LAYERS


def _package(root: Path, files: dict[str, str]) -> Path:
  for name, text in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)
  return root


def test_the_checks_find_a_planted_cycle_and_an_upward_import(tmp_path):
  root = _package(tmp_path, {
      "pkg/__init__.py": "",
      "pkg/errors.py": "",
      "pkg/low/__init__.py": "",
      "pkg/low/a.py": "from pkg.low import b\n",
      # the cycle closes inside a function, through a relative import
      "pkg/low/b.py": "def f():\n  from . import a\n  from pkg import errors\n",
      "pkg/low/c.py": "import pkg.high.d\n",  # up the layers
      "pkg/high/__init__.py": "",
      "pkg/high/d.py": "from pkg.low.a import something\nfrom pkg.errors import E\n",
  })
  graph = import_graph(root, "pkg")
  assert graph["pkg.low.a"] == {"pkg.low.b"}
  assert graph["pkg.low.b"] == {"pkg.low.a", "pkg.errors"}
  assert graph["pkg.high.d"] == {"pkg.low.a", "pkg.errors"}
  assert find_cycle(graph) in (["pkg.low.a", "pkg.low.b", "pkg.low.a"],
                               ["pkg.low.b", "pkg.low.a", "pkg.low.b"])
  assert find_cycle(layer_graph(graph, "pkg")) == ["high", "low", "high"]
  assert upward_imports(graph, ("core", "low", "high"), "pkg") == [
      "pkg.low.c -> pkg.high.d (low -> high)"]
  del graph["pkg.low.b"], graph["pkg.low.c"]
  assert find_cycle(graph) is None and upward_imports(graph, ("core", "low", "high"), "pkg") == []
