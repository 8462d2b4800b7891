"""Effort levels: one flag that trades time for quality, each level a named set of options.

`--effort fast|default|max` picks one row of `PRESETS`, the method options that level sets.
Options given explicitly (`--option key=value`) override the level's and are recorded as
such, so a run's record says which options came from the level and which from the user.

SPAP takes every option of a level; a baseline (obs, fasp, ...) takes the generic ones it
accepts (`GENERIC`: the shared refit, its target and the loss-weighted output error), so at
the same level a baseline and SPAP fit the same target with the same refit and rank masks by
the same error: a fair fight. A method that accepts none of
them runs as it would without a level.

The drift target (`refit_target=drift`) needs a decoder layer whose output is the residual
plus the MLP's output; on the families where it is not (Gemma 2/3, Granite), or together with
head pruning, a level that set it falls back to the plain layer target, with a note in the
run's record (the driver decides, `Effort.may_fall_back`). An explicit
`--option refit_target=drift` is refused there as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import SpapError

#: the best measured recipe: the drift target, recovery at Adam's rate 0.005 for up to 16
#: epochs of 64 steps, held-out early stopping after 2 epochs without gain, and the down
#: projection solved once more on all windows
_BEST = {"refit": "ridge", "refit_target": "drift", "recovery_lr": 0.005,
         "recovery_epochs": 16, "recovery_steps": 64, "recovery_patience": 2,
         "recovery_final_refit": True}

PRESETS: dict[str, dict[str, Any]] = {
    # the drift target with the earlier 2-epoch recovery
    "fast": {"refit": "ridge", "refit_target": "drift", "recovery_lr": 0.02,
             "recovery_epochs": 2},
    "default": _BEST,
    # and the decision weighted by the loss's sensitivity to each output direction
    "max": {**_BEST, "out_weight": "fisher"},
    # the method's own option defaults, nothing set (earlier runs, with --compute float32)
    "none": {},
}
EFFORTS: tuple[str, ...] = tuple(PRESETS)
#: the level a method runs at when none is asked for: SPAP's best measured recipe, so that
#: `spap prune MODEL --sparsity R` gives it; a baseline runs as published unless asked
DEFAULT_LEVEL: dict[str, str] = {"spap": "default"}
#: the options of a level that every method accepting them takes (baselines included)
GENERIC = ("refit", "refit_target", "out_weight")
#: what a level's drift target falls back to where the drift target cannot be used
FALLBACK = {"refit_target": "layer"}


@dataclass
class Effort:
    """A level resolved for one method: `options` go to the solver (the level's, then the
    explicit ones over them); `preset` the level's options that applied; `explicit` the
    user's; `overridden` the level's options that an explicit one replaced."""

    level: str | None
    method: str
    options: dict[str, Any]
    preset: dict[str, Any] = field(default_factory=dict)
    explicit: dict[str, Any] = field(default_factory=dict)
    overridden: list[str] = field(default_factory=list)
    not_applicable: list[str] = field(default_factory=list)

    def from_level(self, key: str) -> bool:
        """Whether the level, not the user, set option `key`."""
        return key in self.preset and key not in self.explicit

    @property
    def may_fall_back(self) -> bool:
        """Whether the drift target came from the level (so it may fall back)."""
        return self.from_level("refit_target") and self.preset["refit_target"] == "drift"

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "method": self.method, "preset": self.preset,
                "explicit": self.explicit, "overridden": self.overridden,
                "not_applicable": self.not_applicable}


def resolve_effort(method: str, level: str | None, explicit: dict[str, Any] | None,
                   accepts: set[str]) -> Effort:
    """Level `level` (None: no level, the method's own defaults) for `method`, whose options
    are `accepts`, with the user's `explicit` options over it."""
    explicit = dict(explicit or {})
    if level is None:
        level = DEFAULT_LEVEL.get(method)
    if level is None:
        return Effort(None, method, explicit, explicit=explicit)
    if level not in PRESETS:
        raise SpapError(f"unknown --effort '{level}'; use one of {', '.join(EFFORTS)}")
    table = PRESETS[level]
    own = method == "spap"
    applies = {k: v for k, v in table.items()
               if k in accepts and (own or k in GENERIC)}
    return Effort(level, method, {**applies, **explicit}, preset=applies, explicit=explicit,
                  overridden=sorted(k for k in applies if k in explicit),
                  not_applicable=sorted(set(table) - set(applies)))


def effort_for(method: str, level: str | None, explicit: dict[str, Any] | None) -> Effort:
    """`resolve_effort` with the options that solver `method` accepts (looked up only when
    a level is asked for)."""
    from . import solver_class

    if level is None and method not in DEFAULT_LEVEL:
        return resolve_effort(method, None, explicit, set())
    accepts = {f.name for f in dataclasses.fields(solver_class(method))}
    return resolve_effort(method, level, explicit, accepts)
