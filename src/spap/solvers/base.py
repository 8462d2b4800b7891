"""The one small interface every pruning method implements.

A solver sees one MLP layer as tensors (no hooks, no devices, no model): the dense weights,
the statistics of the down projection's input, and optionally the raw MLP inputs for methods
that refit the input projections. It returns which channels to keep and the new weights.
The pipeline does the rest (slicing, replay, export), identically for every method, so that a
comparison between methods compares the methods and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..distributed import LOCAL, Shard
from .stats import ActStats


@dataclass
class LayerProblem:
    """One MLP layer: out = W_down X + b_down, with X (n x tokens) its intermediate activations.

    `w_in` holds the input projections as rows per channel, by role: {"gate": (n, d), "up":
    (n, d)} for gated MLPs, {"up": (n, d)} for the others (OPT's fc1, ...); `b_in` their
    per-channel biases, for the roles that have one; `act` the nonlinearity, so that
    X = act(a gate^T + b_gate) * (a up^T + b_up) (gated: `linear_key` names the entry that
    enters linearly) or X = act(a up^T + b_up).
    `stats` sum over all calibration windows and keep the held-out windows' part apart: a
    decision (the mask) reads `stats.fit()` only, the fit windows' statistics; the refit
    reads `stats` (its settings chosen on the held-out part, then solved on all windows).
    `inputs` and `targets` are only filled for solvers with `needs_inputs`: the MLP inputs a
    (tokens, d) and the dense layer's output on them (tokens, m), in the activations' dtype;
    their last `heldout_tokens` rows are the held-out calibration windows (the same windows as
    `stats.gram_heldout`), which no fit may use.
    """

    w_down: torch.Tensor  # (m, n)
    w_in: dict[str, torch.Tensor]  # name -> (n, d)
    stats: ActStats
    b_down: torch.Tensor | None = None  # (m,)
    b_in: dict[str, torch.Tensor] = field(default_factory=dict)  # role -> (n,)
    inputs: torch.Tensor | None = None  # (p, d)
    targets: torch.Tensor | None = None  # (p, m)
    linear_key: str | None = None  # the entry of w_in that enters X linearly, if any
    act: Callable[[torch.Tensor], torch.Tensor] | None = None
    heldout_tokens: int = 0  # trailing rows of inputs/targets from held-out windows
    # the drift D per token (p, m), rows as `targets`, when the solver asked for the drift
    # target (`needs_drift`): the dense model's hidden state after the layer minus the layer's
    # output on these inputs with its dense weights
    drift: torch.Tensor | None = None
    # G (m, m): the Fisher of the loss with respect to this layer's down-projection output,
    # when the solver weights its decision by it (`needs_out_weight`, weighting.py)
    out_weight: torch.Tensor | None = None
    # in a data-parallel run, `stats` are already summed over ranks, while `inputs`, `targets`
    # and `drift` are this rank's share of the tokens (fit rows first, then its held-out
    # rows); a solver that uses those rows sums over `shard` too (recovery.py)
    shard: Shard = LOCAL
    # the dtype of the solver's large products (precision.py): float32, or bfloat16 where the
    # device multiplies it fast; sums and solves keep their own precision either way
    compute_dtype: torch.dtype = torch.float32
    # tokens per calibration window of `inputs` (0: unknown), so that a solver's products can
    # cover whole windows, the same tokens however the windows are shared between ranks
    window_tokens: int = 0
    # the driver's problems are solved once: a solver may then drop `stats` (the Grams,
    # n x n float64 twice) once it no longer needs them, before recovery's epochs
    solved_once: bool = False

    def release_stats(self) -> None:
        """Drop the statistics when the problem is solved once (`solved_once`)."""
        if self.solved_once:
            self.stats = None

    @property
    def n(self) -> int:
        return self.w_down.shape[1]


@dataclass
class Decision:
    """What to keep and the weights that replace the dense ones (float64, on the solve device).

    `w_in` is None when the kept input rows are unchanged (the usual case); `b_down` is None when
    the down bias is unchanged or absent.
    """

    keep: torch.Tensor  # (k,) sorted int64 channel indices
    w_down: torch.Tensor  # (m, k)
    b_down: torch.Tensor | None = None  # (m,)
    w_in: dict[str, torch.Tensor] | None = None  # name -> (k, d)
    info: dict[str, Any] = field(default_factory=dict)


class Solver(Protocol):
    """A pruning method for one layer.

    Implementations are dataclasses whose fields are the method's options (recorded in every
    report) and whose class attributes `name`, `needs_gram` and `needs_inputs` tell the pipeline
    what to collect.
    """

    name: str
    needs_gram: bool
    needs_inputs: bool

    def solve(self, problem: LayerProblem, n_keep: int) -> Decision: ...


def top_k_keep(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the n_keep largest scores, sorted ascending (ties broken by index)."""
    idx = torch.topk(scores, n_keep, largest=True, sorted=False).indices
    return torch.sort(idx).values


def prune_without_update(problem: LayerProblem, keep: torch.Tensor) -> Decision:
    """The kept columns of the dense down projection, unchanged (score-only methods), with the
    in-sample relative error in `info` when the pipeline collected the Gram."""
    from .refit import relative_error, scatter_columns

    w_down = problem.w_down.to(torch.float64)  # (m, n)
    w = w_down[:, keep]  # (m, k)
    info = {}
    if problem.stats.gram is not None:
        info["rel_error"] = relative_error(
            w_down, scatter_columns(w, keep, problem.n), problem.stats.gram
        )
    return Decision(keep=keep, w_down=w, info=info)
