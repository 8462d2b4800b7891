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
What the default does, plainly: `iters=0`, so the decision is the greedy OBS mask (blocks
of 16 columns, `obs.greedy_obs`). Measured on SmolLM2 and Qwen2.5-Coder layers, penalty
iterations run from that start never changed a mask, and from a uniform start they reach
masks within 0.01% of its error at twice the cost (BENCHMARKS.md); they are opt-in
(`iters=4`, `starts=uniform`, ...). With iterations, the penalty method runs from each start
and the mask with the lowest exact error (refit.mask_error) among every binary iterate and
the binary starts is kept. On small layers (n <= swap_max_n) an exact 1- and 2-exchange search
polishes it. With a binary s the W-step needs no new n x n inverse: Woodbury's identity on
H^-1 gives it in O(n |P| (|P| + m)) (`penalized_step`).

Refit: the shared one (`refit.RefitOptions`), by default `refit=ridge`: least squares shrunk
toward the dense weights, the strength chosen per layer on the held-out calibration windows.
Decision and refit run in `solve_dtype` (float32 by default) and return float64 weights.

Update (section 4), SPAP's own step: `recovery` (`recovery.recover`) re-fits the kept input
projections (gate and up, or fc1) and the down projection to the dense layer's output by
alternating minimization: Adam steps on the input projections, then the down projection's
closed-form refit toward the dense weights, per epoch; the number of epochs (up to
`recovery_epochs`, 0 allowed) is chosen on the held-out calibration windows, so recovery never
ends with a higher held-out error than the refit. Opt-in pieces (recovery.py's docstring;
measured per layer by bench/layer_lab.py, bench/results/layer-lab-*.json): `recovery_steps`
(Adam steps per epoch whatever the token count), `recovery_patience` (held-out early stopping,
so `recovery_epochs` is an upper bound), `recovery_shrink` (gate and up shrunk toward their
dense rows, the strength chosen on the held-out windows), `recovery_final_refit` (the down
projection solved once more on all windows), `recovery_rerun` (the chosen epochs run once more
on all windows) and `recovery_weight=fisher` (recovery's loss
weighted by the loss's sensitivity to each output direction, as `out_weight=fisher` weights
the decision).

Precision: recovery's products run in the layer problem's `compute_dtype` (bf16 where the
device multiplies it fast, precision.py; its sums stay float64), the decision and the refit in
`solve_dtype`. Each solve's seconds per step (decision, refit, recovery and its Adam steps,
down steps and held-out losses) are returned in `info["seconds"]` for the layer's record.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Decision, LayerProblem, top_k_keep
from .continuation import continue_penalty
from .obs import greedy_obs
from .recovery import MODES, PARALLEL, PhaseTimer, recover
from .refit import (
    RefitOptions,
    complement,
    damp,
    mask_error,
    refit_toward_dense,
    solve_toward,
    spd_inverse,
    spd_solve,
)
from .weighting import OUT_WEIGHTS, OutputWeighting


