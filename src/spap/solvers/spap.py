"""SPAP: penalty-method decisions and alternating-minimization recovery (SPAP_METHOD.md 3-4).

Decision (section 3). The bilinear constraint W diag(s) = 0 becomes a penalty:

    F_rho(W, s) = 1/2 tr((W - W0) H (W - W0)^T) + rho/2 sum_i s_i d_i ||W[:, i]||^2

minimized by alternating a closed-form W-step, W = W0 H (H + rho diag(s d))^-1, and an s-step
over {s in [0,1]^n, 1^T s = lambda}, while rho grows geometrically. Two s-steps are offered:
- "lp": the paper's linear program, whose solution is binary (the lambda smallest
  c_i = d_i ||W[:, i]||^2). Measured on real layers it keeps its first mask (the W-step shrinks
  exactly the penalized columns), so it acts as a one-shot score plus refit.
- "loo" (default): each column's cost is taken with its own penalty lifted,
  c_i = ||W_i||^2 / (B_ii (1 - rho s_i d_i B_ii)) with B = (H + rho diag(s d))^-1 (a
  Sherman-Morrison identity, so it costs one inverse per iteration). The score then says how
  well the *other* columns compensate for column i, which lets the mask move; measured on real
  layers it reaches greedy OBS's error.
- "soft": s_i = min(1, tau / c_i) with tau set so that sum(s) = lambda.
The penalty method is run from one or more starts (the greedy OBS mask by default; also
uniform s and the OBS and Wanda score masks) and the mask with the lowest exact error
(refit.mask_error) among every binary iterate and the binary starts themselves is kept, so
the decision is never worse than its starts with the same refit. On small layers
(n <= swap_max_n) an exact 1- and 2-exchange search polishes it. With a binary s the W-step
needs no new n x n inverse: Woodbury's identity on H^-1 gives it in O(n |P| (|P| + m))
(`penalized_step`).

The refit of the kept down projection is shrunk toward the dense weights, with the strength
chosen per layer on held-out calibration windows (`heldout_errors_toward_dense`); decision
and refit run in `solve_dtype` (float32 by default) and return float64 weights.

Update (section 4). The kept down projection gets the refit above. Then, optionally
(`recovery_rounds`), for gated MLPs X = act(gate(a)) * up(a) is linear in the up projection
for fixed gate activations, so (W_up, W_down) are refit alternately to the dense layer's
output: the up-step by conjugate gradient on its normal equations regularized toward the
dense rows, the down-step by the same refit toward the dense weights (same ridge). A
slice of the calibration windows is held out, and the number of rounds (0..recovery_rounds)
with the lowest held-out error is kept, so recovery cannot overfit the layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Decision, LayerProblem, top_k_keep
from .obs import greedy_obs
from .refit import (
    complement,
    damp,
    mask_error,
    refit_down,
    refit_toward_dense,
    spd_inverse,
    spd_solve,
)


@dataclass
class SpapSolver:
    name: ClassVar[str] = "spap"
    needs_gram: ClassVar[bool] = True

    damp: float = 0.01  # delta in H + delta * mean(diag H) * I
    weights: str = "obs"  # d_i: "obs" = 1 / Hinv_ii (OBS curvature), "diag" = H_ii
    s_step: str = "loo"  # "loo" (leave-one-out costs, LP step), "lp" (the paper's), "soft"
    rho0: float = 0.05  # initial rho, relative to d (so scale-free)
    rho_growth: float = 4.0
    # penalty iterations (rho reaches rho0 * growth^(iters-1)); from the greedy start, more
    # iterations did not lower the exact error on the measured Qwen and SmolLM2 layers
    iters: int = 2
    # comma-separated starting points of s (uniform, obs score, wanda score, greedy OBS mask);
    # the penalty method runs from each and the lowest exact error wins
    # (a uniform start found masks within 0.01% of the greedy start's on SmolLM2 layers at
    # twice the cost, so the default runs from the greedy OBS mask alone)
    starts: str = "greedy"
    # columns per greedy OBS step for the greedy start (1 = exact greedy). 16 raised the exact
    # error of a real Qwen layer's mask by 0.03% and cut the solve 7x on an H200, where
    # exact greedy is ~1500 small kernel launches per layer (bench/results/gpu-check-*.json)
    greedy_block: int = 16
    # refit shrunk toward the dense weights, strength (relative to mean diag H_KK) chosen per
    # layer on held-out windows from this grid; "" = the exact refit with damping `damp`
    ridge_grid: str = "0.003,0.01,0.03,0.1,0.3,1,3,10"
    ridge_search: str = "walk"  # "walk": downhill from the grid's middle; "all": every point
    ridge_fallback: float = 0.1  # used when there are too few windows to hold some out
    swap_max_n: int = 32  # exact exchange search (1- and 2-swaps) only on layers this small
    # alternating (up, down) rounds; 0 = decision + refit only. Off by default: on SmolLM2
    # layers with 16k calibration tokens it raised the held-out error (see BENCHMARKS.md)
    recovery_rounds: int = 0
    holdout: float = 0.125  # fraction of calibration tokens held out to choose the rounds
    ridge: float = 1e-3  # relative ridge in the recovery solves
    cg_iters: int = 15  # conjugate-gradient iterations per up-step
    refit_all: bool = True  # rerun the chosen rounds on all tokens (else keep the fit-only)
    recovery_dtype: str = "float32"  # the recovery's products
    # dtype of the decision and the refit: float32 halves the time on a CPU and is the native
    # speed on a GPU; on real Qwen and SmolLM2 layers it chose the same masks as float64
    solve_dtype: str = "float32"

    @property
    def needs_inputs(self) -> bool:
        return self.recovery_rounds > 0

    def solve(self, problem: LayerProblem, n_keep: int) -> Decision:
        n = problem.n
        if n_keep >= n:
            return Decision(torch.arange(n, device=problem.w_down.device),
                            problem.w_down.clone(), info={})
        dt = _dtype(self.solve_dtype)
        w0 = problem.w_down.to(dt)  # (m, n)
        h = damp(problem.stats.gram.to(dt), self.damp)  # (n, n)
        hinv = spd_inverse(h)
        keep, info = self.decide(w0, h, hinv, problem, n_keep)
        w_k, lam_info = self.refit(w0, problem, h, keep)
        info.update(lam_info)
        decision = Decision(keep, w_k.to(problem.w_down.dtype), info=info)
        if self.recovery_rounds > 0 and problem.inputs is not None and problem.linear_key:
            self.recover(problem, decision)
        return decision

    # ---- refit --------------------------------------------------------------------------
    def refit(self, w0, problem, h_damped, keep):
        """The kept down projection: exact least squares (section 2), or, with a ridge grid,
        least squares shrunk toward the dense weights with the strength chosen per layer on
        the held-out calibration windows (fit on the others, scored on them, refit on all)."""
        grid = [float(x) for x in str(self.ridge_grid).split(",") if x.strip()]
        if not grid:
            return refit_down(w0, h_damped, keep), {}
        h = problem.stats.gram.to(w0.dtype)
        h_val = problem.stats.gram_heldout
        if h_val is None:
            lam = self.ridge_fallback
            return refit_toward_dense(w0, h, keep, lam), {"ridge": lam, "ridge_chosen_on": "none"}
        h_val = h_val.to(w0.dtype)
        errs = heldout_errors_toward_dense(w0, h - h_val, h_val, keep, grid,
                                           self.ridge_search)
        lam = min(errs, key=errs.get)
        return refit_toward_dense(w0, h, keep, lam), {
            "ridge": lam,
            "ridge_heldout_rel_error": {str(k): v for k, v in errs.items()},
        }

    # ---- decision -----------------------------------------------------------------------
    def decide(self, w0, h, hinv, problem, n_keep):
        n = w0.shape[1]
        lam = n - n_keep
        d = 1.0 / torch.diagonal(hinv) if self.weights == "obs" else torch.diagonal(h).clone()

        def indicator(pruned):
            s = torch.zeros(n, dtype=w0.dtype, device=w0.device)
            s[pruned] = 1
            return s

        # starting points of s, built only when asked for (greedy OBS costs a few seconds)
        inits = {
            "uniform": lambda: torch.full((n,), lam / n, dtype=w0.dtype, device=w0.device),
            "obs": lambda: _smallest_indicator((w0 * w0).sum(0) / torch.diagonal(hinv), lam),
            "wanda": lambda: _smallest_indicator(
                w0.abs().sum(0) * problem.stats.norm.to(w0), lam
            ),
            "greedy": lambda: indicator(greedy_obs(w0, hinv, lam, block=self.greedy_block)[0]),
        }
        best = None
        for start in [s.strip() for s in self.starts.split(",") if s.strip()]:
            if start not in inits:
                raise ValueError(f"unknown start '{start}'; use {', '.join(inits)}")
            s0 = inits[start]()
            candidates = [self.penalty(h, hinv, w0, d, s0, lam)] if self.iters else []
            if bool(((s0 == 0) | (s0 == 1)).all()):
                # a binary start is itself a mask: the penalty method must not end worse
                candidates.append(torch.nonzero(s0 > 0.5).flatten())
            for pruned in candidates:
                swaps = 0
                if n <= self.swap_max_n:  # polish each: local optima differ between starts
                    pruned, err, swaps = _swap_search(w0, hinv, pruned)
                else:
                    err = mask_error(w0, hinv, pruned)
                if best is None or err < best[0]:
                    best = (err, pruned, start, swaps)
        err, pruned, start, swaps = best
        keep = complement(pruned, n)
        # 1/2 ||W0 X - W X||^2 of the exact refit (absolute; relative errors of the final
        # weights are measured by the pipeline)
        return keep, {"start": start, "swaps": swaps, "fit_error": err}

    def penalty(self, h, hinv, w0, d, s, lam):
        """Alternate W- and s-steps while rho grows. Every binary iterate is a mask; return
        the one with the lowest exact error (later iterates, at large rho, can lock in a
        worse mask than an earlier one)."""
        rho = self.rho0
        s = s.clone()
        best = None
        loo = self.s_step.startswith("loo")
        hw0 = functools.cache(lambda: h @ w0.T)  # H W0^T, formed once if ever needed
        for _ in range(self.iters):
            w, bii = penalized_step(h, hinv, w0, rho * s * d, need_diag=loo, hw0=hw0)
            if loo:
                # Leave-one-out cost: zeroing column i once its own penalty is lifted
                # (Sherman-Morrison on H_rho - rho s_i d_i e_i e_i^T):
                #   c_i = ||W_i||^2 / (B_ii (1 - rho s_i d_i B_ii))
                c = (w * w).sum(0) / (bii * (1 - rho * s * d * bii)).clamp_min(
                    torch.finfo(w.dtype).tiny)
            else:
                c = d * (w * w).sum(0)  # (n,) cost of each column under its curvature
            s = _soft_step(c, lam) if self.s_step.endswith("soft") else _lp_step(c, lam)
            rho *= self.rho_growth
            # the lam largest s (ties: the cheaper column) as a mask, scored exactly
            pruned = torch.sort(torch.topk(s - 1e-12 * c / c.max(), lam).indices).values
            err = mask_error(w0, hinv, pruned)
            if best is None or err < best[0]:
                best = (err, pruned)
        return best[1]

    # ---- recovery -----------------------------------------------------------------------
    def recover(self, problem: LayerProblem, decision: Decision) -> None:
        """Alternating least squares of (up, down) to the dense output, the number of rounds
        chosen on held-out tokens. Updates `decision` in place.

        The comparison is fair: every candidate, round 0 (the plain refit) included, is fit on
        the same fit tokens and scored on the held-out ones. The chosen number of rounds is
        then rerun on all tokens (`refit_all`), starting from the all-token refit.
        """
        keep = decision.keep
        dt = getattr(torch, self.recovery_dtype)
        a = problem.inputs.to(dt)  # (p, d)
        g = problem.gate_act[:, keep].to(dt)  # (p, k) gate activations of kept channels
        up = problem.w_in[problem.linear_key]
        w0 = problem.w_down
        y = ((problem.gate_act * (problem.inputs @ up.T)) @ w0.T).to(dt)  # (p, m) dense
        u0 = up[keep].to(dt)  # (k, d)
        p = a.shape[0]
        n_val = int(round(p * self.holdout))
        if n_val < 1 or p - n_val < 1:
            return
        # Held-out tokens are the last ones: whole calibration windows, not random tokens.
        fit, val = slice(0, p - n_val), slice(p - n_val, p)
        y_val_sq = float((y[val] * y[val]).sum())

        def val_err(u_, w_):
            r = (g[val] * (a[val] @ u_.T)) @ w_.T - y[val]
            return float((r * r).sum()) / y_val_sq

        # The down-steps use the refit the decision chose: shrunk toward the dense weights with
        # the held-out ridge (`decision.info["ridge"]`), else the exact damped refit.
        lam = decision.info.get("ridge")
        w0_k = w0[:, keep].to(dt)

        def down(x, y_):
            if lam is None:
                return _down_step(x, y_, self.damp)
            return _down_step_toward(x, y_, w0_k, lam)

        def rounds(sl, u, w, count):
            """`count` alternating rounds on tokens `sl`; the (u, w) after each."""
            out = []
            for _ in range(count):
                u = _up_step(a[sl], g[sl], w, y[sl], u, self.ridge, self.cg_iters)
                w = down(g[sl] * (a[sl] @ u.T), y[sl])
                out.append((u, w))
            return out

        w_fit = down(g[fit] * (a[fit] @ u0.T), y[fit])  # round 0, fit only
        errs = [val_err(u0, w_fit)]
        fit_only = [(u0, w_fit)]
        for u, w in rounds(fit, u0, w_fit, self.recovery_rounds):
            errs.append(val_err(u, w))
            fit_only.append((u, w))
        best = min(range(len(errs)), key=errs.__getitem__)
        decision.info.update(recovery_rounds=best, heldout_rel_error=errs)
        if best == 0:
            return  # keep the exact all-token refit of the decision
        if self.refit_all:
            u, w = rounds(slice(0, p), u0, decision.w_down.to(dt), best)[-1]
        else:
            u, w = fit_only[best]
        decision.w_down = w.to(w0.dtype)
        decision.w_in = {problem.linear_key: u.to(w0.dtype)}


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if dt not in (torch.float32, torch.float64):
        raise ValueError(f"solve_dtype must be float32 or float64, got {name!r}")
    return dt


def penalized_step(h, hinv, w0, pen, need_diag=True, hw0=None):
    """The W-step of the penalty method, W = W0 H B with B = (H + diag(pen))^-1, and diag(B).

    When the penalty sits on few channels P (a binary s, which the LP s-step always returns),
    Woodbury's identity on Hinv = H^-1 gives both without a new n x n inverse:

        B = Hinv - Hinv[:, P] M^-1 Hinv[P, :],   M = diag(1 / pen_P) + Hinv[P, P]
        W = W0 H B = W0 - W0[:, P] M^-1 Hinv[P, :]          (as H Hinv = I)

    which costs O(n |P| (|P| + m)) instead of O(n^3). Otherwise B is formed. Returns (W, diag B)
    (diag B is None when not needed). `hw0` returns H W0^T for the explicit path (a cached
    callable, so a caller iterating pays for it once); None forms it here.
    """
    p_idx = torch.nonzero(pen).flatten()
    if p_idx.numel() < 0.6 * pen.numel():
        hp = hinv[p_idx]  # (|P|, n)
        m_mat = hp[:, p_idx] + torch.diag(1.0 / pen[p_idx])  # (|P|, |P|)
        z = spd_solve(m_mat, hp)  # (|P|, n) = M^-1 Hinv[P, :]
        w = w0 - w0[:, p_idx] @ z  # (m, n)
        bii = torch.diagonal(hinv) - (hp * z).sum(0) if need_diag else None
        return w, bii
    h_rho = h + torch.diag(pen)
    rhs = hw0() if hw0 is not None else h @ w0.T  # (n, m)
    if need_diag:
        b = spd_inverse(h_rho)  # (n, n)
        return (b @ rhs).T, torch.diagonal(b)
    return spd_solve(h_rho, rhs).T, None


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
    n = w0.shape[1]
    pruned = complement(keep, n)
    w_k, w_p = w0[:, keep], w0[:, pruned]  # (m, k), (m, |P|)
    hf_kk = h_fit[keep][:, keep]  # (k, k)
    rhs0 = h_fit[keep] @ w0.T  # (k, m)
    hv_k = h_val[keep]  # (k, n)
    hv_kk = hv_k[:, keep]  # (k, k)
    cross = hv_k[:, pruned] @ w_p.T  # (k, m) = Hv_KP W0_P^T
    const = float(((h_val[pruned][:, pruned] @ w_p.T) * w_p.T).sum())
    # tr(W0 Hv W0^T) from the blocks already formed: K rows of Hv, and Hv_PP
    denom = float(((hv_kk @ w_k.T + 2 * cross) * w_k.T).sum()) + const
    mean_diag = float(torch.diagonal(hf_kk).mean())
    eye = torch.eye(keep.numel(), dtype=w0.dtype, device=w0.device)

    def error(lam):
        mu = lam * mean_diag
        w_new = spd_solve(hf_kk + mu * eye, rhs0 + mu * w_k.T).T  # (m, k)
        dk = w_new - w_k
        num = float(((dk @ hv_kk) * dk).sum()) - 2 * float((dk * cross.T).sum()) + const
        return max(num, 0.0) / denom if denom > 0 else 0.0

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


def _smallest_indicator(score: torch.Tensor, lam: int) -> torch.Tensor:
    s = torch.zeros_like(score)
    s[torch.topk(score, lam, largest=False).indices] = 1
    return s


def _lp_step(c: torch.Tensor, lam: int) -> torch.Tensor:
    """argmin_s <c, s> over {s in [0,1]^n, 1^T s = lam}: the lam smallest c."""
    return _smallest_indicator(c, lam)


def _soft_step(c: torch.Tensor, lam: int, iters: int = 60) -> torch.Tensor:
    """s_i = min(1, tau / c_i) with tau found by bisection so that sum(s) = lam."""
    c = c.clamp_min(torch.finfo(c.dtype).tiny)
    lo, hi = 0.0, float(c.max()) * 1.0001
    for _ in range(iters):
        tau = 0.5 * (lo + hi)
        if float(torch.clamp(tau / c, max=1).sum()) < lam:
            lo = tau
        else:
            hi = tau
    return torch.clamp(hi / c, max=1)


def _swap_search(w0, hinv, pruned, max_passes: int = 50, depth: int = 2):
    """Exact first-improvement exchange search between pruned and kept channels: single swaps,
    then pairs of swaps (depth 2) when no single swap improves the exact mask error."""
    import itertools

    n = w0.shape[1]
    err = mask_error(w0, hinv, pruned)
    swaps = 0
    for _ in range(max_passes):
        improved = False
        kept = complement(pruned, n).tolist()
        plist = pruned.tolist()
        for size in range(1, depth + 1):
            for out_i in itertools.combinations(range(len(plist)), size):
                for in_j in itertools.combinations(kept, size):
                    cand = list(plist)
                    for oi, kj in zip(out_i, in_j):
                        cand[oi] = kj
                    cand_t = torch.tensor(sorted(cand), device=pruned.device)
                    e = mask_error(w0, hinv, cand_t)
                    if e < err * (1 - 1e-12):
                        pruned, err, swaps, improved = cand_t, e, swaps + 1, True
                        break
                if improved:
                    break
            if improved:
                break
        if not improved:
            break
    return pruned, err, swaps


def _up_step(a, g, w, y, u0, ridge, iters):
    """min_U ||(g * (a U^T)) W^T - y||^2 + ridge' ||U - U0||^2 by conjugate gradient from U0.

    The operator is M(U) = (g * ((g * (a U^T)) W^T W))^T a; the ridge is relative to the
    operator's scale so the same setting works for every layer.
    """
    wtw = w.T @ w  # (k, k)

    def op(u):
        z = g * (a @ u.T)  # (p, k)
        return (g * (z @ wtw)).T @ a  # (k, d)

    b = (g * (y @ w)).T @ a  # (k, d)
    scale = float((g * g).mean() * (a * a).sum(0).mean() * torch.diagonal(wtw).mean())
    lam = ridge * max(scale, 1e-300)
    # Regularize toward u0: solve (M + lam) U = b + lam u0.
    rhs = b + lam * u0
    x = u0.clone()
    r = rhs - (op(x) + lam * x)
    pdir = r.clone()
    rr = float((r * r).sum())
    for _ in range(iters):
        ap = op(pdir) + lam * pdir
        alpha = rr / max(float((pdir * ap).sum()), 1e-300)
        x = x + alpha * pdir
        r = r - alpha * ap
        rr_new = float((r * r).sum())
        if rr_new < 1e-20 * float((rhs * rhs).sum()):
            break
        pdir = r + (rr_new / rr) * pdir
        rr = rr_new
    return x


def _down_step_toward(x, y, w0_k, lam):
    """min_W ||x W^T - y||^2 + mu ||W - W0_K||^2, mu = lam * mean(diag x^T x): the refit
    toward the dense weights (refit.refit_toward_dense) on explicit activations."""
    gram = x.T @ x  # (k, k)
    mu = lam * float(torch.diagonal(gram).mean())
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return spd_solve(gram + mu * eye, x.T @ y + mu * w0_k.T).T  # (m, k)


def _down_step(x, y, ridge):
    """min_W ||x W^T - y||^2 (+ relative ridge): exact least squares for the down projection."""
    gram = x.T @ x  # (k, k)
    gram = damp(gram, ridge)
    return spd_solve(gram, x.T @ y).T  # (m, k)


__all__ = ["SpapSolver", "top_k_keep"]
