"""FLAP: fluctuation-based channel scores with bias compensation (An et al., AAAI 2024).

FLAP's observation: a channel whose input is nearly constant over the tokens can be removed
almost for free, because its contribution W_down[:, i] * X_i is then nearly a constant vector,
which a bias can absorb. Its "WIFV" metric (weighted input feature variance) scores channel i by

    score_i = var(X_i) * ||W_down[:, i]||_2^2

and after removing the set P the down projection's bias absorbs the removed channels' mean
contribution:

    b_new = b + W_down[:, P] mean(X_P)

which makes the mean output of the layer over the calibration tokens exact. LLaMA-style models
have no down-projection bias; the compensation then becomes a new bias (the pipeline adds one).

FLAP also standardizes the scores of all layers and thresholds them globally, which gives each
layer its own width ("adaptive structure"). This project prunes the same ratio in every layer
(FLAP's "UL-UM" setting), where only the per-layer ranking matters, so the standardization is
not needed. The variance is the exact population variance over all calibration tokens
(ActStats.var, from the sums); FLAP's streaming estimate approximates the same quantity (with
running means and, as its code is written, without the first calibration batch). No other
weight update: kept weights stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Decision, LayerProblem, top_k_keep
from .refit import complement, scatter_columns
from .stats import ActStats


def flap_scores(w_down: torch.Tensor, act_var: torch.Tensor) -> torch.Tensor:
    """WIFV: score_i = var(X_i) * ||W_down[:, i]||^2, (n,), float64."""
    w = w_down.to(torch.float64)  # (m, n)
    return act_var.to(w) * (w * w).sum(0)


@dataclass
class FlapSolver:
    """Keep the channels with the largest WIFV score; compensate the removed ones' mean output
    with the down-projection bias."""

    name: ClassVar[str] = "flap"
    needs_gram: ClassVar[bool] = False
    needs_inputs: ClassVar[bool] = False
    bias: bool = True  # bias compensation (FLAP's default); False: scores only

    @property
    def adds_down_bias(self) -> bool:
        """The compensation lands in the down projection's bias (api.prune checks that the
        family can save one)."""
        return self.bias

    def solve(self, problem: LayerProblem, n_keep: int) -> Decision:
        w_down = problem.w_down.to(torch.float64)  # (m, n)
        n = w_down.shape[1]
        stats = problem.stats
        # the choice from the fit windows alone (stats.ActStats.fit); the compensation, a fit,
        # from all windows
        keep = top_k_keep(flap_scores(w_down, stats.fit(gram=False).var), n_keep)
        pruned = complement(keep, n)
        w = w_down[:, keep]  # (m, k)
        b_new = None
        shift = w_down.new_zeros(w_down.shape[0])  # (m,) b_new - b
        if self.bias and pruned.numel() > 0:
            shift = w_down[:, pruned] @ stats.mean.to(w_down)[pruned]  # (m,) W_P mean(X_P)
            b_old = problem.b_down
            b_new = shift if b_old is None else b_old.to(w_down) + shift
        info = {}
        if stats.gram is not None:  # in-sample error, when the pipeline has the Gram
            info["rel_error"] = _rel_error_with_shift(w_down, w, keep, shift, stats)
        return Decision(keep=keep, w_down=w, b_down=b_new, info=info)


def _rel_error_with_shift(
    w0: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, shift: torch.Tensor, stats: ActStats
) -> float:
    """||(W X + shift) - W0 X||^2 / ||W0 X||^2 over the calibration tokens, from the sums.

    With D = W_full - W0: sum_t ||D x_t + shift||^2 = tr(D H D^T) + 2 shift^T D sum_t x_t
    + p ||shift||^2.
    """
    h = stats.gram
    assert h is not None
    w_full = scatter_columns(w, keep, w0.shape[1])  # (m, n)
    d = w_full - w0  # (m, n)
    denom = float(((w0 @ h) * w0).sum())
    if denom <= 0:
        return 0.0
    num = float(((d @ h) * d).sum())
    num += 2 * float(shift @ (d @ stats.sum.to(d))) + stats.count * float(shift @ shift)
    return max(num, 0.0) / denom
