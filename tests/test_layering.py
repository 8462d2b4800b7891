"""The package's imports flow one way: no cycle, and no lower layer imports a higher one.

Every module of src/spap is parsed (not imported) and every import in it, at module level or
inside a function, is resolved to the spap module it names. Importing the package itself
(`spap/__init__.py`, which re-exports the public calls) is not an edge: Python runs it before
any submodule, whichever imports which.
"""

from __future__ import annotations

import ast
from pathlib import Path

import spap

ROOT = Path(spap.__file__).parent

# Low to high: a module may import modules of its own rank or lower, never higher.
RANKS = [
    {"errors", "files", "versions", "assets", "config", "memory", "distributed", "precision"},
    {"models"},      # family facts, behind one adapter interface
    {"solvers"},     # the per-layer math: tensors in, decision out
    {"data"},        # calibration and evaluation tokens
    {"modelio"},     # loading, checkpoint reading, the resume folder, saving
    {"driver"},      # the sequential driver and where its layers come from and go
    {"report", "eval", "plan"},
    {"api"},         # spap.prune, spap.prune_to_disk
    {"compare"},
    {"cli", "__main__"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(("spap", *parts))] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            # the longest known module that `t` names (a submodule, or the module itself)
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != "spap" and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _rank(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for r, names in enumerate(RANKS):
        if top in names:
            return r
    raise AssertionError(f"{module} has no layer in RANKS; add it where it belongs")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_imports():
    g = _graph()
    assert "spap.driver.pipeline" in g["spap.api"]
    assert "spap.solvers.base" in g["spap.driver.pipeline"]
    # a function-level import counts too
    assert "spap.api" in g["spap.cli"]


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lower_layers_never_import_higher_ones():
    bad = [f"{m} imports {t}" for m, targets in _graph().items() for t in targets
           if m != "spap" and _rank(t) > _rank(m)]
    assert bad == []
