"""One line of meaning for every method and head option: what `spap options` prints.

A solver's options are its dataclass fields (their types and defaults are read from the
dataclass, never repeated here); this module adds what a field declaration cannot say to a
user: the values it accepts and one line of meaning. tests/test_options.py fails when a
solver gains a field without its line here, so no option exists undocumented.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import SpapError

NUMBERS = "comma-separated numbers"

# option name -> (one line of meaning, allowed values). One entry serves every solver that has
# the field (the shared refit and weighting options mean the same for all).
LINES: dict[str, tuple[str, str]] = {
    # refit.RefitOptions: the refit every refitting method shares
    "refit": ("the kept down projection's refit: exact = damped least squares, ridge = least "
              "squares shrunk toward the dense weights, strength chosen on held-out windows",
              "exact, ridge"),
    "damp": ("damping of the Gram matrix, H + damp * mean(diag H) * I, in the exact refit and "
             "the decisions", ">= 0"),
    "ridge_grid": ("ridge strengths (relative to mean diag H of the kept channels) tried on "
                   "the held-out windows", NUMBERS + " > 0"),
    "ridge_search": ("walk: downhill from the grid's middle; all: every grid point",
                     "walk, all"),
    "ridge_fallback": ("the ridge used, with a warning, when the calibration has a single "
                       "window and nothing can be held out", "> 0"),
    "refit_target": ("what the refit reproduces: layer = the dense layer's output; drift = "
                     "that plus a share of the dense model's residual drift (needs "
                     "refit=ridge)", "layer, drift"),
    "drift_grid": ("drift shares alpha tried on the held-out windows with refit_target=drift",
                   NUMBERS + " in [0, 1]"),
    # weighting.OutputWeighting: the decision's output weighting
    "out_weight": ("how the decision weighs output directions: none = all alike (as "
                   "published); fisher = by the loss's empirical Fisher (one extra forward and "
                   "backward pass of the dense model)", "none, fisher"),
    "out_weight_damp": ("damping of the Fisher weighting, G / mean(diag G) + delta * I",
                        ">= 0"),
    # spap
    "weights": ("per-channel weight d_i of SPAP's penalty: obs = 1 / (H^-1)_ii, diag = H_ii",
                "obs, diag"),
    "s_step": ("SPAP's s-step: loo = leave-one-out column costs, lp = the paper's linear "
               "program, soft = a soft threshold", "loo, lp, soft"),
    "rho0": ("SPAP's initial penalty weight, relative to d (scale-free)", "> 0"),
    "rho_growth": ("factor by which SPAP's penalty weight grows per iteration", "> 1"),
    "iters": ("SPAP's penalty iterations; 0 keeps the greedy OBS mask (measured: the "
              "iterations never changed it)", ">= 0"),
    "starts": ("starting masks of the penalty method, the lowest exact error wins",
               "comma-separated of greedy, uniform, obs, wanda (non-greedy need iters >= 1)"),
    "greedy_block": ("channels removed per step of the greedy OBS mask (1 = exact greedy)",
                     ">= 1"),
    "swap_max_n": ("layers this narrow or narrower also get an exact 1- and 2-swap search",
                   ">= 0"),
    "recovery": ("SPAP's recovery of the kept MLP: alternating = Adam on gate/up then the "
                 "closed-form down projection, per epoch; joint = Adam on all; continuation = "
                 "the cut made gradually inside recovery; none = decision and refit only",
                 "alternating, joint, continuation, none"),
    "recovery_epochs": ("most recovery epochs; the count is chosen on the held-out windows",
                        ">= 0"),
    "recovery_lr": ("Adam's rate in recovery, relative to each weight's RMS", "> 0"),
    "recovery_batch": ("tokens per Adam step in recovery (at most, with recovery_steps)",
                       ">= 1"),
    "recovery_steps": ("Adam steps per recovery epoch whatever the token count (0: one per "
                       "recovery_batch tokens)", ">= 0"),
    "recovery_patience": ("stop recovery after this many epochs without held-out gain (0: run "
                          "all recovery_epochs)", ">= 0"),
    "recovery_rerun": ("run the epochs the held-out windows chose once more from the start on "
                       "all windows", "true, false"),
    "recovery_shrink": ("fractions of recovery's update of gate and up to try, chosen on the "
                        "held-out windows; empty: off", NUMBERS + " >= 0, or empty"),
    "recovery_final_refit": ("after recovery, solve the down projection once more on all "
                             "windows", "true, false"),
    "recovery_target": ("what recovery reproduces: layer = the dense MLP on the pruned "
                        "model's inputs; model = the dense model's own MLP output",
                        "layer, model"),
    "recovery_weight": ("output weighting of recovery's loss: none, or the loss's Fisher",
                        "none, fisher"),
    "recovery_parallel": ("in a run on several processes: exact = every rank takes one "
                          "process's steps (bit-identical); split = each rank's share of every "
                          "minibatch, gradients summed (equal up to float rounding; pays only "
                          "where a step costs more than the gradients' all-reduce)",
                          "split, exact"),
    "continuation_mu": ("recovery=continuation: penalty weight of the first and the last "
                        "epoch, relative to H_ii", "two numbers, 0 < first <= last"),
    "continuation_rechoose": ("recovery=continuation: how the channels to remove are "
                              "re-chosen between epochs: loo = by leave-one-out cost, fixed = "
                              "the decision's mask throughout", "loo, fixed"),
    "solve_dtype": ("dtype of the decision and the refit (the Gram is summed in float64 "
                    "either way); float64 reproduces a one-process run under torchrun",
                    "float32, float64"),
    # obs
    "block": ("columns removed per OBS step (1 = exact greedy)", ">= 1"),
    "buffer": ("OBS steps between applications of the pending updates (speed only)", ">= 1"),
    # flap
    "bias": ("FLAP's bias compensation of the removed channels; false: scores only",
             "true, false"),
    # magnitude
    "norm": ("the norm of a channel's weights that ranks it", "l2, l1"),
}

# Head options whose meaning differs from the method option of the same name, or that only
# heads have (solvers/heads.py); the shared refit options take their line from LINES.
HEAD_LINES: dict[str, tuple[str, str]] = {
    "refit": ("the kept o_proj columns' refit (with update unset: obs only): exact = damped "
              "least squares, ridge = shrunk toward the dense weights, strength chosen on "
              "held-out windows", "exact, ridge"),
    "drift_grid": ("unused by heads (their refit has no drift target)", NUMBERS),
    "refit_target": ("what o_proj's refit reproduces: its dense output", "layer"),
    "search": ("obs: greedy over head blocks, or exact (every feasible subset)",
               "greedy, exact"),
    "update": ("refit the kept o_proj columns; unset: obs yes, the score methods no (as "
               "published)", "true, false"),
    "bias": ("flap's bias compensation of o_proj (only without the refit)", "true, false"),
    "max_subsets": ("the most subsets search=exact evaluates", ">= 1"),
}

# HeadSolver fields a flag sets rather than --head-option
HEAD_FLAGS: dict[str, str] = {"method": "--head-method"}
# the head options' defaults where `spap prune --heads` departs from HeadSolver's own
HEAD_DEFAULTS: dict[str, Any] = {"refit": "ridge"}


@dataclasses.dataclass(frozen=True)
class Option:
    """One option as `spap options` lists it."""

    name: str
    type: str
    default: Any
    allowed: str
    help: str


def describe(cls: type, lines: Mapping[str, tuple[str, str]] = LINES,
             defaults: Mapping[str, Any] | None = None,
             skip: Iterable[str] = ()) -> list[Option]:
    """Every option of solver class `cls` (its dataclass fields, in declaration order) with
    its line from `lines`, falling back to LINES; `defaults` overrides the field defaults."""
    defaults = defaults or {}
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        line = lines.get(f.name) or LINES.get(f.name)
        if line is None:
            raise KeyError(f"option '{f.name}' of {cls.__name__} has no line in "
                           "spap/solvers/options.py")
        default = defaults.get(f.name, f.default)
        out.append(Option(f.name, str(f.type), default, line[1], line[0]))
    return out


def refuse_unknown(given: Iterable[str], known: Iterable[str], noun: str, command: str,
                   where: str = "") -> None:
    """SpapError naming each unknown `noun` of `given` with the closest of `known`, e.g.
    "unknown option 'recovery_epoch' (did you mean recovery_epochs?) for method 'spap'"."""
    known = sorted(known)
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3)
        parts.append(f"'{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    raise SpapError(f"unknown {noun} {', '.join(parts)}{where}; `{command}` lists them")


def _value(v: Any) -> str:
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return str(v).lower()
    return repr(v) if v == "" else str(v)


def format_options(sections: Mapping[str, list[Option]]) -> str:
    """The sections as plain text: a heading per section, one block per option."""
    out = []
    for title, opts in sections.items():
        out.append(f"{title}:" if opts else f"{title}: no options")
        for o in opts:
            out.append(f"  {o.name} ({o.type}, default {_value(o.default)}; {o.allowed})")
            out.append(f"      {o.help}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
