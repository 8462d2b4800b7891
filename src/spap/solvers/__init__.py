"""Pruning methods, one per file, behind the `Solver` interface of base.py.

Solvers are looked up by name; each is a dataclass whose fields are its options, so
`get_solver("spap", rounds=0)` builds a variant and `solver.options()` records it.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from ..errors import SpapError
from .base import Decision, LayerProblem, Solver

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
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - known
    if unknown:
        raise SpapError(
            f"unknown option(s) {sorted(unknown)} for method '{name}'; known: {sorted(known)}"
        )
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


__all__ = ["Decision", "LayerProblem", "Solver", "METHODS", "get_solver", "solver_options"]
