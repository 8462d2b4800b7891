"""FASP: a Wanda-style channel score, then the exact least-squares refit of the down projection.

FASP (Hu et al. 2025, arXiv 2501.09412, the predecessor of SPAP) decides which channels to
remove with a Wanda-like score and then restores the layer by re-solving the down projection's
kept columns in closed form. It is the natural control for SPAP: the same restoration with a
one-shot decision, so the difference measures what the penalty method's decision adds.

Score: the structured Wanda score of `wanda_sp` (sum_j |W_down[j, i]| * ||X_i||_2). The exact
aggregation over a channel's weights in FASP's metric could not be checked against its text or
code from here; this is the "Wanda-style score" that SPAP_METHOD.md names, and the same score as
our wanda-sp baseline, so fasp and wanda-sp differ only by the refit.

Restoration: the shared refit (`refit.RefitOptions`). As published, `refit=exact`:
W_K = W0 H[:, K] H[K, K]^-1 with the damped Gram matrix (SPAP_METHOD.md section 2), i.e. least
squares of the kept activations against the dense output Y = W0 X; `refit=ridge` shrinks it
toward the dense weights with a strength chosen on held-out windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Decision, LayerProblem, top_k_keep
from .refit import RefitOptions, relative_error, scatter_columns
from .wanda_sp import wanda_sp_scores
from .weighting import OutputWeighting


@dataclass
class FaspSolver(RefitOptions, OutputWeighting):
    """Wanda-style choice, the shared refit of the kept down-projection columns."""

    name: ClassVar[str] = "fasp"
    needs_gram: ClassVar[bool] = True
    needs_inputs: ClassVar[bool] = False

    def solve(self, problem: LayerProblem, n_keep: int) -> Decision:
        if problem.stats.gram is None:
            raise ValueError("the fasp solver needs the Gram matrix (stats.gram is None)")
        self.check_out_weight(problem)
        w0 = problem.w_down.to(torch.float64)  # (m, n)
        n = w0.shape[1]
        # (with out_weight=fisher the score reads R W0, weighting.py)
        # (the fit windows' norms: decisions never see the held-out ones, stats.ActStats.fit)
        norm = problem.stats.fit(gram=False).norm
        keep = top_k_keep(wanda_sp_scores(self.decision_rows(w0, problem), norm), n_keep)
        if n_keep == n:  # nothing removed: the dense weights are already the best fit
            return Decision(keep=keep, w_down=w0, info={"rel_error": 0.0})
        w, info = self.refit_kept(w0, problem.stats, keep)  # (m, k)
        info["rel_error"] = relative_error(w0, scatter_columns(w, keep, n), problem.stats.gram)
        return Decision(keep=keep, w_down=w, info=info)
