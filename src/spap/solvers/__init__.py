"""Pruning methods, one per file, behind the `Solver` interface of base.py.

Solvers are looked up by name; each is a dataclass whose fields are its options, so
`get_solver("spap", iters=4)` builds a variant and `solver_options(solver)` records it;
`options(method)` lists them with their meaning (options.py).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from ..errors import SpapError
from .base import Decision, LayerProblem, Solver
from .options import HEAD_DEFAULTS, HEAD_FLAGS, HEAD_LINES, Option, describe, refuse_unknown

# name -> "module:Class"; imported on first use so that `spap --help` stays fast.
_SOLVERS: dict[str, str] = {
    "spap": "spap:SpapSolver",
    "obs": "obs:ObsSolver",
    "fasp": "fasp:FaspSolver",
    "flap": "flap:FlapSolver",
    "wanda-sp": "wanda_sp:WandaSpSolver",
    "magnitude": "magnitude:MagnitudeSolver",
}

METHODS: tuple[str, ...] = tuple(_SOLVERS)


def solver_class(name: str) -> type:
    if name not in _SOLVERS:
        raise SpapError(f"unknown method '{name}'; supported: {', '.join(sorted(_SOLVERS))}")
    module, cls = _SOLVERS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def get_solver(name: str, **options: Any) -> Solver:
    """Build solver `name` with `options` overriding its defaults."""
    cls = solver_class(name)
    refuse_unknown(options, (f.name for f in dataclasses.fields(cls)), "option",
                   f"spap options {name}", f" for method '{name}'")
    solver = cls(**options)
    check = getattr(solver, "check_refit", None)
    if check is not None:  # a bad refit option is refused before any model is loaded
        try:
            check()
        except ValueError as e:
            raise SpapError(f"method '{name}': {e}") from None
    return solver


def solver_options(solver: Solver) -> dict[str, Any]:
    return dataclasses.asdict(solver)  # type: ignore[call-overload]


def get_head_solver(method: str, **options: Any):
    """The head solver of head method `method` with `options` over the head defaults
    (HEAD_DEFAULTS); SpapError for an unknown option or value."""
    from .heads import HeadSolver

    known = (f.name for f in dataclasses.fields(HeadSolver) if f.name not in HEAD_FLAGS)
    refuse_unknown(options, known, "head option", "spap options heads")
    solver = HeadSolver(method=method, **{**HEAD_DEFAULTS, **options})
    solver.check()
    return solver


def list_options(method: str | None = None) -> dict[str, list[Option]]:
    """Every option of `method` (every method when None), then the head options: name,
    type, default, allowed values and one line of meaning. `method="heads"`: those alone."""
    from .heads import HeadSolver

    if method is not None and method != "heads" and method not in _SOLVERS:
        raise SpapError(f"unknown method '{method}'; supported: "
                        f"{', '.join(sorted(_SOLVERS))}, or heads")
    names = METHODS if method is None else () if method == "heads" else (method,)
    out = {f"method {n} (--option KEY=VALUE)": describe(solver_class(n)) for n in names}
    out["heads, with --heads or --kv-groups (--head-option KEY=VALUE)"] = describe(
        HeadSolver, HEAD_LINES, HEAD_DEFAULTS, skip=HEAD_FLAGS)
    return out


__all__ = ["Decision", "LayerProblem", "Solver", "METHODS", "Option", "get_head_solver",
           "get_solver", "list_options", "solver_options"]
