"""Recovery: re-fit the kept MLP weights to the dense layer's output (SPAP_METHOD.md section 4).

After the decision and the least-squares refit of the down projection, the kept input
projections (gate and up, or fc1) are still the dense ones. Recovery minimizes the layer's own
reconstruction loss over them as well,

    L(G, U, W) = ||W (act(G a) * (U a)) + b - y||^2 / ||y||^2        (gated MLPs)
    L(F, W)    = ||W act(F a + c) + b - y||^2 / ||y||^2              (fc1 / fc2 MLPs)

over the calibration tokens a (p, d), y (p, m) the dense layer's output, by alternating
minimization over the blocks:

- `mode="alternating"` (default): each epoch, Adam steps on the input projections with W
  fixed, then the down projection's closed form, the least-squares refit toward the dense
  weights with the layer's held-out ridge (`refit.refit_toward_dense`), from the sufficient
  statistics of the new activations (one pass, chunked);
- `mode="joint"`: Adam steps on all blocks at once.

The number of epochs (0 = keep the refit) is chosen on the held-out calibration windows (the
last `n_val` tokens, token-disjoint from the fit ones): the loss is measured there after every
epoch and the best weights are kept, so recovery never returns a higher held-out error than the
refit it starts from. Everything runs in float32 on minibatches of `batch` tokens (the
activations stay where they are, e.g. on the CPU, and only a minibatch moves), so memory is the
layer's weights, Adam's two moments and one minibatch: never a (tokens, width) tensor beyond
the inputs and targets the caller holds.

Learning rates are relative to each tensor's RMS, so one setting serves every model scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .refit import solve_toward

MODES = ("alternating", "joint")


@dataclass
class RecoveryResult:
    w_in: dict[str, torch.Tensor]  # name -> (k, d), float32
    w_down: torch.Tensor  # (m, k), float32
    epochs: int  # epochs kept (0: the starting weights)
    heldout: list[float] = field(default_factory=list)  # held-out loss after 0, 1, ... epochs


def mlp_forward(a: torch.Tensor, w_in: dict[str, torch.Tensor], w_down: torch.Tensor,
                act: Callable, linear_key: str | None,
                b_in: dict[str, torch.Tensor] | None = None,
                b_down: torch.Tensor | None = None) -> torch.Tensor:
    """The MLP from plain tensors: (p, d) -> (p, m). Gated when `linear_key` names the entry
    that enters linearly (the other entry is the gate); else the single entry is the input
    projection (fc1). `b_in` holds per-channel biases of the entries that have one."""
    return down_input(a, w_in, act, linear_key, b_in) @ w_down.T + (
        b_down if b_down is not None else 0)


def down_input(a, w_in, act, linear_key, b_in=None):
    """X^T, the down projection's input (p, k)."""
    b_in = b_in or {}

    def proj(key):
        z = a @ w_in[key].T
        return z + b_in[key] if key in b_in else z

    if linear_key is not None:
        gate_key = next(k for k in w_in if k != linear_key)
        return act(proj(gate_key)) * proj(linear_key)
    (key,) = w_in
    return act(proj(key))