@dataclass
class SpapSolver(RefitOptions, OutputWeighting):
    name: ClassVar[str] = "spap"
    needs_gram: ClassVar[bool] = True

    refit: str = "ridge"  # the shared refit (refit.RefitOptions); "exact" for damped lstsq
    weights: str = "obs"  # d_i: "obs" = 1 / Hinv_ii (OBS curvature), "diag" = H_ii
    s_step: str = "loo"  # "loo" (leave-one-out costs, LP step), "lp" (the paper's), "soft"
    rho0: float = 0.05  # initial rho, relative to d (so scale-free)
    rho_growth: float = 4.0
    # penalty iterations (rho reaches rho0 * growth^(iters-1)). 0 (default): the decision is
    # the greedy OBS start itself; from that start, iterations never changed a mask on the
    # measured Qwen and SmolLM2 layers, so they are opt-in
    iters: int = 0
    # comma-separated starting points of s (uniform, obs score, wanda score, greedy OBS mask);
    # the penalty method runs from each and the lowest exact error wins
    starts: str = "greedy"
    # columns per greedy OBS step for the greedy start (1 = exact greedy). 16 raised the exact
    # error of a real Qwen layer's mask by 0.03% and cut the solve 7x on an H200, where
    # exact greedy is ~1500 small kernel launches per layer (bench/results/gpu-check-*.json)
    greedy_block: int = 16
    swap_max_n: int = 32  # exact exchange search (1- and 2-swaps) only on layers this small
    # recovery (recovery.py): "alternating" (Adam on the input projections, closed-form down
    # projection, per epoch), "joint" (Adam on all), or "none" (decision + refit only)
    # "continuation" (continuation.py): the cut made gradually inside recovery, a penalty on
    # the channels to remove growing over recovery_epochs epochs, the mask re-chosen between
    # them
    recovery: str = "alternating"
    # at most this many epochs, the count chosen on held-out windows; 2 keeps SPAP within 5x
    # wanda-sp's time on Qwen2.5-Coder (a third epoch lowered a SmolLM2 layer's held-out
    # error by a further 0.7%)
    recovery_epochs: int = 2
    recovery_lr: float = 0.02  # Adam's rate relative to each weight's RMS
    recovery_batch: int = 1024  # tokens per Adam step (at most, with recovery_steps)
    # Adam steps per epoch whatever the token count: an epoch stays one pass over the fit
    # tokens, in minibatches of fewer tokens when they are few. 0: one step per
    # recovery_batch tokens (7 steps per epoch at 16 x 512)
    recovery_steps: int = 0
    # stop once the held-out loss has not improved for this many epochs (0: run all
    # recovery_epochs), so recovery_epochs becomes an upper bound on the time spent
    recovery_patience: int = 0
    # once the held-out windows have chosen the epochs (and their rates), run them once more
    # from the start on all windows, fit and held-out, as the refit does with its ridge
    recovery_rerun: bool = False
    # shrinkage of the recovered gate and up toward their dense rows: fractions t of the
    # update to try, e.g. "0.25,0.5,0.75" (t = 0 and 1 always compete), each with its own
    # down step, t chosen on the held-out windows; "" (default): off
    recovery_shrink: str = ""
    # after every held-out choice, solve the down projection once more on all windows (fit
    # and held-out), as the refit without recovery does
    recovery_final_refit: bool = False
    # what the recovered MLP reproduces: "layer", the dense MLP on the pruned model's inputs;
    # "model", the dense model's own MLP output at this layer (so the layer also corrects the
    # drift of its inputs; the pipeline then carries the dense model's hidden states too)
    recovery_target: str = "layer"
    # the output weighting of recovery's loss (recovery.py, `out_root`): "none", every output
    # direction alike; "fisher", the loss-weighted error of out_weight=fisher (weighting.py),
    # for gate and up and every held-out choice, whatever out_weight the decision uses
    recovery_weight: str = "none"
    # in a data-parallel run: "exact", one process's steps on every rank (the default: the
    # split was measured slower on 2 CPU ranks, dp-scaling-*-split/exact.json); "split", each
    # rank's rows of every minibatch and the gradients summed over ranks (the steps shared)
    recovery_parallel: str = "exact"
    # recovery=continuation: the penalty weight (relative to each channel's H_ii) of the first
    # and the last epoch, geometric in between; and how the channels to remove are re-chosen
    # between epochs: "loo" (the cheapest by their leave-one-out cost) or "fixed" (the
    # decision's mask throughout)
    continuation_mu: str = "0.1,10"
    continuation_rechoose: str = "loo"
    # dtype of the decision and the refit: float32 halves the time on a CPU and is the native
    # speed on a GPU; on real Qwen and SmolLM2 layers it chose the same masks as float64
    solve_dtype: str = "float32"

    @property
    def needs_inputs(self) -> bool:
        return self.recovery != "none" and self.recovery_epochs > 0

    @property
    def needs_fisher(self) -> bool:
        return self.needs_out_weight or (self.needs_inputs and self.recovery_weight == "fisher")

    @property
    def needs_dense_stream(self) -> bool:
        return self.needs_inputs and self.recovery_target == "model"

    def solve(self, problem: LayerProblem, n_keep: int) -> Decision:
        self.check_refit()
        if self.recovery_weight not in OUT_WEIGHTS:
            raise ValueError(f"unknown recovery_weight '{self.recovery_weight}'; use "
                             f"{' or '.join(OUT_WEIGHTS)}")
        if self.recovery_rerun and self.recovery == "continuation":
            raise ValueError("recovery_rerun is not implemented for recovery=continuation; "
                             "use recovery=alternating")
        if self.recovery_weight == "fisher" and self.recovery == "continuation":
            raise ValueError("recovery_weight=fisher is not implemented for "
                             "recovery=continuation; use recovery=alternating")
        self.check_out_weight(problem)
        if self.recovery_target not in ("layer", "model"):
            raise ValueError(f"unknown recovery_target '{self.recovery_target}'; use layer or "
                             "model")
        if self.recovery_parallel not in PARALLEL:
            raise ValueError(f"unknown recovery_parallel '{self.recovery_parallel}'; use "
                             f"{' or '.join(PARALLEL)}")
        if self.recovery not in (*MODES, "continuation", "none"):
            raise ValueError(f"unknown recovery '{self.recovery}'; use "
                             f"{', '.join(MODES)}, continuation or none")
        n = problem.n
        if n_keep >= n:
            return Decision(torch.arange(n, device=problem.w_down.device),
                            problem.w_down.clone(), info={})
        dt = _dtype(self.solve_dtype)
        timer = PhaseTimer(problem.w_down.device)
        with timer("decision"):
            w0 = problem.w_down.to(dt)  # (m, n)
            # the decision sees the fit windows only (stats.ActStats.fit); the refit all of them
            fit = problem.stats.fit(dtype=dt)
            h = damp(fit.gram, self.damp)  # (n, n)
            fit.gram = None  # (the decision reads h, and fit's norms only)
            hinv = spd_inverse(h)
            # (with out_weight=fisher the decision ranks masks by the loss-weighted error; the
            # refit is the same for every output weighting, weighting.py)
            keep, info = self.decide(self.decision_rows(w0, problem), h, hinv, fit, n_keep)
            del h, hinv, fit
        with timer("refit"):  # (with its held-out ridge choice, on all windows)
            w_k, refit_info = self.refit_kept(w0, problem.stats, keep)
        info.update(refit_info)
        decision = Decision(keep, w_k.to(problem.w_down.dtype), info=info)
        if self.needs_inputs and problem.inputs is not None and problem.targets is not None:
            with timer("recovery"):
                self.recover(problem, decision, dt)
        # seconds per step of this solve, recovery's own parts (Adam steps, down steps,
        # held-out losses) among them
        info["seconds"] = {**timer.seconds, **{f"recovery_{k}": v for k, v in
                                               info.pop("recovery_seconds", {}).items()}}
        return decision

    # ---- recovery -----------------------------------------------------------------------
    def recover(self, problem: LayerProblem, decision: Decision, dt: torch.dtype) -> None:
        """Recovery from the refit, the number of epochs chosen on the held-out windows.
        Updates `decision` in place.

        The comparison is fair: the start (epoch 0) is the same refit fit on the fit windows
        only, so every candidate is scored on windows it never saw. When no epoch beats it, the
        all-window refit of the decision is kept."""
        n_val = problem.heldout_tokens
        stats = problem.stats
        # (over all ranks of a data-parallel run: one may hold no held-out window)
        dev = problem.w_down.device
        n_val_all = problem.shard.sum_float(float(n_val), dev)
        n_all = problem.shard.sum_float(float(problem.inputs.shape[0]), dev)
        if n_val_all < 1 or n_val_all >= n_all or stats.gram_heldout is None:
            decision.info["recovery_epochs"] = 0
            decision.info["recovery_skipped"] = "no held-out windows"
            return
        keep = decision.keep
        w0 = problem.w_down.to(dt)
        lam = decision.info.get("ridge")
        h_fit = _difference(stats.gram, stats.gram_heldout, dt)
        w_start = (refit_toward_dense(w0, h_fit, keep, lam) if lam is not None
                   else refit_toward_dense(w0, damp(h_fit, self.damp), keep, 0.0))
        targets = problem.targets
        alpha = decision.info.get("drift_alpha") or 0.0
        if alpha:  # (in float32 at least: a bf16 model's D is smaller than its rounding)
            targets = _plus_drift(targets, problem.drift, alpha)
        if self.recovery == "continuation":
            self._continue(problem, decision, targets, lam, dev)
            return
        if alpha:  # the drift target (refit.py): W0 x + alpha D, for the start and the epochs
            drift = stats.drift
            c_fit = _difference(drift.cross, drift.cross_heldout, dt)  # (m, n)
            w_start = solve_toward(h_fit[keep][:, keep],
                                   h_fit[keep] @ w0.T + alpha * c_fit[:, keep].T,
                                   w0[:, keep], lam)
        h_fit = c_fit = None  # (n, n) and (m, n): not needed by the epochs
        stats = drift = None  # nor are the statistics: the driver's Grams go now
        problem.release_stats()
        res = recover(
            problem.inputs, targets,
            {k: v[keep] for k, v in problem.w_in.items()}, w_start, problem.act,
            problem.linear_key, n_val,
            b_in={k: v[keep] for k, v in problem.b_in.items()},
            b_down=problem.b_down, w_down_dense=w0[:, keep], ridge=lam,
            epochs=self.recovery_epochs, lr=self.recovery_lr, batch=self.recovery_batch,
            mode=self.recovery, device=dev, steps=self.recovery_steps,
            patience=self.recovery_patience, shrink=_fractions(self.recovery_shrink),
            final_refit=self.recovery_final_refit, shard=problem.shard,
            rerun=self.recovery_rerun,
            out_root=(self.fisher_root(problem, torch.float64, dev)
                      if self.recovery_weight == "fisher" else None),
            compute=problem.compute_dtype, window=problem.window_tokens,
            parallel=self.recovery_parallel,
        )
        decision.info.update(recovery_epochs=res.epochs, recovery_heldout_loss=res.heldout,
                             recovery_seconds=res.seconds)
        if res.shrink:
            decision.info.update(recovery_shrink=res.shrink["chosen"],
                                 recovery_shrink_heldout_loss=res.shrink["heldout"])
        if res.epochs == 0:
            return
        f64 = problem.w_down.dtype
        decision.w_down = res.w_down.to(f64)
        decision.w_in = {k: v.to(f64) for k, v in res.w_in.items()}

    def _continue(self, problem, decision, targets, lam, dev) -> None:
        """recovery=continuation (continuation.py) from the decision's mask. Its epoch 0 is
        the refit of that mask on the fit windows; when no later epoch's cut beats it on the
        held-out windows, the decision and its all-window refit stay."""
        res = continue_penalty(
            problem.inputs, targets, problem.w_in, problem.w_down, problem.act,
            problem.linear_key, problem.heldout_tokens, complement(decision.keep, problem.n),
            b_in=problem.b_in, b_down=problem.b_down, ridge=lam,
            epochs=self.recovery_epochs, mu=_fractions(self.continuation_mu, "continuation_mu"),
            rechoose=self.continuation_rechoose, lr=self.recovery_lr,
            batch=self.recovery_batch, device=dev, shard=problem.shard,
            compute=problem.compute_dtype, window=problem.window_tokens,
        )
        decision.info.update(recovery_epochs=res.epochs, recovery_heldout_loss=res.heldout,
                             continuation={"mu": res.mus, "shrinkage": res.shrinkage,
                                           "changed": res.changed})
        if res.epochs == 0:
            return
        f64 = problem.w_down.dtype
        decision.keep = res.keep.to(decision.keep.device)
        decision.w_down = res.w_down.to(f64)
        decision.w_in = {k: v.to(f64) for k, v in res.w_in.items()}

    # ---- decision -----------------------------------------------------------------------
    def decide(self, w0, h, hinv, stats, n_keep):
        """The mask from the (fit windows') damped Gram h, its inverse and `stats` (the
        wanda start's norms)."""
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
                w0.abs().sum(0) * stats.norm.to(w0), lam
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
        if best is None:
            raise ValueError(f"starts '{self.starts}' are not masks and iters=0 runs no "
                             "penalty iterations; set iters >= 1 or use starts=greedy")
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


