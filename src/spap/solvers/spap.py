"""SPAP: penalty-method decisions and alternating-minimization recovery (SPAP_METHOD.md 3-4).

Decision (section 3). The bilinear constraint W diag(s) = 0 becomes a penalty:

    F_rho(W, s) = 1/2 tr((W - W0) H (W - W0)^T) + rho/2 sum_i s_i d_i ||W[:, i]||^2

minimized by alternating a closed-form W-step, W = W0 H (H + rho diag(s d))^-1, and an s-step
over {s in [0,1]^n, 1^T s = lambda}, while rho grows geometrically. Two s-steps are offered:
- "lp": the paper's linear program, whose solution is binary (the lambda smallest
  c_i = d_i ||W[:, i]||^2). Measured on real layers it keeps its first mask (the W-step shrinks
  exactly the penalized columns), so it acts as a one-shot score plus refit.
- "soft" (default): s_i = min(1, tau / c_i) with tau set so that sum(s) = lambda. Channels are
  penalized in proportion to how cheap they are, so the others can take over their work
  gradually before rho grows large; the mask is read off at the end.
The penalty method is run from several starts (uniform s, and the masks of the OBS and
Wanda scores) and the mask with the lowest exact error (refit.mask_error) is kept, so the
decision is never worse than those scores with the same refit. On small layers
(n <= swap_max_n) an exact swap search polishes it.

Update (section 4). The kept down projection gets the exact least-squares refit. Then, for
gated MLPs, X = act(gate(a)) * up(a) is linear in the up projection for fixed gate
activations, so (W_up, W_down) are refit alternately to the dense layer's output: the up-step
by conjugate gradient on its (ridge-regularized) normal equations, the down-step exactly. A
slice of the calibration windows is held out, and the number of rounds (0..recovery_rounds)
with the lowest held-out error is kept, so recovery cannot overfit the layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Decision, LayerProblem, top_k_keep
from .obs import greedy_obs
from .refit import complement, damp, mask_error, refit_down, spd_inverse, spd_solve


@dataclass
class SpapSolver:
    name: ClassVar[str] = "spap"
    needs_gram: ClassVar[bool] = True

    damp: float = 0.01  # delta in H + delta * mean(diag H) * I
    weights: str = "obs"  # d_i: "obs" = 1 / Hinv_ii (OBS curvature), "diag" = H_ii
    s_step: str = "soft"  # "soft", "lp" (binary, as in the paper), "loo", "loo-soft"
    rho0: float = 0.05  # initial rho, relative to d (so scale-free)
    rho_growth: float = 2.0
    iters: int = 12  # penalty iterations (rho reaches rho0 * growth^(iters-1))
    # comma-separated starting points of s (uniform, obs score, wanda score, greedy OBS mask);
    # the penalty method runs from each and the lowest exact error wins
    starts: str = "greedy,uniform,wanda"
    swap_max_n: int = 32  # exact exchange search (1- and 2-swaps) only on layers this small
    recovery_rounds: int = 2  # alternating (up, down) rounds; 0 = decision + refit only
    holdout: float = 0.125  # fraction of calibration tokens held out to choose the rounds
    ridge: float = 1e-3  # relative ridge in the recovery solves
    cg_iters: int = 15  # conjugate-gradient iterations per up-step
    recovery_tokens: int = 0  # subsample the fit tokens to at most this many (0 = all)

    @property
    def needs_inputs(self) -> bool:
        return self.recovery_rounds > 0

    def solve(self, problem: LayerProblem, n_keep: int) -> Decision:
        w0 = problem.w_down  # (m, n)
        n = problem.n
        h = damp(problem.stats.gram, self.damp)  # (n, n)
        if n_keep >= n:
            return Decision(torch.arange(n, device=w0.device), w0.clone(), info={})
        hinv = spd_inverse(h)
        keep, info = self.decide(w0, h, hinv, problem, n_keep)
        w_k = refit_down(w0, h, keep)  # (m, k) exact least squares, section 2
        decision = Decision(keep, w_k, info=info)
        if self.recovery_rounds > 0 and problem.inputs is not None and problem.linear_key:
            self.recover(problem, decision)
        return decision

    # ---- decision -----------------------------------------------------------------------
    def decide(self, w0, h, hinv, problem, n_keep):
        n = w0.shape[1]
        lam = n - n_keep
        d = 1.0 / torch.diagonal(hinv) if self.weights == "obs" else torch.diagonal(h).clone()
        col = (w0 * w0).sum(0)  # (n,) ||W0[:, i]||^2
        inits = {
            "uniform": torch.full((n,), lam / n, dtype=w0.dtype, device=w0.device),
            "obs": _smallest_indicator(col / torch.diagonal(hinv), lam),
            "wanda": _smallest_indicator(
                w0.abs().sum(0) * problem.stats.norm.to(w0), lam
            ),
        }
        if "greedy" in self.starts:
            inits["greedy"] = torch.zeros(n, dtype=w0.dtype, device=w0.device)
            inits["greedy"][greedy_obs(w0, hinv, lam)[0]] = 1
        hw0 = h @ w0.T  # (n, m), right-hand side of every W-step
        best = None
        for start in [s.strip() for s in self.starts.split(",") if s.strip()]:
            if start not in inits:
                raise ValueError(f"unknown start '{start}'; use {', '.join(inits)}")
            pruned = self.penalty(h, hw0, d, inits[start], lam) if self.iters else \
                torch.nonzero(inits[start] > 0.5).flatten()
            swaps = 0
            if n <= self.swap_max_n:  # polish each start: local optima differ between starts
                pruned, err, swaps = _swap_search(w0, hinv, pruned)
            else:
                err = mask_error(w0, hinv, pruned)
            if best is None or err < best[0]:
                best = (err, pruned, start, swaps)
        err, pruned, start, swaps = best
        keep = complement(pruned, n)
        total = 0.5 * float(((w0 @ h) * w0).sum())
        return keep, {"start": start, "swaps": swaps, "fit_rel_error": err / max(total, 1e-300)}

    def penalty(self, h, hw0, d, s, lam):
        """Alternate W- and s-steps while rho grows; return the pruned set."""
        rho = self.rho0
        s = s.clone()
        c = None
        loo = self.s_step.startswith("loo")
        for _ in range(self.iters):
            h_rho = h + torch.diag(rho * s * d)
            if loo:
                b = spd_inverse(h_rho)  # (n, n)
                w = (b @ hw0).T  # (m, n) W-step
                # Leave-one-out cost: zeroing column i once its own penalty is lifted
                # (Sherman-Morrison on H_rho - rho s_i d_i e_i e_i^T):
                #   c_i = ||W_i||^2 / (B_ii (1 - rho s_i d_i B_ii))
                bii = torch.diagonal(b)
                c = (w * w).sum(0) / (bii * (1 - rho * s * d * bii)).clamp_min(1e-300)
            else:
                w = spd_solve(h_rho, hw0).T  # (m, n) W-step
                c = d * (w * w).sum(0)  # (n,) cost of each column under its curvature
            s = _soft_step(c, lam) if self.s_step.endswith("soft") else _lp_step(c, lam)
            rho *= self.rho_growth
        score = s if c is None else s - 1e-12 * c  # ties: prune the cheaper column
        return torch.sort(torch.topk(score, lam).indices).values

    # ---- recovery -----------------------------------------------------------------------
    def recover(self, problem: LayerProblem, decision: Decision) -> None:
        """Alternating least squares of (up, down) to the dense output, rounds chosen on a
        held-out slice of tokens. Updates `decision` in place."""
        keep = decision.keep
        a = problem.inputs  # (p, d)
        g = problem.gate_act  # (p, n)
        up = problem.w_in[problem.linear_key]  # (n, d)
        w0 = problem.w_down  # (m, n)
        p = a.shape[0]
        n_val = int(round(p * self.holdout))
        if n_val < 1 or p - n_val < 1:
            return
        # Held-out tokens are the last ones: whole calibration windows, not random tokens.
        fit, val = slice(0, p - n_val), slice(p - n_val, p)
        a_f, g_f = a[fit], g[fit][:, keep]
        if self.recovery_tokens and a_f.shape[0] > self.recovery_tokens:
            idx = torch.linspace(0, a_f.shape[0] - 1, self.recovery_tokens).long().to(a.device)
            a_f, g_f = a_f[idx], g_f[idx]
            y_f = (g[fit][idx] * (a_f @ up.T)) @ w0.T
        else:
            y_f = (g[fit] * (a_f @ up.T)) @ w0.T  # (p_f, m) dense targets
        a_v, g_v = a[val], g[val][:, keep]
        y_v = (g[val] * (a_v @ up.T)) @ w0.T  # (p_v, m)

        u = up[keep].clone()  # (k, d)
        w = decision.w_down  # (m, k)

        def val_err(u_, w_):
            r = (g_v * (a_v @ u_.T)) @ w_.T - y_v
            return float((r * r).sum() / (y_v * y_v).sum())

        errs = [val_err(u, w)]
        best = (errs[0], 0, u, w)
        for r in range(1, self.recovery_rounds + 1):
            u = _up_step(a_f, g_f, w, y_f, u, self.ridge, self.cg_iters)
            x_f = g_f * (a_f @ u.T)  # (p_f, k)
            w = _down_step(x_f, y_f, self.ridge)
            errs.append(val_err(u, w))
            if errs[-1] < best[0]:
                best = (errs[-1], r, u, w)
        _, rounds, u, w = best
        decision.info.update(recovery_rounds=rounds, heldout_rel_error=errs)
        if rounds > 0:
            decision.w_down = w
            decision.w_in = {problem.linear_key: u}


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


def _down_step(x, y, ridge):
    """min_W ||x W^T - y||^2 (+ relative ridge): exact least squares for the down projection."""
    gram = x.T @ x  # (k, k)
    gram = damp(gram, ridge)
    return spd_solve(gram, x.T @ y).T  # (m, k)


__all__ = ["SpapSolver", "top_k_keep"]
