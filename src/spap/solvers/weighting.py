"""The output weighting of a decision: which output directions of the layer matter.

A decision (obs's greedy mask, fasp's score, spap's decision) measures the error of the down
projection's output, ||(W - W0) X||_F^2, as if every output direction mattered alike. The
model's loss does not: an error along some directions of the residual stream moves the loss
far more than along others. With G = E[g g^T], g the gradient of the calibration loss with
respect to this layer's down-projection output (the empirical Fisher of that output, taken on
the dense model: `driver.sensitivity.output_fisher`), the second-order change of the loss is,
in the Kronecker-factored approximation of K-FAC and LLM-Surgeon (van der Ouderaa et al.,
2023), 1/2 tr(G (W - W0) H (W - W0)^T), with H the Gram matrix of the layer's input.

So `out_weight=fisher` hands the decision R W0 instead of W0, with R = G'^{1/2} for the
normalized, damped G' = G / mean(diag G) + out_weight_damp * I: every decision then ranks
masks by the loss-weighted error. The refit is left as it is, and that is exact, not an
approximation: for a fixed mask, the least-squares weights minimize tr(G E H E^T) for every
positive definite G alike (each row combination of the error is minimized by the same W_K),
and the ridge toward the dense weights keeps that property when its penalty is weighted by
the same G. The layer errors in the reports stay unweighted, so they remain comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OUT_WEIGHTS = ("none", "fisher")


def weight_root(g: torch.Tensor, delta: float) -> torch.Tensor:
    """R = (G / mean(diag G) + delta I)^{1/2} (m, m), symmetric, in g's dtype."""
    g = 0.5 * (g + g.T)
    scale = torch.diagonal(g).mean()
    if not scale > 0:
        raise ValueError("the output weighting is zero: no gradient reached this layer")
    vals, vecs = torch.linalg.eigh(g / scale)
    vals = vals.clamp_min(0) + delta
    return (vecs * vals.sqrt()) @ vecs.T


@dataclass
class OutputWeighting:
    """The decision's output weighting, as options every deciding solver inherits."""

    # "none": every output direction alike (as published); "fisher": weighted by the loss's
    # sensitivity to each direction (module docstring; the driver collects G)
    out_weight: str = "none"
    out_weight_damp: float = 0.01  # delta in G / mean(diag G) + delta I

    @property
    def needs_out_weight(self) -> bool:
        """Whether the decision is weighted."""
        return self.out_weight == "fisher"

    @property
    def needs_fisher(self) -> bool:
        """Whether the solver reads the layer's output Fisher (the driver then collects it);
        a solver that weights more than its decision widens this."""
        return self.needs_out_weight

    def check_out_weight(self, problem) -> None:
        if self.out_weight not in OUT_WEIGHTS:
            raise ValueError(f"unknown out_weight '{self.out_weight}'; use "
                             f"{' or '.join(OUT_WEIGHTS)}")
        if self.needs_fisher and problem.out_weight is None:
            raise ValueError("a Fisher output weighting needs the layer's output Fisher "
                             "(LayerProblem.out_weight), which the driver collects")

    def out_root(self, problem, like: torch.Tensor) -> torch.Tensor | None:
        """R (m, m) in `like`'s dtype and device, or None when the decision is unweighted."""
        if not self.needs_out_weight:
            return None
        return self.fisher_root(problem, like.dtype, like.device)

    def fisher_root(self, problem, dtype, device) -> torch.Tensor:
        """R (m, m) of the layer's output Fisher, whoever uses it (the decision, recovery)."""
        return weight_root(problem.out_weight.to(device, dtype), self.out_weight_damp)

    def decision_rows(self, w0: torch.Tensor, problem) -> torch.Tensor:
        """What the decision sees in place of w0 (m, n): R w0, or w0 itself."""
        r = self.out_root(problem, w0)
        return w0 if r is None else r @ w0
