"""Greedy structured OBS (ZipLM, Kurtic et al. 2023; SlimGPT, Ling et al. 2024).

Optimal Brain Surgeon applied to whole columns of the down projection: with Hinv the inverse of
the (damped) Gram matrix H, removing column i from the current weights W and compensating the
others optimally costs

    dE_i = 1/2 ||W[:, i]||^2 / Hinv_ii                                    (OBS saliency)

and the compensation and the inverse of H restricted to the remaining columns are

    W    <- W    - W[:, i] Hinv[i, :] / Hinv_ii                           (OBS update)
    Hinv <- Hinv - Hinv[:, i] Hinv[i, :] / Hinv_ii                        (Schur downdate)

ZipLM removes the column with the smallest dE_i, updates, and repeats. Each dE_i is the exact
increase of the best-refit error `refit.mask_error` (section 2 of SPAP_METHOD.md), so this is
the greedy algorithm for that objective, and after the last step W equals the exact refit
`refit_down(W0, H, keep)` up to round-off. We return the shared refit (`refit.RefitOptions`:
by default, as published, the exact refit, computed afresh rather than accumulated over
thousands of updates; `refit=ridge` for the refit toward the dense weights with a held-out
strength) and report the gap between the OBS weights and the exact refit in `info`.

Why the bookkeeping: done literally, every step is two rank-1 updates of an (n x n) and an
(m x n) matrix, which are memory-bound: about two minutes for n = 4864 at 50% on two CPU cores.
Here the factors u = Hinv[:, i] / sqrt(Hinv_ii) and a = W[:, i] / sqrt(Hinv_ii) of each step
are buffered, so Hinv = Hinv_f - U U^T and W = W_f - A U^T, and only what the next choice needs
is kept current: the diagonal of Hinv and the column norms of W, by the exact identities

    diag(Hinv) <- diag(Hinv) - u^2
    ||W[:, j]||^2 <- ||W[:, j]||^2 - 2 u_j (a . W[:, j]) + u_j^2 ||a||^2.

Every `buffer` steps the factors are applied as one matrix product (BLAS-3) and the matrices
are shrunk to the remaining columns. The choices are those of the literal algorithm (tested
against it); a step then costs one pass over W (m x r) and over the buffer.

`block` > 1 removes the `block` columns with the smallest saliency at once, with their joint
compensation (a rank-`block` update through the Cholesky factor of Hinv[B, B]): fewer, larger
steps, in the spirit of SlimGPT's batched greedy pruning; block = 1 is exact greedy.

The downdated inverse must stay positive definite: a pivot Hinv_ii <= 0, or a block Hinv[B, B]
without a Cholesky factor, would give NaN saliencies and an arbitrary choice. Every step
records whether its pivot was valid (on the device, no host sync); the flush, which syncs
anyway, raises `SolveError` if one was not, and the solver then starts again with ten times
the damping (recorded in the layer's record), up to DAMP_RETRIES times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Decision, LayerProblem
from .refit import (
    NOT_DEFINITE_FIX,
    NOT_FINITE_FIX,
    RefitOptions,
    SolveError,
    damp,
    note_retry,
    refit_down,
    relative_error,
    scatter_columns,
    spd_inverse,
)
from .weighting import OutputWeighting

#: how many times the obs search starts again with ten times the damping after its inverse
#: Gram lost positive definiteness
DAMP_RETRIES = 3
#: the damping of the first retry when the configured damping is zero
MIN_RETRY_DAMP = 1e-3


def greedy_obs(
    w0: torch.Tensor, hinv: torch.Tensor, n_remove: int, block: int = 1, buffer: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remove `n_remove` columns of w0 (m, n) greedily by OBS saliency under inverse Gram hinv.

    Returns (order, keep, w): the removed channels in removal order (n_remove,), the kept
    channels sorted (n - n_remove,), and the OBS-compensated kept weights (m, n - n_remove).
    Columns removed in the same block appear in order of increasing saliency. Raises
    SolveError when a pivot of the downdated inverse is not positive (or not finite).
    """
    if block < 1 or buffer < 1:
        raise ValueError(f"block and buffer must be >= 1, got block={block}, buffer={buffer}")
    m, n = w0.shape
    if not 0 <= n_remove <= n:
        raise ValueError(f"cannot remove {n_remove} of {n} columns")
    dev, dt = w0.device, w0.dtype
    # Picking a column and shrinking read contiguous memory where it matters, and Hinv lives in
    # one of two preallocated stores: re-allocating n x n matrices at every shrink costs more
    # on a CPU than the arithmetic.
    store = torch.empty(n * n, dtype=dt, device=dev)
    spare: torch.Tensor | None = None
    hf = store.view(n, n).copy_(hinv)  # (r, r) Hinv with the applied updates, r live columns
    wf = w0.clone()  # (m, r) W with the applied updates
    idx = torch.arange(n, device=dev)  # original channel of each live position
    cap = buffer + block
    u_buf = torch.empty(n, cap, dtype=dt, device=dev)  # pending: Hinv = hf - U U^T
    a_buf = torch.empty(cap, m, dtype=dt, device=dev)  # pending: W = wf - A^T U^T
    n_buf = 0
    diag = torch.diagonal(hf).clone()  # (r,) diag of the current Hinv
    colsq = (wf * wf).sum(0)  # (r,) squared column norms of the current W
    gone = torch.zeros(n, dtype=torch.bool, device=dev)  # removed since the last flush
    inf = torch.tensor(float("inf"), dtype=dt, device=dev)
    bad = torch.zeros((), dtype=torch.bool, device=dev)  # a step had no valid pivot
    nan = torch.zeros((), dtype=torch.bool, device=dev)  # a step chose a NaN or inf saliency
    order: list[torch.Tensor] = []
    removed = 0
    while removed < n_remove:
        b = min(block, n_remove - removed)
        saliency = torch.where(gone, inf, colsq / diag)  # 2 dE_i, the OBS saliency
        if b == 1:
            sel = torch.argmin(saliency).reshape(1)
        else:
            sel = torch.topk(saliency, b, largest=False, sorted=True).indices
        r = idx.numel()
        ub, ab = u_buf[:r, :n_buf], a_buf[:n_buf]  # (r, l), (l, m)
        u_sel = ub.index_select(0, sel)  # (b, l)
        w_rows = wf.index_select(1, sel).T - u_sel @ ab  # (b, m) current W[:, B]^T
        # one pass over the pending factors for both corrections (U U^T and U A W[:, B])
        corr = ub @ torch.cat([u_sel.T, ab @ w_rows.T], 1)  # (r, 2b)
        h_rows = hf.index_select(0, sel) - corr[:, :b].T  # (b, r) current Hinv[B, :]
        g_rows = w_rows @ wf - corr[:, b:].T  # (b, r) W[:, B]^T W, current W
        # Hinv[B, B] = L L^T. Schur downdate: Hinv[:, B] Hinv[B, B]^-1 Hinv[B, :] = u u^T with
        # u = Hinv[:, B] L^-T; OBS update: W[:, B] Hinv[B, B]^-1 Hinv[B, :] = a u^T with
        # a = W[:, B] L^-T (b = 1: L = sqrt(Hinv_ii)).
        nan |= ~torch.isfinite(saliency[sel]).all()
        if b == 1:
            piv = h_rows[:, sel]  # (1, 1) Hinv_ii
            bad |= ~(piv > 0).all()
            s = piv.sqrt()
            ut, at, gt = h_rows / s, w_rows / s, g_rows / s  # (1, r), (1, m), (1, r)
        else:
            chol, info = torch.linalg.cholesky_ex(h_rows[:, sel])  # (b, b); _ex: no host sync
            bad |= info != 0
            ut = torch.linalg.solve_triangular(chol, h_rows, upper=False)  # (b, r)
            at = torch.linalg.solve_triangular(chol, w_rows, upper=False)  # (b, m)
            gt = torch.linalg.solve_triangular(chol, g_rows, upper=False)  # (b, r) a^T W
        u = ut.T  # (r, b)
        # ||W[:, j] - a u_j||^2 = ||W[:, j]||^2 - 2 u_j . (a^T W[:, j]) + u_j a^T a u_j
        colsq = colsq - 2 * (ut * gt).sum(0) + ((u @ (at @ at.T)) * u).sum(1)
        diag = diag - (ut * ut).sum(0)
        gone[sel] = True
        order.append(idx[sel])
        u_buf[:r, n_buf : n_buf + b] = u
        a_buf[n_buf : n_buf + b] = at
        n_buf += b
        removed += b
        if n_buf >= buffer or removed == n_remove:
            if bool(bad | nan):  # (the nonzero below syncs with the host anyway)
                if bool(nan) and not bool(torch.isfinite(w0).all() & torch.isfinite(hinv).all()):
                    raise SolveError(f"the OBS search's weights or inverse Gram hold NaN or "
                                     f"inf; {NOT_FINITE_FIX}")
                raise SolveError(f"the OBS search's inverse Gram lost positive definiteness "
                                 f"after removing up to {removed} of {n_remove} columns; "
                                 f"{NOT_DEFINITE_FIX}")
            # apply the pending updates to the live columns only, and shrink to them
            live = torch.nonzero(~gone).flatten()
            k = live.numel()
            ul, al = u_buf[:r, :n_buf].index_select(0, live), a_buf[:n_buf]  # (k, l), (l, m)
            if spare is None:
                spare = torch.empty(n * n, dtype=dt, device=dev)
            rows = torch.index_select(hf, 0, live, out=spare[: k * r].view(k, r))
            hf = torch.index_select(rows, 1, live, out=store[: k * k].view(k, k))
            hf.addmm_(ul, ul.T, alpha=-1)  # (k, k)
            wf = wf.index_select(1, live).addmm_(al.T, ul.T, alpha=-1)  # (m, k)
            idx = idx[live]
            diag = torch.diagonal(hf).clone()  # exact again: no drift between flushes
            colsq = (wf * wf).sum(0)
            gone = torch.zeros(k, dtype=torch.bool, device=dev)
            n_buf = 0
    order_t = torch.cat(order) if order else torch.empty(0, dtype=torch.long, device=dev)
    return order_t, idx, wf


