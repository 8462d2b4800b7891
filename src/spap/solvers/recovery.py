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
refit it starts from.

Pieces that make it stronger, each an argument (all off by default; bench/layer_lab.py
measures each on real layers):

- `steps`: Adam steps per epoch whatever the token count. An epoch is still one pass over the
  fit tokens, cut into at least `steps` minibatches (at most `batch` tokens each), so with few
  tokens the minibatches get smaller rather than the steps fewer (at 16 x 512 tokens and
  `batch=1024`, the plain rule takes 7 steps per epoch). The cost of an epoch is unchanged.
- `patience`: stop once the held-out loss has not improved for this many epochs (0: run all
  `epochs`), so `epochs` becomes a time knob: an upper bound that is only spent while it pays.
- `shrink`: fractions t of the recovered update of the input projections to try,
  G(t) = G_start + t (G_best - G_start), G_best the best epoch >= 1 (even when no epoch beat
  the start: part of its update may), each with its own closed-form down projection on the
  fit tokens; the t with the lowest held-out loss is kept (t = 0, the start, and t = 1, the
  recovered weights, are always candidates, so it is never worse than either). This is
  shrinkage of gate and up toward their dense values, its strength chosen out of sample.
- `final_refit`: once everything above is chosen, the down projection is solved once more on
  all tokens, fit and held-out, with the same ridge, as the refit without recovery is (the
  held-out windows then return to the final weights; nothing is chosen after this step).
- `rerun`: once the held-out windows have chosen the number of epochs, recovery runs those
  epochs once more from the start, at the same rates, on all tokens (every rank's fit tokens,
  then every rank's held-out ones, one process's order), the down projection's closed form
  on all of them too: the held-out windows choose the setting and then return to the fit, as
  with the refit's ridge. The choice (epochs, held-out losses) is that of the run without it;
  the cost is a second pass over the chosen epochs.
- `out_root`: R (m, m), the root of an output weighting (weighting.py): the loss becomes
  ||(W h + b - y) R||^2 / ||y R||^2, for the Adam steps and for every held-out choice (epochs,
  shrinkage), so gate and up are fit to the output directions the model's loss is sensitive
  to. The down projection's closed form is left unweighted: for a fixed input it minimizes
  the weighted loss too (weighting.py), so only the input projections see the weighting.

