"""The core's shape: no import cycle between its modules, none over 400 lines, no KFP inside."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dl_uncertainty.families.registry import NAMES

SRC = Path(__file__).resolve().parents[2] / "src" / "dl_uncertainty"
MAX_LINES = 400


def _module(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """Module -> the project modules it imports, at the top or inside a function (not the imports
    under ``if TYPE_CHECKING:``, which exist for annotations and never run)."""
    modules = {_module(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                       for n in ast.walk(block)}  # annotations only: never imported at run time
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_inside_the_core():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle(tmp_path):
    pkg = tmp_path / "dl_uncertainty"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from dl_uncertainty.a.y import f\n")
    (pkg / "a" / "y.py").write_text("def f():\n    from .x import g\n")
    assert cycles(import_graph(pkg)) == [["dl_uncertainty.a.x", "dl_uncertainty.a.y"]]


# The core's folders bottom to top (docs/architecture.md); the modules directly in the package are the entry points.
LAYERS = ("errors", "config", "data", "uncertainty", "families", "training", "reports", "tracking")
# Leaves any layer may read: they import nothing of the core but errors (checked below). The family names
# (config validates model=...) and the MLflow store's setup (tuning and the sweep report open it).
LEAVES = {"dl_uncertainty.families.registry", "dl_uncertainty.tracking.store"}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else None
    return LAYERS.index(top) if top in LAYERS else len(LAYERS)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a module in a higher layer than the importer's (leaves aside)."""
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                  if d not in LEAVES and _layer(d) > _layer(m))


def test_every_module_imports_only_its_own_layer_or_those_below():
    graph = import_graph()
    assert upward_imports(graph) == []
    assert {leaf: graph[leaf] - {"dl_uncertainty.errors"} for leaf in LEAVES} == {leaf: set() for leaf in LEAVES}


def test_the_layer_check_finds_an_upward_import():
    graph = {"dl_uncertainty.data.tables": {"dl_uncertainty.reports.render", "dl_uncertainty.errors"},
             "dl_uncertainty.reports.render": {"dl_uncertainty.data.tables"},
             "dl_uncertainty.train": {"dl_uncertainty.tracking.runs"}}
    assert upward_imports(graph) == ["dl_uncertainty.data.tables -> dl_uncertainty.reports.render"]


def test_no_module_over_the_line_ceiling():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these modules (over {MAX_LINES} lines): {long}"


def test_the_core_imports_no_kfp():
    graph_text = " ".join(p.read_text() for p in SRC.rglob("*.py"))
    assert "import kfp" not in graph_text and "from kfp" not in graph_text


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_family_has_a_config_and_a_search_space(name):
    from dl_uncertainty.config.compose import load_config
    from dl_uncertainty.families.registry import get_family

    cfg = load_config([f"model={name}"])
    assert cfg.model.name == name == get_family(name).name
    assert cfg.tune.space.get(name), f"configs/tune/default.yaml has no tune.space.{name}"