@dataclass
class ObsSolver(RefitOptions, OutputWeighting):
    """Greedy structured OBS choice, then the shared refit of the down projection (exact least
    squares by default, as published)."""

    name: ClassVar[str] = "obs"
    needs_gram: ClassVar[bool] = True
    needs_inputs: ClassVar[bool] = False

    block: int = 1  # columns removed per OBS step; 1 = exact greedy
    buffer: int = 128  # OBS steps between applications of the pending updates (speed only)
    # dtype of the greedy search and the refit (float64 weights are returned); float32 chose
    # the same masks as float64 on real Qwen layers, at half the time on a CPU
    solve_dtype: str = "float32"

    def solve(self, problem: LayerProblem, n_keep: int) -> Decision:
        if problem.stats.gram is None:
            raise ValueError("the obs solver needs the Gram matrix (stats.gram is None)")
        self.check_refit()
        self.check_out_weight(problem)
        if self.solve_dtype not in ("float32", "float64"):
            raise ValueError(f"solve_dtype must be float32 or float64, got {self.solve_dtype!r}")
        w64 = problem.w_down.to(torch.float64)
        n = w64.shape[1]
        if n_keep == n:
            keep = torch.arange(n, device=w64.device)
            return Decision(keep=keep, w_down=w64, info={"rel_error": 0.0, "obs_refit_gap": 0.0})
        w0 = w64.to(getattr(torch, self.solve_dtype))  # (m, n)
        # the decision sees the fit windows only (stats.ActStats.fit)
        fit_gram = problem.stats.fit(dtype=w0.dtype).gram  # (n, n)
        if not (bool(torch.isfinite(w0).all()) and bool(torch.isfinite(fit_gram).all())):
            raise SolveError(f"the down projection or its Gram holds NaN or inf; "
                             f"{NOT_FINITE_FIX}")
        r = self.out_root(problem, w0)  # None, or R of the weighted decision (weighting.py)
        w_dec = w0 if r is None else r @ w0
        delta = self.damp
        for retry in range(DAMP_RETRIES + 1):
            h_fit = damp(fit_gram, delta)  # (n, n)
            try:
                _, keep, w_obs = greedy_obs(w_dec, spd_inverse(h_fit), n - n_keep, self.block,
                                            self.buffer)
                break
            except SolveError:
                if retry == DAMP_RETRIES:
                    raise SolveError(f"the OBS search's inverse Gram is not positive definite "
                                     f"even with damp={delta:g}; solve in float64 (--option "
                                     "solve_dtype=float64)") from None
                delta = max(10 * delta, MIN_RETRY_DAMP)
                note_retry({"n": n, "obs_damp": delta})
        del fit_gram
        # what the OBS weights should equal: the exact refit on the Gram the decision saw,
        # seen as it saw it (the refit is linear in w0's rows, so R's refit is R times it)
        want = refit_down(w0, h_fit, keep)  # (m, k)
        want = want if r is None else r @ want
        del h_fit
        scale = float(want.abs().max()) if want.numel() else 0.0
        gap = float((w_obs - want).abs().max()) / scale if scale > 0 else 0.0
        h = damp(problem.stats.gram.to(w0), self.damp)  # (n, n), all windows: the final refit
        w_exact = refit_down(w0, h, keep)  # (m, k)
        w, info = (w_exact, {"refit": "exact"}) if self.refit == "exact" else \
            self.refit_kept(w0, problem.stats, keep, h)
        w = w.to(torch.float64)
        info.update(
            rel_error=relative_error(w64, scatter_columns(w, keep, n), problem.stats.gram),
            obs_refit_gap=gap,
        )
        return Decision(keep=keep, w_down=w, info=info)