def _fractions(grid, name: str = "recovery_shrink") -> tuple[float, ...]:
    """recovery_shrink (or continuation_mu) as numbers: "0.25,0.5" (or one number, as
    --option parses it)."""
    if isinstance(grid, (int, float)):
        return (float(grid),)
    try:
        out = tuple(float(x) for x in str(grid).split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers such as "
                         f"'0.25,0.5,0.75', got {grid!r}") from None
    if name == "continuation_mu" and len(out) != 2:
        raise ValueError(f"continuation_mu must be two numbers, the first and the last "
                         f"epoch's penalty, such as '0.1,10', got {grid!r}")
    return out


def _plus_drift(targets: torch.Tensor, drift: torch.Tensor, alpha: float,
                rows: int = 8192) -> torch.Tensor:
    """targets + alpha D in float32 at least, the same numbers as forming them whole, a block
    of rows at a time: one new (p, m) tensor, no temporaries of its size."""
    wide = torch.promote_types(targets.dtype, torch.float32)
    out = torch.empty(targets.shape, dtype=wide, device=targets.device)
    for s in range(0, targets.shape[0], rows):
        out[s:s + rows] = targets[s:s + rows].to(wide) + alpha * drift[s:s + rows].to(wide)
    return out


def _difference(a: torch.Tensor, b: torch.Tensor, dt: torch.dtype,
                rows: int = 1024) -> torch.Tensor:
    """(a - b).to(dt), bit for bit, a block of rows at a time: a float64 temporary of the
    full size (an n x n Gram, 1.6 GB at n = 14336) never exists."""
    out = torch.empty(a.shape, dtype=dt, device=a.device)
    for s in range(0, a.shape[0], rows):
        out[s:s + rows] = a[s:s + rows] - b[s:s + rows]
    return out


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


__all__ = ["SpapSolver", "top_k_keep"]
