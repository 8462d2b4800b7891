"""Wanda-sp: Wanda's weight-times-activation score, summed over a whole channel.

Wanda (Sun et al. 2023) scores weight W[j, i] by |W[j, i]| * ||X_i||_2, the size of its
contribution to the output over the calibration tokens. Its structured variant "wanda-sp", the
baseline of FLAP (An et al. 2024, `prune_wanda_sp` in CASIA-IVA-Lab/FLAP lib/prune.py), scores
a down-projection input channel by aggregating over the output rows:

    score_i = sum_j |W_down[j, i]| * ||X_i||_2

FLAP's code takes the mean over j instead of the sum and scales ||X_i||^2 by 1 / (number of
calibration sequences); both factors are the same for every channel of a layer, so the ranking,
which is all a per-layer ratio uses, is identical. We keep the sum and the plain norm. Only the
down projection is scored, as in FLAP: the input projections do not enter the score. No weight
update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Decision, LayerProblem, prune_without_update, top_k_keep


def wanda_sp_scores(w_down: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """score_i = sum_j |W_down[j, i]| * ||X_i||_2, (n,), float64."""
    w = w_down.to(torch.float64)  # (m, n)
    return w.abs().sum(0) * act_norm.to(w)


@dataclass
class WandaSpSolver:
    """Keep the channels with the largest structured Wanda score; weights unchanged."""

    name: ClassVar[str] = "wanda-sp"
    needs_gram: ClassVar[bool] = False
    needs_inputs: ClassVar[bool] = False

    def solve(self, problem: LayerProblem, n_keep: int) -> Decision:
        # (the fit windows' norms: decisions never see the held-out ones, stats.ActStats.fit)
        scores = wanda_sp_scores(problem.w_down.to(torch.float64),
                                 problem.stats.fit(gram=False).norm)
        return prune_without_update(problem, top_k_keep(scores, n_keep))
