"""Penalty continuation inside recovery: the cut made gradually, the mask re-chosen on the way.

SPAP's penalty method (spap.py) turns the bilinear constraint W diag(s) = 0 into a penalty on
the down projection alone, with the inputs of the down projection fixed. Recovery (recovery.py)
then re-fits the kept gate, up and down weights after a hard cut. This module does both at
once, on the whole MLP (SPAP_METHOD.md section 4):

    min  ||W act(G a) * (U a) + b - y||^2  +  mu0 ||W - W0||^2  +  mu_e sum_{i in P} H_ii ||W_i||^2

over the full-width weights (all n channels), where P is the current set of channels to
remove (|P| = the number the sparsity asks for), H the Gram of the down projection's input
and mu_e a weight that grows geometrically over the epochs. Each epoch:

1. Adam steps on the input projections (gate and up, or fc1) of the kept channels, with the
   down projection fixed. The rows of P stay frozen: were they trained, the loss would scale
   them up to undo the shrinkage of their down columns (act(g a) * (u a) W_i is unchanged by
   u_i -> c u_i, W_i -> W_i / c), so the penalty would remove nothing;
2. the down projection's closed form with the penalty (one solve of n x n, from the float64
   sums of the new activations; mu0 the layer's held-out ridge, toward the dense weights);
3. P re-chosen (`rechoose="loo"`): the |P| channels whose removal costs least once their own
   penalty is lifted, c_i = ||W_i||^2 / (B_ii (1 - pen_i B_ii)), B the inverse of the
   penalized normal matrix (the leave-one-out cost of spap.py's s-step, by Sherman-Morrison),
   so a channel shrunk by the penalty is judged by what it would do unshrunk;
4. the cut: P's columns set to exactly zero and the kept columns solved once more without the
   penalty, scored on the held-out windows.

Epoch 0 is the cut of the starting mask with the dense inputs: the plain refit on the fit
windows. The epoch whose cut has the lowest held-out loss is returned, so the continuation
never ends with a higher held-out error than the refit of the mask it starts from; the caller
compares it with a hard cut followed by the same number of recovery epochs (bench/layer_lab.py).

Precision (`compute`) as in recovery.py: in bf16 the Adam steps' products run under autocast
with float32 master weights, and the sums of the down step are float32 products of chunks added
in float64; float32 is the earlier path, bit for bit.

Costs per epoch, against recovery's: the Adam steps run at full width (n rows, not the kept k)
and the down step solves n x n instead of k x k. As in recovery, all sums are float64 over every
rank of a data-parallel run, and each Adam step runs on one process's whole minibatch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..distributed import LOCAL, Shard
from ..precision import autocast
from .recovery import LayerTokens, down_input, mlp_forward
from .refit import solve_toward, spd_inverse

RECHOOSE = ("loo", "fixed")


@dataclass
class ContinuationResult:
    keep: torch.Tensor  # (k,) sorted indices of the kept channels
    w_in: dict[str, torch.Tensor]  # name -> (k, d): the kept rows
    w_down: torch.Tensor  # (m, k): the kept columns
    epochs: int  # the epoch whose cut was kept (0: the starting mask, refit)
    heldout: list[float] = field(default_factory=list)  # held-out loss of the cut, epochs 0..
    mus: list[float] = field(default_factory=list)  # the penalty weight of each epoch
    # ||W[:, P]|| / ||W0[:, P]|| after each epoch's penalized down step (P of that epoch)
    shrinkage: list[float] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)  # channels that left P at each epoch
    w_down_full: torch.Tensor | None = None  # (m, n): the kept epoch's W, P's columns zero
    w_in_full: dict[str, torch.Tensor] | None = None  # name -> (n, d) at the kept epoch


def schedule(mu: tuple[float, float], epochs: int) -> list[float]:
    """mu_1 .. mu_E geometric from mu[0] to mu[1] (one epoch: mu[1])."""
    lo, hi = float(mu[0]), float(mu[1])
    if lo <= 0 or hi < lo:
        raise ValueError(f"the continuation's penalty range must satisfy 0 < first <= last, "
                         f"got {lo}, {hi}")
    if epochs == 1:
        return [hi]
    return [lo * (hi / lo) ** (e / (epochs - 1)) for e in range(epochs)]


def penalized_down(gram: torch.Tensor, cross: torch.Tensor, anchor: torch.Tensor,
                   ridge: float, pen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin_W ||W X - Y||^2 + mu ||W - anchor||^2 + sum_i pen_i ||W_i||^2 (mu = ridge x
    mean(diag G), as refit.solve_toward), from G = X X^T (n, n), C = X Y^T (n, m). Returns
    W (m, n) and diag(B), B = (G + mu I + diag(pen))^-1."""
    mu = ridge * float(torch.diagonal(gram).mean())
    a = gram + torch.diag(pen + mu)
    b = spd_inverse(a)
    return (b @ (cross + mu * anchor.T)).T, torch.diagonal(b)


