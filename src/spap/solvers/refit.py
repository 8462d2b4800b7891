"""Closed forms shared by all solvers and used by the tests as oracles (SPAP_METHOD.md section 2).

Notation: W0 (m x n) dense down projection, H = X X^T (n x n) Gram of its input, K kept and
P pruned channel sets, Hinv = H^-1.

- best weights for a fixed mask:  W_P = 0,  W_K = W0 H[:, K] H[K, K]^-1
- error of that mask:             1/2 tr( W0[:, P] (Hinv[P, P])^-1 W0[:, P]^T )
- error of any W:                 1/2 tr( (W - W0) H (W - W0)^T )
"""

from __future__ import annotations

import torch


def damp(h: torch.Tensor, delta: float) -> torch.Tensor:
    """H + delta * mean(diag H) * I: keeps H positive definite when channels are dead."""
    mean_diag = torch.diagonal(h).mean()
    if mean_diag <= 0:
        mean_diag = torch.ones((), dtype=h.dtype, device=h.device)
    return h + delta * mean_diag * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a x = b for symmetric positive definite a, by Cholesky (never forming a^-1)."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        return torch.linalg.solve(a, b)
    return torch.cholesky_solve(b, chol)


def spd_inverse(a: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        return torch.linalg.inv(a)
    return torch.cholesky_inverse(chol)


def complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool, device=keep.device)
    mask[keep] = False
    return torch.nonzero(mask).flatten()


def refit_down(w0: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """W_K = W0 H[:, K] H[K, K]^-1, the exact least-squares down projection for mask K. (m, k)."""
    if keep.numel() == 0:
        return w0.new_zeros(w0.shape[0], 0)
    h_kk = h[keep][:, keep]  # (k, k)
    rhs = h[keep] @ w0.T  # (k, m) = H[K, :] W0^T
    return spd_solve(h_kk, rhs).T  # (m, k)


def mask_error(w0: torch.Tensor, hinv: torch.Tensor, pruned: torch.Tensor) -> float:
    """1/2 tr(W0[:, P] (Hinv[P, P])^-1 W0[:, P]^T): the error of the best refit for mask P."""
    if pruned.numel() == 0:
        return 0.0
    w_p = w0[:, pruned]  # (m, |P|)
    a = hinv[pruned][:, pruned]  # (|P|, |P|)
    return 0.5 * float((w_p * spd_solve(a, w_p.T).T).sum())


def weight_error(w0: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    """1/2 tr((W - W0) H (W - W0)^T) for a full-width W (zeros at pruned channels)."""
    dw = w - w0  # (m, n)
    return 0.5 * float(((dw @ h) * dw).sum())


def scatter_columns(w_kept: torch.Tensor, keep: torch.Tensor, n: int) -> torch.Tensor:
    """Full-width (m, n) matrix with w_kept's columns at `keep` and zeros elsewhere."""
    full = w_kept.new_zeros(w_kept.shape[0], n)
    full[:, keep] = w_kept
    return full


def relative_error(w0: torch.Tensor, w_full: torch.Tensor, h: torch.Tensor) -> float:
    """||W X - W0 X||^2 / ||W0 X||^2 computed from the Gram matrix."""
    denom = 0.5 * float(((w0 @ h) * w0).sum())
    return weight_error(w0, w_full, h) / denom if denom > 0 else 0.0


def refit_toward_dense(
    w0: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, lam: float
) -> torch.Tensor:
    """Least-squares refit regularized toward the dense weights of the kept channels:

        argmin_{W_K} 1/2 ||W_K X_K - W0 X||^2 + lam * mean(diag H_KK) / 2 * ||W_K - W0[:, K]||^2
        W_K = (W0 H[:, K] + mu W0[:, K]) (H[K, K] + mu I)^-1,   mu = lam * mean(diag H_KK)

    lam = 0 is the exact refit; lam -> inf keeps the dense weights (no update). With a few
    thousand calibration tokens the exact refit overfits them; shrinking toward W0 (a solution
    that was never fit to them) rather than toward zero (plain damping) generalizes better.
    """
    if keep.numel() == 0:
        return w0.new_zeros(w0.shape[0], 0)
    h_kk = h[keep][:, keep]  # (k, k)
    mu = lam * float(torch.diagonal(h_kk).mean())
    eye = torch.eye(keep.numel(), dtype=h.dtype, device=h.device)
    rhs = h[keep] @ w0.T + mu * w0[:, keep].T  # (k, m)
    return spd_solve(h_kk + mu * eye, rhs).T  # (m, k)
