"""The declared dependency floors (pyproject.toml) cover the APIs the code calls.

Every module of src/spap is parsed (not imported), and each use of an API that a known release
introduced is matched against the floor pyproject.toml declares for its package: a use of a
newer API than the floor fails this test, unless the use is guarded (inside a `try` that
catches the error an older release raises). Versions come from each API's first release
(torch's and transformers' release notes and source); transformers 5.0.0 and torch 2.13 were
run on the in-memory, low-memory and reload tests at these floors.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import spap

tomllib = pytest.importorskip("tomllib")  # (Python 3.11+; pyproject is TOML)
ROOT = Path(spap.__file__).parent
PYPROJECT = ROOT.parent.parent / "pyproject.toml"


@dataclass(frozen=True)
class LateApi:
    package: str
    since: str
    what: str  # an attribute name, or "call.keyword" for a keyword of a call
    guarded_by: tuple[str, ...] = ()  # exceptions an older release raises at the use


LATE_APIS = [
    LateApi("torch", "2.6", "get_default_backend_for_device"),
    LateApi("torch", "2.8", "mm.out_dtype", guarded_by=("TypeError", "RuntimeError")),
    LateApi("transformers", "5.0", "all_tied_weights_keys"),
    LateApi("transformers", "4.56", "from_pretrained.dtype"),
    LateApi("transformers", "4.56", "from_config.dtype"),
]


def declared_floors(text: str) -> dict[str, Version]:
    """{package: lowest version allowed} of pyproject's dependencies with a >= floor."""
    out = {}
    for dep in tomllib.loads(text)["project"]["dependencies"]:
        req = Requirement(dep)
        for spec in req.specifier:
            if spec.operator in (">=", "=="):
                out[req.name.lower().replace("_", "-")] = Version(spec.version)
    return out


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value  # getattr(obj, "name", ...)
    return None


def uses(tree: ast.AST, api: LateApi) -> list[tuple[int, bool]]:
    """(line, guarded) of every use of `api` in `tree`."""
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}

    def guarded(node: ast.AST) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.Try):
                caught = set()
                for h in node.handlers:
                    types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
                    caught |= {_name(t) for t in types if t is not None}
                if api.guarded_by and set(api.guarded_by) <= caught:
                    return True
        return False

    found = []
    call, _, keyword = api.what.partition(".")
    for node in ast.walk(tree):
        if keyword:
            if (isinstance(node, ast.Call) and _name(node.func) == call
                    and any(k.arg == keyword for k in node.keywords)):
                found.append((node.lineno, guarded(node)))
        elif _name(node) == api.what and isinstance(node, (ast.Attribute, ast.Constant)):
            found.append((node.lineno, guarded(node)))
    return found


def violations(floors: dict[str, Version]) -> list[str]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for api in LATE_APIS:
            floor = floors.get(api.package)
            if floor is not None and floor >= Version(api.since):
                continue
            for line, safe in uses(tree, api):
                if not safe:
                    out.append(f"{path.relative_to(ROOT)}:{line} uses {api.what} "
                               f"({api.package} {api.since}) but the floor is {floor}")
    return out


def test_declared_floors_cover_the_late_apis_the_code_uses():
    floors = declared_floors(PYPROJECT.read_text())
    assert violations(floors) == []
    assert {"torch", "transformers", "huggingface-hub"} <= set(floors)


def test_every_listed_api_is_used_so_the_check_means_something():
    trees = [ast.parse(p.read_text()) for p in ROOT.rglob("*.py")]
    for api in LATE_APIS:
        assert any(uses(t, api) for t in trees), f"{api.what} is no longer used: drop its line"


@pytest.mark.parametrize("old,caught", [
    ('"torch>=2.1"', "get_default_backend_for_device"),
    ('"transformers>=4.56"', "all_tied_weights_keys"),
    ('"transformers>=4.40"', "from_pretrained.dtype"),
])
def test_an_older_floor_is_caught(old, caught):
    text = PYPROJECT.read_text()
    pkg = old.strip('"').split(">=")[0]
    line = next(d for d in tomllib.loads(text)["project"]["dependencies"] if d.startswith(pkg))
    found = violations(declared_floors(text.replace(f'"{line}"', old)))
    assert any(caught in v for v in found), found


def test_an_unguarded_use_of_a_guarded_api_is_caught():
    tree = ast.parse("import torch\ndef f(x):\n"
                     "    return torch.mm(x.T, x, out_dtype=torch.float32)\n")
    guarded = ast.parse("import torch\ndef f(x):\n    try:\n"
                        "        return torch.mm(x.T, x, out_dtype=torch.float32)\n"
                        "    except (RuntimeError, TypeError):\n        return None\n")
    api = LATE_APIS[1]
    assert uses(tree, api) == [(3, False)] and uses(guarded, api) == [(4, True)]


def test_installed_versions_meet_the_floors():
    import importlib.metadata as md

    for pkg, floor in declared_floors(PYPROJECT.read_text()).items():
        assert Version(md.version(pkg)) >= floor, pkg
