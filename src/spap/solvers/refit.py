"""Closed forms shared by all solvers and used by the tests as oracles (SPAP_METHOD.md section 2).

Notation: W0 (m x n) dense down projection, H = X X^T (n x n) Gram of its input, K kept and
P pruned channel sets, Hinv = H^-1.

- best weights for a fixed mask:  W_P = 0,  W_K = W0 H[:, K] H[K, K]^-1
- error of that mask:             1/2 tr( W0[:, P] (Hinv[P, P])^-1 W0[:, P]^T )
- error of any W:                 1/2 tr( (W - W0) H (W - W0)^T )

`RefitOptions` is the one least-squares refit of the kept down projection that every method
which refits (obs, fasp, spap) shares, as the option `refit`:
- `exact`: damped least squares, W_K = W0 H[:, K] (H[K, K] + damp * mean(diag H) I)^-1;
- `ridge`: least squares shrunk toward the dense weights (`refit_toward_dense`), its strength
  chosen per layer on the held-out calibration windows (`heldout_errors_toward_dense`: fit on
  the other windows, scored on the held-out ones), then refit on all windows.
So a comparison gives every method the same refit, and `obs:refit=ridge` is the baseline at
full strength.

Its target, the option `refit_target`, is shared the same way:
- `layer` (default): the dense down projection's output on the same inputs, W0 x;
- `drift`: W0 x + alpha D, where D is the drift the layer inherits (`stats.DriftStats`: the
  dense model's hidden state after the layer minus the layer's output on the pruned inputs),
  so the kept channels may also repair part of the residual stream's error. alpha is chosen
  per layer from `drift_grid`, jointly with the ridge, on the held-out windows, by the error
  of the layer's output hidden state against the dense model's
  (`heldout_drift_errors`); alpha = 0 is the layer target, so the choice never ends with a
  larger held-out output error than the layer target's at the same ridge.

Every solve here goes through one Cholesky factorization (`cholesky`): a matrix that should be
positive definite but is not (a rank-deficient Gram without damping, round-off in float32) is
retried with more damping, which `damping_log` collects for the layer's record; a matrix that
holds NaN or inf, or one that no damping tried repairs, raises `SolveError`, which the driver
turns into a one-line error naming the layer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

#: extra damping tried, in turn, when a Cholesky factorization fails: this times the mean
#: absolute diagonal of the matrix is added to its diagonal
EXTRA_DAMPING = (1e-6, 1e-4, 1e-2)

#: the fixes a SolveError names
NOT_FINITE_FIX = ("the model's weights or its activations on the calibration text are not "
                  "finite: check the checkpoint, or load it with --dtype float32")
NOT_DEFINITE_FIX = "use more damping (--option damp=0.1)"


class SolveError(ArithmeticError):
    """A solve's matrix holds NaN or inf, or is not positive definite even with the extra
    damping of EXTRA_DAMPING; the message says which and names the fix (the driver adds the
    layer)."""


# The retries of the solves below, for the layer's record. A context variable rather than an
# argument: the solves sit deep inside every method (and its recovery), and a list passed down
# through each of them would change every solver's signature for a rare event.
_RETRIES: ContextVar[list[dict] | None] = ContextVar("spap_damping_retries", default=None)


@contextmanager
def damping_log() -> Iterator[list[dict]]:
    """Collect every extra damping that the solves inside the block add: one entry per retried
    factorization ({"n": its size, "extra_damp": the relative damping that worked, ...})."""
    token = _RETRIES.set([])
    try:
        yield _RETRIES.get()
    finally:
        _RETRIES.reset(token)


def note_retry(entry: dict) -> None:
    """Record a retry with more damping (for the layer's record) and log it."""
    log.warning("a solve was not positive definite; retried with more damping: %s", entry)
    retries = _RETRIES.get()
    if retries is not None:
        retries.append(entry)


def cholesky(a: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of symmetric positive definite `a` (n, n), with more damping
    if the factorization fails (`note_retry`); SolveError if `a` holds NaN or inf, or stays
    indefinite with the largest extra damping."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return chol
    n = a.shape[-1]
    if not bool(torch.isfinite(a).all()):
        raise SolveError(f"a {n} x {n} solve holds NaN or inf; {NOT_FINITE_FIX}")
    scale = torch.diagonal(a).abs().mean()
    if scale <= 0:
        scale = torch.ones((), dtype=a.dtype, device=a.device)
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    for extra in EXTRA_DAMPING:
        chol, info = torch.linalg.cholesky_ex(a + extra * scale * eye)
        if int(info) == 0:
            note_retry({"n": n, "extra_damp": extra})
            return chol
    raise SolveError(f"a {n} x {n} solve is not positive definite even with "
                     f"{EXTRA_DAMPING[-1]:g} x its mean diagonal added; {NOT_DEFINITE_FIX}")

REFITS = ("exact", "ridge")
REFIT_TARGETS = ("layer", "drift")


def damp(h: torch.Tensor, delta: float) -> torch.Tensor:
    """H + delta * mean(diag H) * I: keeps H positive definite when channels are dead."""
    mean_diag = torch.diagonal(h).mean()
    if mean_diag <= 0:
        mean_diag = torch.ones((), dtype=h.dtype, device=h.device)
    return _shifted(h, delta * mean_diag)


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a x = b for symmetric positive definite a, by Cholesky (never forming a^-1)."""
    return torch.cholesky_solve(b, cholesky(a))


def spd_inverse(a: torch.Tensor) -> torch.Tensor:
    """a^-1 for symmetric positive definite a, by Cholesky."""
    return torch.cholesky_inverse(cholesky(a))


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


def solve_toward(gram_kk: torch.Tensor, cross: torch.Tensor, anchor: torch.Tensor,
                 lam: float) -> torch.Tensor:
    """argmin_W 1/2 sum_t ||W x_t - y_t||^2 + mu/2 ||W - anchor||^2, mu = lam * mean(diag G):
    W = (C^T + mu anchor) (G + mu I)^-1 with G = sum x x^T (k, k), C = sum x y^T (k, m),
    anchor (m, k). The one ridge solve of the refit toward the dense weights, from the Gram
    (`refit_toward_dense`) or from explicit activations (the recovery's down step)."""
    mu = lam * float(torch.diagonal(gram_kk).mean())
    return spd_solve(_shifted(gram_kk, mu), cross + mu * anchor.T).T  # (m, k)


def _shifted(a: torch.Tensor, mu: float | torch.Tensor) -> torch.Tensor:
    """a + mu I as one new matrix (no identity and no multiple of it: two k x k fewer), the
    same numbers as forming them."""
    out = a.clone()
    out.diagonal().add_(mu)
    return out


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
    return solve_toward(h[keep][:, keep], h[keep] @ w0.T, w0[:, keep], lam)  # (m, k)


class _HeldoutBlocks:
    """The pieces of a held-out refit choice that do not depend on lam: the kept and pruned
    blocks of W0, the fit Gram's kept block and right-hand side H_fit[K, :] W0^T, and the
    held-out Gram's parts of tr(dW Hv dW^T) for dW = [W_K - W0_K | -W0_P]."""

    def __init__(self, w0, h_fit, h_val, keep):
        self.pruned = complement(keep, w0.shape[1])
        self.w_k, self.w_p = w0[:, keep], w0[:, self.pruned]  # (m, k), (m, |P|)
        self.hf_kk = h_fit[keep][:, keep]  # (k, k)
        self.rhs0 = h_fit[keep] @ w0.T  # (k, m)
        hv_k = h_val[keep]  # (k, n)
        self.hv_kk = hv_k[:, keep]  # (k, k)
        self.cross = hv_k[:, self.pruned] @ self.w_p.T  # (k, m) = Hv_KP W0_P^T
        self.const = float(((h_val[self.pruned][:, self.pruned] @ self.w_p.T)
                            * self.w_p.T).sum())  # tr(W0_P Hv_PP W0_P^T)
        self.mean_diag = float(torch.diagonal(self.hf_kk).mean())

    def solve(self, lam, extra=None):
        """(Hf_KK + mu I)^-1 applied to [rhs0 + mu W0_K^T | extra] (k, m [+ extra's])."""
        rhs = self.rhs0 + lam * self.mean_diag * self.w_k.T
        if extra is not None:
            rhs = torch.cat([rhs, extra], 1)
        return spd_solve(_shifted(self.hf_kk, lam * self.mean_diag), rhs)

    def weight_error(self, dk):
        """tr(dW Hv dW^T) for dW = [dk | -W0_P]."""
        return (float(((dk @ self.hv_kk) * dk).sum()) - 2 * float((dk * self.cross.T).sum())
                + self.const)


def heldout_errors_toward_dense(w0, h_fit, h_val, keep, grid, search="walk"):
    """Relative errors on the held-out Gram h_val of refit_toward_dense(w0, h_fit, keep, lam),
    i.e. relative_error(w0, W_lam, h_val), for lam in `grid`: {lam: error}.

    search="all" evaluates every grid point. search="walk" (default) starts at the middle of
    the sorted grid and walks downhill to a local minimum, evaluating 3 to 4 points on a
    typical layer: the held-out error is U-shaped in lam (overfit at small lam, the unchanged
    dense weights at large lam), so the local minimum is the grid's minimum.

    Shared work is done once: the right-hand side H_fit[K, :] W0^T, and the parts of
    tr(dW Hv dW^T) that do not depend on lam. With dW = [W_K - W0_K | -W0_P],

        tr(dW Hv dW^T) = tr(D Hv_KK D^T) - 2 tr(D Hv_KP W0_P^T) + tr(W0_P Hv_PP W0_P^T),

    D = W_K - W0_K, so each lam costs one k x k solve and one (m, k) x (k, k) product.
    """
    b = _HeldoutBlocks(w0, h_fit, h_val, keep)
    # tr(W0 Hv W0^T) from the blocks already formed: K rows of Hv, and Hv_PP
    denom = float(((b.hv_kk @ b.w_k.T + 2 * b.cross) * b.w_k.T).sum()) + b.const

    def error(lam):
        dk = b.solve(lam).T - b.w_k  # (m, k)
        return max(b.weight_error(dk), 0.0) / denom if denom > 0 else 0.0

    return walk_grid(grid, error, search)


def walk_grid(grid, error, search: str = "walk") -> dict:
    """{lam: error(lam)} at the grid points `search` visits: "all" of them, or ("walk") from
    the middle of the sorted grid downhill to a local minimum, which for the U-shaped held-out
    error of a ridge (overfit at small lam, the dense weights at large lam) is the minimum."""
    grid = sorted(set(grid))
    if search == "all" or len(grid) < 3:
        return {lam: error(lam) for lam in grid}
    if search != "walk":
        raise ValueError(f"unknown ridge search '{search}'; use walk or all")
    out = {}

    def at(i):
        if grid[i] not in out:
            out[grid[i]] = error(grid[i])
        return out[grid[i]]

    i = len(grid) // 2
    while True:
        here = at(i)
        left = at(i - 1) if i > 0 else float("inf")
        right = at(i + 1) if i + 1 < len(grid) else float("inf")
        if here <= left and here <= right:
            return out
        i = i - 1 if left < right else i + 1


def heldout_drift_errors(w0, h_fit, h_val, c_fit, c_val, dsq_val, keep, grid, alphas,
                         search="walk"):
    """Held-out output-state errors of the drift-target refit: {lam: (alpha, error)}, the
    best alpha of `alphas` at each ridge lam evaluated (walked as in
    `heldout_errors_toward_dense`), and {lam: {alpha: error}} for the record.

    Fit on the fit windows: W(lam, alpha) = A + alpha B with
        A = (W0 Hf[K, :]^T + mu W0_K)(Hf_KK + mu I)^-1,  B = Cf[:, K] (Hf_KK + mu I)^-1,
    where Cf = sum D x^T over the fit windows (one solve with both right-hand sides). With
    dW = [A - W0_K | -W0_P] and dB = [B | 0], the held-out error of the output state is
        E(alpha) = tr(dW Hv dW^T) - 2 tr(dW Cv^T) + |D_v|^2
                   + 2 alpha (tr(dB Hv dW^T) - tr(dB Cv^T)) + alpha^2 tr(dB Hv dB^T),
    a quadratic in alpha, so every alpha costs nothing once lam is solved.
    """
    m = w0.shape[0]
    b = _HeldoutBlocks(w0, h_fit, h_val, keep)
    cf_k = c_fit[:, keep]  # (m, k)
    cv_k, cv_p = c_val[:, keep], c_val[:, b.pruned]  # (m, k), (m, |P|)
    wp_cv = float((b.w_p * cv_p).sum())  # tr(W0_P Cv_P^T)
    table: dict[float, dict[float, float]] = {}

    def error(lam):
        sol = b.solve(lam, cf_k.T)  # (k, 2m)
        a, bb = sol[:, :m].T, sol[:, m:].T  # (m, k) each
        dk = a - b.w_k
        bh = bb @ b.hv_kk  # (m, k)
        e0 = b.weight_error(dk) - 2 * (float((dk * cv_k).sum()) - wp_cv) + dsq_val
        e1 = float((bh * dk).sum()) - float((bb * b.cross.T).sum()) - float((bb * cv_k).sum())
        e2 = float((bh * bb).sum())
        table[lam] = {al: max(e0 + 2 * al * e1 + al * al * e2, 0.0) for al in alphas}
        return min(table[lam].values())

    walk_grid(grid, error, search)
    best = {lam: min(errs.items(), key=lambda kv: (kv[1], kv[0])) for lam, errs in table.items()}
    return best, table


@dataclass
class RefitOptions:
    """The shared refit, as dataclass fields every refitting solver inherits (so they are its
    options, recorded in every report). Subclasses may change the defaults."""

    refit: str = "exact"  # "exact" (damped least squares) or "ridge" (toward dense, held out)
    damp: float = 0.01  # delta in H + delta * mean(diag H) * I (exact refit and decisions)
    # ridge strengths (relative to mean diag H_KK) tried on the held-out windows
    ridge_grid: str = "0.003,0.01,0.03,0.1,0.3,1,3,10"
    ridge_search: str = "walk"  # "walk": downhill from the grid's middle; "all": every point
    # used, with a warning, when the calibration has a single window (nothing to hold out)
    ridge_fallback: float = 0.1
    # what the refit reproduces: "layer" (W0 x) or "drift" (W0 x + alpha D, see above)
    refit_target: str = "layer"
    drift_grid: str = "0,0.25,0.5,0.75,1"  # alphas tried on the held-out windows

    @property
    def needs_drift(self) -> bool:
        """The driver collects the layer's drift statistics (`ActStats.drift`)."""
        return self.refit_target == "drift"

    def check_refit(self) -> None:
        if self.refit not in REFITS:
            raise ValueError(f"unknown refit '{self.refit}'; use {' or '.join(REFITS)}")
        if self.refit_target not in REFIT_TARGETS:
            raise ValueError(f"unknown refit_target '{self.refit_target}'; use "
                             f"{' or '.join(REFIT_TARGETS)}")
        if self.refit_target == "drift":
            if self.refit != "ridge":
                raise ValueError("refit_target=drift needs refit=ridge: the held-out windows "
                                 "that choose the ridge also choose alpha")
            if not self.drift_alphas():
                raise ValueError("refit_target=drift needs a non-empty drift_grid")

    def drift_alphas(self) -> list[float]:
        return [float(x) for x in str(self.drift_grid).split(",") if x.strip()]

    def refit_kept(self, w0: torch.Tensor, stats, keep: torch.Tensor,
                   h_damped: torch.Tensor | None = None,
                   gram: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The kept down projection (m, k) in w0's dtype, and what was chosen (for `info`).

        `stats` is the layer's ActStats (gram and gram_heldout); `h_damped`, when the caller
        has already formed the damped Gram in w0's dtype, saves forming it again, and `gram`,
        the undamped one in w0's dtype, saves a copy of that (n x n each)."""
        self.check_refit()
        h = gram if gram is not None else stats.gram.to(w0.dtype)
        if self.refit == "exact":
            hd = h_damped if h_damped is not None else damp(h, self.damp)
            return refit_down(w0, hd, keep), {"refit": "exact"}
        grid = [float(x) for x in str(self.ridge_grid).split(",") if x.strip()]
        if not grid:
            raise ValueError("refit=ridge needs a non-empty ridge_grid")
        if stats.gram_heldout is None:
            lam = self.ridge_fallback
            log.warning("a single calibration window: nothing to hold out, so the ridge of "
                        "the refit is not chosen on data (ridge_fallback=%g); use "
                        "--nsamples 2 or more", lam)
            return refit_toward_dense(w0, h, keep, lam), {
                "refit": "ridge", "ridge": lam, "ridge_chosen_on": "none (one window)"}
        h_val = stats.gram_heldout.to(w0.dtype)
        if self.refit_target == "drift":
            return self._refit_drift(w0, h, h_val, stats.drift, keep, grid)
        errs = heldout_errors_toward_dense(w0, h - h_val, h_val, keep, grid, self.ridge_search)
        lam = min(errs, key=errs.get)
        return refit_toward_dense(w0, h, keep, lam), {
            "refit": "ridge", "ridge": lam, "ridge_chosen_on": "held-out windows",
            "ridge_heldout_rel_error": {str(k): v for k, v in errs.items()},
        }

    def _refit_drift(self, w0, h, h_val, drift, keep, grid) -> tuple[torch.Tensor, dict]:
        """The drift target's refit: (lam, alpha) chosen on the held-out windows, then the
        refit on all windows toward W0 x + alpha D."""
        if drift is None or drift.cross_heldout is None:
            raise RuntimeError("refit_target=drift needs the drift statistics of fit and "
                               "held-out windows; the driver did not collect them")
        c = drift.cross.to(w0.dtype)  # (m, n)
        c_val = drift.cross_heldout.to(w0.dtype)
        best, table = heldout_drift_errors(w0, h - h_val, h_val, c - c_val, c_val,
                                           drift.sq_heldout, keep, grid, self.drift_alphas(),
                                           self.ridge_search)
        lam = min(best, key=lambda k: best[k][1])
        alpha, err = best[lam]
        scale = drift.out_sq_heldout or 1.0
        rhs = h[keep] @ w0.T + alpha * c[:, keep].T  # (k, m): sum x (W0 x + alpha D)^T
        w = solve_toward(h[keep][:, keep], rhs, w0[:, keep], lam)
        return w, {
            "refit": "ridge", "refit_target": "drift", "ridge": lam, "drift_alpha": alpha,
            "ridge_chosen_on": "held-out windows",
            # relative error of the layer's output hidden state against the dense model's
            "output_error_heldout": err / scale,
            "output_error_heldout_alpha0": (table[lam][0.0] / scale if 0.0 in table[lam]
                                            else None),
            "drift_heldout": drift.sq_heldout / scale,
        }