def recover(
    a: torch.Tensor,
    y: torch.Tensor,
    w_in: dict[str, torch.Tensor],
    w_down: torch.Tensor,
    act: Callable,
    linear_key: str | None,
    n_val: int,
    *,
    b_in: dict[str, torch.Tensor] | None = None,
    b_down: torch.Tensor | None = None,
    w_down_dense: torch.Tensor | None = None,
    ridge: float | None = None,
    epochs: int = 4,
    lr: float = 0.005,
    batch: int = 1024,
    mode: str = "alternating",
    chunk: int = 8192,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> RecoveryResult:
    """Recover the kept weights on tokens a[:p - n_val], y[:p - n_val], choosing the number of
    epochs (0..`epochs`) on the last `n_val` tokens. `w_down_dense` (m, k) and `ridge` define the
    down step of `mode="alternating"` (the refit toward the dense weights; ridge None: exact).
    """
    if mode not in MODES:
        raise ValueError(f"unknown recovery mode '{mode}'; use {' or '.join(MODES)}")
    device = torch.device(device) if device is not None else w_down.device
    f32 = torch.float32
    p = a.shape[0]
    n_fit = p - n_val
    if n_val < 1 or n_fit < 1:
        raise ValueError(f"recovery needs fit and held-out tokens, got {n_fit} and {n_val}")
    params = {k: v.detach().to(device, f32).clone() for k, v in w_in.items()}
    params["__down"] = w_down.detach().to(device, f32).clone()
    b_in_ = {k: v.to(device, f32) for k, v in (b_in or {}).items()}
    b_down_ = b_down.to(device, f32) if b_down is not None else None
    w_dense = w_down_dense.to(device, f32) if w_down_dense is not None else None

    def fwd(ps, aa):
        ins = {k: v for k, v in ps.items() if k != "__down"}
        return mlp_forward(aa, ins, ps["__down"], act, linear_key, b_in_, b_down_)

    def chunks(lo, hi):
        for s in range(lo, hi, chunk):
            e = min(hi, s + chunk)
            yield a[s:e].to(device, f32), y[s:e].to(device, f32)

    y_sq_fit = sum(float((yy * yy).sum()) for _, yy in chunks(0, n_fit)) / n_fit
    y_sq_val = sum(float((yy * yy).sum()) for _, yy in chunks(n_fit, p))

    @torch.no_grad()
    def val_loss(ps):
        tot = 0.0
        for aa, yy in chunks(n_fit, p):
            r = fwd(ps, aa) - yy
            tot += float((r * r).sum())
        return tot / y_sq_val if y_sq_val > 0 else 0.0

    @torch.no_grad()
    def down_step(ps):
        """The down projection's closed form on the fit tokens, toward the dense weights."""
        ins = {k: v for k, v in ps.items() if k != "__down"}
        k = ps["__down"].shape[1]
        gram = torch.zeros(k, k, dtype=torch.float64, device=device)
        cross = torch.zeros(k, y.shape[1], dtype=torch.float64, device=device)
        for aa, yy in chunks(0, n_fit):
            x = down_input(aa, ins, act, linear_key, b_in_)  # (c, k)
            t = yy - b_down_ if b_down_ is not None else yy
            gram += (x.T @ x).double()
            cross += (x.T @ t).double()
        if ridge is None or w_dense is None:  # the exact refit, damped (anchored at zero)
            anchor, lam = torch.zeros_like(cross.T), 0.01
        else:
            anchor, lam = w_dense.double(), ridge
        ps["__down"] = solve_toward(gram, cross, anchor, lam).to(f32)  # (m, k)

    trainable = [k for k in params if k != "__down" or mode == "joint"]
    scale = {k: float(params[k].pow(2).mean().sqrt()) or 1.0 for k in trainable}
    best = (val_loss(params), 0, {k: v.detach().clone() for k, v in params.items()})
    history = [best[0]]
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, n_fit // batch)
    total = steps_per_epoch * max(epochs, 1)
    leaves = {k: params[k].requires_grad_(True) for k in trainable}
    opt = torch.optim.Adam([{"params": [leaves[k]], "lr": lr * scale[k]} for k in trainable])
    base_lr = [g["lr"] for g in opt.param_groups]
    step = 0
    for ep in range(epochs):
        perm = torch.randperm(n_fit, generator=gen)
        for i in range(steps_per_epoch):
            # cosine decay to a tenth of the rate over all epochs
            frac = 0.1 + 0.45 * (1 + math.cos(math.pi * step / total))
            for g, b in zip(opt.param_groups, base_lr):
                g["lr"] = b * frac
            idx = perm[i * batch:(i + 1) * batch]
            aa, yy = a[idx].to(device, f32), y[idx].to(device, f32)
            with torch.enable_grad():
                r = fwd(params, aa) - yy
                loss = (r * r).sum() / (y_sq_fit * idx.numel())
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            step += 1
        if mode == "alternating":
            down_step(params)
        cur = val_loss(params)
        history.append(cur)
        if cur < best[0]:
            best = (cur, ep + 1, {k: v.detach().clone() for k, v in params.items()})
    final = best[2]
    return RecoveryResult(
        w_in={k: v.detach() for k, v in final.items() if k != "__down"},
        w_down=final["__down"].detach(), epochs=best[1], heldout=history,
    )