Precision (`compute`, see precision.py): float32 runs everything in float32 with the closed
form's products in float64, as earlier runs did, bit for bit. bfloat16 runs the products of
the Adam steps' forward and backward passes and of the held-out losses under autocast (the
weights Adam updates stay float32: its master weights), and forms the closed form's input x in
bf16; the Gram and cross term of the closed form are then multiplied from bf16 operands with
float32 accumulation and output (on CUDA by `torch.mm(..., out_dtype=float32)`, on the CPU in
oneDNN's bf16 math mode, `precision.bf16_products`) and added across chunks in float64, as
every sum here is. Products of bf16 numbers are exact in float32, so the Gram loses what
rounding x to bf16 loses and float32 round-off inside one product, never its accumulation
across products (the cross term also rounds y - b_down to bf16, as the pipeline's autocast
forwards already do to the dense targets). Each product covers a group of whole calibration
windows (`window`, a window's token count; as many as fit in `PRODUCT_TOKENS`), counted from
a rank's first token, so that where every rank's share is whole groups a data-parallel run
multiplies the same tokens together as one process and only the order of the float64 sums
changes; otherwise the products differ from one process's by float32 round-off. (One window
per product would make every share exact, but adding each window's (k, k) float32 product
into the float64 sum, a pass over memory, then costs more than the product: these sums took
1.8x as long at Qwen2.5-0.5B's shapes on one CPU thread and 2.1x at Llama-3.2-1B's,
bench/labs/product_groups.py.)

Everything runs on minibatches of `batch` tokens (the activations stay where they
are, e.g. on the CPU, and only a minibatch moves), so memory is the
layer's weights, Adam's two moments and one minibatch: never a (tokens, width) tensor beyond
the inputs and targets the caller holds.

Learning rates are relative to each tensor's RMS, so one setting serves every model scale.

In a data-parallel run (`shard`, see distributed.py) each rank holds its own share of the
tokens, fit and held-out; every sum (losses, the closed form's Gram and cross term) is
summed over ranks in float64, and every rank draws the same permutation of all fit tokens,
as one process draws it, so every rank has the same minibatches and takes the same number
of steps. How the Adam steps are shared (`parallel`):

- "split" (default): each rank computes the loss and its gradients on the rows of each
  minibatch that it holds (no rows move between ranks), the loss divided by the whole
  minibatch's token count; the gradients are summed over ranks (one all-reduce per step)
  and every rank takes the same Adam step, so the weights stay the same on every rank and
  equal one process's up to the order of the additions in the gradients. Each rank does
  about 1/N of the steps' work. With float32 products the weights moved by about 1e-7 from
  one process's on a test layer; with bf16 products each rank's part of a gradient is
  rounded on its own (about 4e-3 there), and Adam, which divides each step by the
  gradient's own size, carries such differences on, so a deep model's later layers may
  choose other channels than one process.
- "exact": every rank contributes the rows of the minibatch that it holds, at their places
  in it (zeros elsewhere), and one all-reduce gives every rank the whole minibatch in one
  process's order (`_gather_rows`): each rank then takes exactly one process's Adam step,
  the same bits, but the steps are not split (every rank does all of them).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..distributed import LOCAL, Shard
from ..precision import autocast, bf16_products
from .refit import solve_toward

MODES = ("alternating", "joint")
PARALLEL = ("split", "exact")  # how a data-parallel run shares the Adam steps (module docstring)


@dataclass
class RecoveryResult:
    w_in: dict[str, torch.Tensor]  # name -> (k, d), float32
    w_down: torch.Tensor  # (m, k), float32
    epochs: int  # epochs kept (0: the starting weights)
    heldout: list[float] = field(default_factory=list)  # held-out loss after 0, 1, ... epochs
    # the shrinkage toward the start: {"chosen": t, "heldout": {t: loss}}; empty when off
    shrink: dict = field(default_factory=dict)
    # seconds per step: Adam steps, closed-form down steps, held-out losses (PhaseTimer)
    seconds: dict[str, float] = field(default_factory=dict)


class PhaseTimer:
    """Seconds spent per named phase (`with timer("name"): ...`); on CUDA each phase ends with
    a synchronize, so the queued kernels count where they were issued (one sync per phase, not
    per step)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


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
    steps: int = 0,
    patience: int = 0,
    shrink: Sequence[float] = (),
    final_refit: bool = False,
    out_root: torch.Tensor | None = None,
    shard: Shard = LOCAL,
    rerun: bool = False,
    compute: torch.dtype = torch.float32,
    window: int = 0,
    parallel: str = "exact",
) -> RecoveryResult:
    """Recover the kept weights on tokens a[:p - n_val], y[:p - n_val], choosing the number of
    epochs (0..`epochs`) on the last `n_val` tokens. `w_down_dense` (m, k) and `ridge` define the
    down step of `mode="alternating"` (the refit toward the dense weights; ridge None: exact).
    `steps`, `patience`, `shrink`, `final_refit`, `rerun` and `out_root` are the pieces of
    the module docstring; `compute` the dtype of the products and `window` the tokens per
    calibration window (module docstring; 0: unknown, products over whole chunks).
    `parallel`: in a data-parallel run, "split" (each rank's rows of every minibatch, the
    gradients summed over ranks) or "exact" (one process's steps on every rank, bit for bit).
    """
    if mode not in MODES:
        raise ValueError(f"unknown recovery mode '{mode}'; use {' or '.join(MODES)}")
    if parallel not in PARALLEL:
        raise ValueError(f"unknown recovery_parallel '{parallel}'; use "
                         f"{' or '.join(PARALLEL)}")
    device = torch.device(device) if device is not None else w_down.device
    f32 = torch.float32
    data = LayerTokens(a, y, n_val, device, chunk, shard, b_down, out_root, compute=compute,
                       window=window)
    timer = PhaseTimer(device)
    p, n_fit, n_fit_all = data.p, data.n_fit, data.n_fit_all
    params = {k: v.detach().to(device, f32).clone() for k, v in w_in.items()}
    params["__down"] = w_down.detach().to(device, f32).clone()
    b_in_ = {k: v.to(device, f32) for k, v in (b_in or {}).items()}
    b_down_ = data.b_down
    w_dense = w_down_dense.to(device, f32) if w_down_dense is not None else None

    def fwd(ps, aa):
        ins = {k: v for k, v in ps.items() if k != "__down"}
        return mlp_forward(aa, ins, ps["__down"], act, linear_key, b_in_, b_down_)

    def val_loss(ps):
        with timer("heldout"):
            return data.val_loss(lambda aa: fwd(ps, aa))

    @torch.no_grad()
    def down_step(ps, hi=n_fit):
        """The down projection's closed form on tokens [0, hi) (the fit tokens unless told),
        toward the dense weights."""
        ins = {k: v for k, v in ps.items() if k != "__down"}
        with timer("down"):
            gram, cross = data.down_sums(lambda aa: down_input(aa, ins, act, linear_key,
                                                               b_in_), hi)
            if ridge is None or w_dense is None:  # the exact refit, damped (anchored at zero)
                anchor, lam = torch.zeros_like(cross.T), 0.01
            else:
                anchor, lam = w_dense.double(), ridge
            ps["__down"] = solve_toward(gram, cross, anchor, lam).to(f32)  # (m, k)

    if rerun and shrink:
        raise ValueError("recovery's rerun on all tokens replays the chosen epochs, which "
                         "shrinkage then changes; use one of rerun and shrink")
    if steps < 0 or patience < 0:
        raise ValueError(f"recovery steps and patience must be >= 0, got {steps}, {patience}")
    trainable = [k for k in params if k != "__down" or mode == "joint"]
    scale = {k: float(params[k].pow(2).mean().sqrt()) or 1.0 for k in trainable}
    start = {k: v.detach().clone() for k, v in params.items()}
    best = (val_loss(params), 0, start)
    history = [best[0]]
    gen = torch.Generator().manual_seed(seed)
    if steps == 0:  # the plain rule: minibatches of `batch` tokens
        steps_per_epoch, mb = max(1, n_fit_all // batch), batch
    else:  # one pass over the fit tokens in at least `steps` minibatches of at most `batch`
        steps_per_epoch = max(steps, math.ceil(n_fit_all / batch))
        mb = max(1, n_fit_all // steps_per_epoch)
    total = steps_per_epoch * max(epochs, 1)

    def adam(ps):
        leaves = {k: ps[k].requires_grad_(True) for k in trainable}
        groups = [{"params": [leaves[k]], "lr": lr * scale[k]} for k in trainable]
        if compute == f32:  # (the float32 path as it was, bit for bit)
            return torch.optim.Adam(groups)
        # one fused kernel per step for all groups (CPU and CUDA), not a loop over tensors
        return torch.optim.Adam(groups, fused=True)

    def train_epoch(ps, opt, tokens, mb_, fracs):
        """One pass over `tokens`' fit rows in len(fracs) minibatches of `mb_`, step i at
        Adam's rate times fracs[i]."""
        n_all = tokens.n_fit_all
        # (the permutation of the whole epoch drawn at once, on the CPU's generator, so the
        # order of the minibatches does not depend on the device)
        perm = torch.randperm(n_all, generator=gen)
        if len(fracs) * mb_ > n_all:  # few tokens: several passes
            perm = torch.cat([perm] + [torch.randperm(n_all, generator=gen) for _ in
                                       range(math.ceil(len(fracs) * mb_ / n_all) - 1)])
        perm = perm[:len(fracs) * mb_]
        split = parallel == "split" and tokens.shard.distributed
        if split:  # this rank's rows of every minibatch, at their local places
            own, counts = tokens.own_rows(perm, mb_)
            ends = [0, *itertools.accumulate(counts)]
        elif not tokens.shard.distributed:  # (one copy per epoch, not an index copy per step)
            perm = perm.to(tokens.a.device)
        groups = list(zip(opt.param_groups, (lr * scale[k] for k in trainable)))
        leaves = [ps[k] for k in trainable]
        for i, frac in enumerate(fracs):
            for g, base in groups:
                g["lr"] = base * frac
            if split:
                aa, yy = tokens.rows(own[ends[i]:ends[i + 1]])
            else:
                aa, yy = tokens.minibatch(perm[i * mb_:(i + 1) * mb_])
            with torch.enable_grad():
                with autocast(device.type, compute):
                    out = fwd(ps, aa)
                r = tokens.weigh(out.float() - yy)
                # (over the whole minibatch's tokens: the ranks' losses add up to its loss)
                loss = (r * r).sum() / (tokens.y_sq_fit * mb_)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            if split:  # the whole minibatch's gradient on every rank: the same step
                tokens.shard.sum_all_([t.grad for t in leaves])
            opt.step()

    def rates(ep):
        """Epoch ep's rates: a cosine decay to a tenth of the rate over all epochs."""
        return [0.1 + 0.45 * (1 + math.cos(math.pi * (ep * steps_per_epoch + i) / total))
                for i in range(steps_per_epoch)]

    opt = adam(params)
    recovered = None  # (loss, epoch, weights) of the best epoch >= 1, for the shrinkage
    for ep in range(epochs):
        with timer("adam"):
            train_epoch(params, opt, data, mb, rates(ep))
        if mode == "alternating":
            down_step(params)
        cur = val_loss(params)
        history.append(cur)
        if shrink and (recovered is None or cur < recovered[0]):
            recovered = (cur, ep + 1, {k: v.detach().clone() for k, v in params.items()})
        if cur < best[0]:
            best = (cur, ep + 1, recovered[2] if shrink else
                    {k: v.detach().clone() for k, v in params.items()})
        elif patience and ep + 1 - best[1] >= patience:
            break  # held-out early stopping: no gain for `patience` epochs
    final = best[2]
    shrink_info: dict[str, float] = {}
    if shrink and recovered is not None:
        # from the best recovered epoch, even when none beat the start: a part of its update
        # may still do better than the start
        final, shrink_info = _shrink(recovered[2], start, recovered[0], history[0], shrink,
                                     down_step, val_loss)
        best = ((history[0], 0, start) if shrink_info["chosen"] == 0.0 else
                (min(shrink_info["heldout"].values()), recovered[1], final))
    if rerun and best[1] > 0:
        # the chosen epochs, at their rates, once more from the start on all tokens
        every = LayerTokens(a, y, n_val, device, chunk, shard, b_down, out_root, every=True,
                            compute=compute, window=window)
        mb_all = max(1, every.n_fit_all // steps_per_epoch)
        ps = {k: v.detach().clone() for k, v in start.items()}
        opt = adam(ps)
        for ep in range(best[1]):
            with timer("adam"):
                train_epoch(ps, opt, every, mb_all, rates(ep))
            if mode == "alternating":
                down_step(ps, hi=p)
        final = {k: v.detach() for k, v in ps.items()}
    if final_refit and best[1] > 0 and not (rerun and mode == "alternating"):
        # (after the rerun's alternating epochs the down projection is that solve already)
        # the held-out windows return to the final down projection, as in the plain refit
        final = {k: v.detach().clone() for k, v in final.items()}
        down_step(final, hi=p)
    return RecoveryResult(
        w_in={k: v.detach() for k, v in final.items() if k != "__down"},
        w_down=final["__down"].detach(), epochs=best[1], heldout=history,
        shrink=shrink_info, seconds=timer.seconds,
    )


#: the tokens a product of the closed form's sums covers at most (in whole windows): float32
#: accumulation over this many tokens, float64 across products
PRODUCT_TOKENS = 4096


class LayerTokens:
    """One layer problem's tokens on this rank (fit rows first, then the last `n_val` held-out
    ones) and the float64 sums over all ranks that recovery's steps take of them: the
    squared norms of the targets, a held-out loss, the down projection's Gram and cross
    term; and of a minibatch of all ranks' fit tokens, this rank's rows (`own_rows`, for
    parallel="split") or all of them on every rank (`minibatch`). With `root` (m, m) the
    norms and losses are of outputs weighted by it (`weigh`); the Gram and cross term are
    not. `compute`: the dtype of the products, `window` the tokens per calibration window
    (the module docstring's precision)."""

    def __init__(self, a, y, n_val, device, chunk, shard: Shard = LOCAL, b_down=None,
                 root=None, every=False, compute: torch.dtype = torch.float32,
                 window: int = 0):
        self.a, self.y, self.device, self.chunk, self.shard = a, y, device, chunk, shard
        self.compute = compute
        self.window = window if window > 0 else chunk
        # the tokens of one product: whole windows (module docstring), as many as fit in
        # PRODUCT_TOKENS (a window unknown: a chunk); a chunk is whole groups
        self.group = (max(1, PRODUCT_TOKENS // window) * window if window > 0 else chunk)
        if compute != torch.float32:
            self.chunk = max(1, chunk // self.group) * self.group
        self.root = root.to(device, torch.float32) if root is not None else None
        self.p = a.shape[0]
        self.n_fit = self.p - n_val
        # this rank's fit tokens are [fit_lo, fit_lo + n_fit) of all ranks' fit tokens
        self.fit_lo, self.n_fit_all = shard.offset(self.n_fit, device)
        n_val_all = shard.sum_float(float(n_val), device)
        if n_val_all < 1 or self.n_fit_all < 1:
            raise ValueError(f"recovery needs fit and held-out tokens, got {self.n_fit_all} "
                             f"and {int(n_val_all)}")
        # every=True: the tokens to fit are all of them, all ranks' fit tokens first, then all
        # ranks' held-out ones (the order of one process's rows)
        self.every = every
        self.n_fit_only = self.n_fit_all
        if every:  # this rank's held-out tokens start at val_lo of all ranks' held-out ones
            self.val_lo = shard.offset(n_val, device)[0]
            self.n_fit_all += int(n_val_all)
        self.b_down = b_down.to(device, torch.float32) if b_down is not None else None
        self.y_sq_fit = shard.sum_float(sum(_sq(self.weigh(yy)) for _, yy in self.chunks(
            0, self.p if every else self.n_fit)), device) / self.n_fit_all
        self.y_sq_val = shard.sum_float(sum(_sq(self.weigh(yy)) for _, yy in
                                            self.chunks(self.n_fit, self.p)), device)

    def weigh(self, t: torch.Tensor) -> torch.Tensor:
        """Outputs (c, m) in the weighted norm: t R (R symmetric), or t itself."""
        return t if self.root is None else t @ self.root

    def chunks(self, lo, hi):
        for s in range(lo, hi, self.chunk):
            yield self.rows(slice(s, min(hi, s + self.chunk)))

    def groups(self, hi):
        """Rows [0, hi) in chunks (start, end, groups): chunks of at most `chunk` rows counted
        from the first fit row, then from the first held-out row; groups the product groups
        [(s, e), ...] relative to the chunk's start, `group` rows each. With bf16 products a
        chunk is whole groups, so the groups do not depend on the chunk size."""
        for seg_lo, seg_hi in ((0, min(hi, self.n_fit)), (self.n_fit, hi)):
            for s in range(seg_lo, seg_hi, self.chunk):
                c = min(seg_hi, s + self.chunk) - s
                yield s, s + c, [(g, min(c, g + self.group)) for g in range(0, c, self.group)]

    @torch.no_grad()
    def val_loss(self, predict: Callable) -> float:
        """||predict(a) - y||^2 / ||y||^2 over the held-out tokens of every rank (both
        weighted by `root` when there is one)."""
        tot = 0.0
        for aa, yy in self.chunks(self.n_fit, self.p):
            with autocast(self.device.type, self.compute):
                out = predict(aa)
            tot += _sq(self.weigh(out.float() - yy))
        tot = self.shard.sum_float(tot, self.device)
        return tot / self.y_sq_val if self.y_sq_val > 0 else 0.0

    @torch.no_grad()
    def down_sums(self, x_of: Callable, hi: int | None = None):
        """G = sum x x^T (k, k) and C = sum x (y - b_down)^T (k, m) in float64 over tokens
        [0, hi) of every rank (the fit tokens unless told), x = x_of(a) the down projection's
        input (c, k)."""
        hi = self.n_fit if hi is None else hi
        k = x_of(self.a[:0].to(self.device, torch.float32)).shape[1]
        gram = torch.zeros(k, k, dtype=torch.float64, device=self.device)
        cross = torch.zeros(k, self.y.shape[1], dtype=torch.float64, device=self.device)
        if self.compute == torch.float32:
            for aa, yy in self.chunks(0, hi):
                t = yy - self.b_down if self.b_down is not None else yy
                x = x_of(aa)  # (c, k)
                x, t = x.double(), t.double()  # (products in float64, as the sums: see _sq)
                gram += x.T @ x
                cross += x.T @ t
        else:
            with bf16_products(self.device.type):
                for lo, up, spans in self.groups(hi):
                    aa, yy = self.rows(slice(lo, up))
                    t = yy - self.b_down if self.b_down is not None else yy
                    with autocast(self.device.type, self.compute):
                        x = x_of(aa)  # (c, k), in bf16
                    for s, e in spans:  # products per group of windows
                        g, c = chunk_products(x[s:e], t[s:e])
                        gram.add_(g)  # (float64 across groups: float32 + float64 in float64)
                        cross.add_(c)
        self.shard.sum_(gram)
        self.shard.sum_(cross)
        return gram, cross

    def own_rows(self, perm: torch.Tensor, mb: int) -> tuple[torch.Tensor, list[int]]:
        """This rank's rows of the minibatches perm[i mb:(i + 1) mb] of all ranks' tokens (as
        `minibatch` numbers them): their local indices, minibatch after minibatch, on the
        device that holds the tokens, and how many each minibatch has. Worked out once per
        epoch on the CPU, so a step costs no index copy and no device sync."""
        mine = (perm >= self.fit_lo) & (perm < self.fit_lo + self.n_fit)
        local = perm - self.fit_lo
        if self.every:
            j = perm - self.n_fit_only - self.val_lo  # among this rank's held-out tokens
            val = (j >= 0) & (j < self.p - self.n_fit)
            local = torch.where(val, self.n_fit + j, local)
            mine = mine | val
        counts = mine.view(-1, mb).sum(1).tolist()
        return local[mine].to(self.a.device), counts

    def rows(self, local: torch.Tensor | slice):
        """This rank's rows `local` (indices or a slice) of a and y, in float32 on the
        device."""
        return (self.a[local].to(self.device, torch.float32),
                self.y[local].to(self.device, torch.float32))

    def minibatch(self, idx: torch.Tensor):
        """Rows `idx` of all ranks' fit tokens (with `every`, of all ranks' fit tokens then
        all ranks' held-out ones), on every rank, in idx's order."""
        if self.shard.distributed:
            mine = (idx >= self.fit_lo) & (idx < self.fit_lo + self.n_fit)
            local = torch.where(mine, idx - self.fit_lo, 0)
            if self.every:
                j = idx - self.n_fit_only - self.val_lo  # among this rank's held-out tokens
                val = (j >= 0) & (j < self.p - self.n_fit)
                local = torch.where(val, self.n_fit + j, local)
                mine = mine | val
            return _gather_rows(self.a, self.y, idx, mine, local, self.shard, self.device)
        return self.a[idx].to(self.device, torch.float32), self.y[idx].to(self.device,
                                                                          torch.float32)


def chunk_products(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x^T x (k, k) and x^T t (k, m) of one chunk in float32, for x (c, k) in bf16 and t (c, m).
    On CUDA the bf16 operands are multiplied as they are with float32 output (exact products,
    float32 accumulation, tensor-core speed); elsewhere they are upcast first, for float32
    products (on bf16 units inside `precision.bf16_products`): a bf16 product with bf16 output
    would round every entry of the Gram to 8 bits."""
    if x.is_cuda:
        try:
            return (torch.mm(x.T, x, out_dtype=torch.float32),
                    torch.mm(x.T, t.to(x.dtype), out_dtype=torch.float32))
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    xf = x.float()
    return xf.T @ xf, xf.T @ t.float()


def _sq(t):  # float64 sums: only their order depends on how the tokens are chunked
    return float(t.double().pow(2).sum())


@torch.no_grad()
def _gather_rows(a: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, mine: torch.Tensor,
                 local: torch.Tensor, shard: Shard, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `idx` (of all ranks' tokens, in order) of a and y on every rank, in idx's order:
    each rank writes the rows it holds (`mine` (b,), at its own rows `local` (b,)) into zeros
    and one sum over ranks fills the rest; x + 0 is exact, so the rows are the ranks' own
    bits."""
    f32 = torch.float32
    local = local[mine]
    rows = mine.to(device)
    both = torch.zeros(idx.numel(), a.shape[1] + y.shape[1], dtype=f32, device=device)
    both[rows, :a.shape[1]] = a[local].to(device, f32)
    both[rows, a.shape[1]:] = y[local].to(device, f32)
    shard.sum_(both)
    return both[:, :a.shape[1]], both[:, a.shape[1]:]


@torch.no_grad()
def _shrink(best, start, best_loss, start_loss, grid, down_step, val_loss):
    """The held-out choice of t in G(t) = G_start + t (G_best - G_start) over the input
    projections, each t with its own closed-form down projection on the fit tokens; t = 0 and
    t = 1 are the start and the recovered weights, with their known held-out losses. Returns
    the chosen weights and {"chosen": t, "heldout": {t: loss}}."""
    losses = {0.0: start_loss, 1.0: best_loss}
    weights = {0.0: start, 1.0: best}
    for t in sorted({float(t) for t in grid} - {0.0, 1.0}):
        if t < 0:
            raise ValueError(f"recovery shrink fractions must be >= 0, got {t}")
        ps = {k: start[k] + t * (best[k] - start[k]) for k in best if k != "__down"}
        ps["__down"] = best["__down"].clone()
        down_step(ps)
        losses[t] = val_loss(ps)
        weights[t] = ps
    chosen = min(losses, key=lambda t: (losses[t], abs(t - 1.0)))
    return weights[chosen], {"chosen": chosen, "heldout": {str(t): v for t, v in
                                                           sorted(losses.items())}}
