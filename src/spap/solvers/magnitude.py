"""Magnitude pruning of whole channels: the data-free baseline.

Channel i of an MLP is its rows in every input projection (gate and up, or OPT's fc1) and its
column of the down projection. Its score is the norm of all those weights taken together, the
structured form of magnitude pruning (Han et al. 2015; the "magnitude" structured baseline of
LLM-Pruner and FLAP). No calibration data and no weight update: a floor that every data-aware
method must clear.

FLAP's `prune_magnitude_sp` scores an MLP channel by its down-projection column alone; here the
score also counts the input rows, as SPAP_METHOD.md section 7 asks ("norms of the channel's
weights"). Biases are not weights of the channel's connections and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import SpapError
from .base import Decision, LayerProblem, prune_without_update, top_k_keep


@dataclass
class MagnitudeSolver:
    """Keep the channels whose weights (input rows and down-projection column) have the
    largest norm; the kept weights are not changed."""

    name: ClassVar[str] = "magnitude"
    needs_gram: ClassVar[bool] = False
    needs_inputs: ClassVar[bool] = False

    norm: str = "l2"  # "l2" or "l1", over all of a channel's weights

    def __post_init__(self) -> None:
        if self.norm not in ("l1", "l2"):
            raise SpapError(f"magnitude norm '{self.norm}' is not supported; supported: l1, l2")

    def scores(self, problem: LayerProblem) -> torch.Tensor:
        """Per-channel norm (n,) in float64."""
        w_down = problem.w_down.to(torch.float64)  # (m, n)
        parts = [w_down.T] + [w.to(w_down) for w in problem.w_in.values()]  # (n, *) each
        if self.norm == "l1":
            return torch.stack([p.abs().sum(1) for p in parts]).sum(0)
        return torch.stack([(p * p).sum(1) for p in parts]).sum(0).sqrt()

    def solve(self, problem: LayerProblem, n_keep: int) -> Decision:
        return prune_without_update(problem, top_k_keep(self.scores(problem), n_keep))