def removal_costs(w: torch.Tensor, bii: torch.Tensor, pen: torch.Tensor) -> torch.Tensor:
    """The increase of the penalized objective when column i is forced to zero and the others
    re-solved, with column i's own penalty lifted first (Sherman-Morrison): ||W_i||^2 /
    (B_ii (1 - pen_i B_ii))."""
    den = (bii * (1 - pen * bii)).clamp_min(torch.finfo(w.dtype).tiny)
    return (w * w).sum(0) / den


def continue_penalty(
    a: torch.Tensor,
    y: torch.Tensor,
    w_in: dict[str, torch.Tensor],
    w_down: torch.Tensor,
    act: Callable,
    linear_key: str | None,
    n_val: int,
    pruned: torch.Tensor,
    *,
    b_in: dict[str, torch.Tensor] | None = None,
    b_down: torch.Tensor | None = None,
    ridge: float | None = None,
    epochs: int = 4,
    mu: tuple[float, float] = (0.1, 10.0),
    rechoose: str = "loo",
    lr: float = 0.005,
    batch: int = 1024,
    chunk: int = 8192,
    seed: int = 0,
    device: torch.device | str | None = None,
    shard: Shard = LOCAL,
    compute: torch.dtype = torch.float32,
    window: int = 0,
) -> ContinuationResult:
    """Remove |pruned| channels of the dense MLP (w_in: name -> (n, d), w_down (m, n)) by the
    penalty continuation of the module docstring, starting from the mask `pruned`; fit on
    a[:p - n_val], y[:p - n_val], the epoch chosen on the last n_val tokens. `ridge` None is
    the damped exact refit (anchored at zero), as in recovery."""
    if rechoose not in RECHOOSE:
        raise ValueError(f"unknown continuation rechoose '{rechoose}'; use "
                         f"{' or '.join(RECHOOSE)}")
    if epochs < 1:
        raise ValueError(f"the continuation needs at least one epoch, got {epochs}")
    device = torch.device(device) if device is not None else w_down.device
    f32, f64 = torch.float32, torch.float64
    n = w_down.shape[1]
    n_prune = int(pruned.numel())
    if not 0 < n_prune < n:
        raise ValueError(f"the continuation removes 1 to {n - 1} of {n} channels, "
                         f"asked {n_prune}")
    data = LayerTokens(a, y, n_val, device, chunk, shard, b_down, compute=compute,
                       window=window)
    mus = schedule(mu, epochs)
    ins = {k: v.detach().to(device, f32).clone() for k, v in w_in.items()}
    b_in_ = {k: v.to(device, f32) for k, v in (b_in or {}).items()}
    w0 = w_down.detach().to(device, f64)
    anchor, lam = (torch.zeros_like(w0), 0.01) if ridge is None else (w0, float(ridge))
    in_p = torch.zeros(n, dtype=torch.bool, device=device)
    in_p[pruned.to(device)] = True

    def sums():
        return data.down_sums(lambda aa: down_input(aa, ins, act, linear_key, b_in_))

    def cut(gram, cross):
        """P's columns zero, the kept ones solved without the penalty: (keep, W_k f32, loss)."""
        keep = torch.nonzero(~in_p).flatten()
        w_k = solve_toward(gram[keep][:, keep], cross[keep], anchor[:, keep], lam).to(f32)
        rows = {k: v[keep] for k, v in ins.items()}
        b_k = {k: v[keep] for k, v in b_in_.items()}
        loss = data.val_loss(lambda aa: mlp_forward(aa, rows, w_k, act, linear_key, b_k,
                                                    data.b_down))
        return keep, w_k, loss

    def snapshot(keep, w_k):
        return keep.clone(), {k: v.detach().clone() for k, v in ins.items()}, w_k.clone()

    gram, cross = sums()
    keep, w_k, loss = cut(gram, cross)
    best = (loss, 0, snapshot(keep, w_k))
    heldout, shrinkage, changed = [loss], [], []
    norm0 = w0.pow(2).sum(0)  # (n,)

    def step_down(mu_e):
        pen = torch.where(in_p, mu_e * torch.diagonal(gram), torch.zeros_like(norm0))
        return (*penalized_down(gram, cross, anchor, lam, pen), pen)

    w, _, _ = step_down(mus[0])  # the first penalized W before any Adam step
    w_full = w.to(f32)
    scale = {k: float(v.pow(2).mean().sqrt()) or 1.0 for k, v in ins.items()}
    leaves = {k: v.requires_grad_(True) for k, v in ins.items()}
    groups = [{"params": [leaves[k]], "lr": lr * scale[k]} for k in ins]
    # (fused: one kernel per step for every group; float32 keeps the earlier path bit for bit)
    opt = (torch.optim.Adam(groups) if compute == f32 else
           torch.optim.Adam(groups, fused=True))
    base_lr = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch, mb = max(1, data.n_fit_all // batch), batch
    total, step = steps_per_epoch * epochs, 0
    for ep, mu_e in enumerate(mus):
        perm = torch.randperm(data.n_fit_all, generator=gen)
        for i in range(steps_per_epoch):
            frac = 0.1 + 0.45 * (1 + math.cos(math.pi * step / total))
            for g, b in zip(opt.param_groups, base_lr):
                g["lr"] = b * frac
            idx = perm[i * mb:(i + 1) * mb]
            aa, yy = data.minibatch(idx)
            # (whole copies and masks, not boolean indexing: no host sync per step on a GPU)
            frozen = {k: v.detach().clone() for k, v in ins.items()}
            with torch.enable_grad():
                with autocast(device.type, compute):
                    out = mlp_forward(aa, ins, w_full, act, linear_key, b_in_, data.b_down)
                r = out.float() - yy
                loss = (r * r).sum() / (data.y_sq_fit * idx.numel())
                opt.zero_grad(set_to_none=True)
                loss.backward()
            rows_p = in_p[:, None]  # (n, 1)
            for v in ins.values():
                v.grad.masked_fill_(rows_p, 0)
            opt.step()
            with torch.no_grad():  # P's rows do not move (see the module docstring)
                for k, v in ins.items():
                    v.copy_(torch.where(rows_p, frozen[k], v))
            step += 1
        with torch.no_grad():
            gram, cross = sums()
            w, bii, pen = step_down(mu_e)
            shrinkage.append(float((w[:, in_p].pow(2).sum() / norm0[in_p].sum()).sqrt()))
            if rechoose == "loo":
                c = removal_costs(w, bii, pen)
                new_p = torch.zeros_like(in_p)
                new_p[torch.topk(c, n_prune, largest=False).indices] = True
                changed.append(int((in_p & ~new_p).sum()))
                in_p = new_p
            else:
                changed.append(0)
            keep, w_k, loss = cut(gram, cross)
            heldout.append(loss)
            if loss < best[0]:
                best = (loss, ep + 1, snapshot(keep, w_k))
            # the next epoch's Adam steps see the penalized W of the (new) P at the next mu
            if ep + 1 < epochs:
                w, _, _ = step_down(mus[ep + 1])
            w_full = w.to(f32)
    keep, rows, w_k = best[2]
    full = torch.zeros(w0.shape[0], n, dtype=f32, device=device)
    full[:, keep] = w_k
    return ContinuationResult(keep=keep, w_in={k: v[keep] for k, v in rows.items()},
                              w_down=w_k, epochs=best[1], heldout=heldout, mus=mus,
                              shrinkage=shrinkage, changed=changed, w_down_full=full,
                              w_in_full=rows)
