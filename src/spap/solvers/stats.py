"""Activation statistics of one MLP layer's intermediate activations X (n channels x p tokens).

The solvers never see activations, only these sums. The n x n Gram matrix H = X X^T is the
expensive one, so it is built only when a solver asks for it. Per-batch products run in the
activations' dtype (fast on an accelerator) and are summed in float64 so that long calibration
runs do not lose precision.

Held-out windows (the last calibration windows, `data.heldout_windows`) count into every sum
and also into a held-out part of each. One rule decides who sees what (`ActStats.fit`):
a decision (which channels, which heads) reads the statistics of the fit windows alone; the
held-out windows then choose the settings of the refit (its ridge, the drift alpha, recovery's
epochs) for a mask they did not help pick; the final refit uses all windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import Shard
from ..errors import SpapError
from ..precision import exact as exact_products


@dataclass
class ActStats:
    """Sums over calibration tokens of the down projection's input X (float64, on `device`)."""

    count: int
    sum: torch.Tensor  # (n,)   sum_t X[:, t]
    sqsum: torch.Tensor  # (n,) sum_t X[:, t]^2
    gram: torch.Tensor | None  # (n, n) sum_t X[:, t] X[:, t]^T, or None when not requested
    # the part of `gram` from the held-out calibration windows (the last ones), so a solver can
    # choose a setting out of sample; None when there are too few windows to hold some out
    gram_heldout: torch.Tensor | None = None
    # the residual drift this layer inherits, for the drift target (None unless asked for)
    drift: DriftStats | None = None
    # the held-out windows' parts of count, sum and sqsum (0 and None when none is held out)
    count_heldout: int = 0
    sum_heldout: torch.Tensor | None = None  # (n,)
    sqsum_heldout: torch.Tensor | None = None  # (n,)

    def fit(self, gram: bool = True, dtype: torch.dtype = torch.float64) -> ActStats:
        """The statistics of the fit windows alone: what every decision reads (the module
        docstring's rule), the held-out parts taken out of each sum. `gram=False` leaves the
        Gram out (score methods need the norms only); `dtype` is the Gram's (float64, or the
        solve dtype, so that no second float64 n x n copy is made). With nothing held out, the
        sums are those of all windows."""
        g = None
        if gram and self.gram is not None:
            g = self.gram.to(dtype, copy=True)  # (n, n)
            if self.gram_heldout is not None:
                g -= self.gram_heldout.to(dtype)
        if self.count_heldout == 0 or self.sum_heldout is None:
            return ActStats(self.count, self.sum, self.sqsum, g)
        return ActStats(self.count - self.count_heldout, self.sum - self.sum_heldout,
                        self.sqsum - self.sqsum_heldout, g)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def var(self) -> torch.Tensor:
        """Per-channel variance over tokens (population, as FLAP's fluctuation)."""
        return (self.sqsum / self.count - self.mean**2).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        """||X_i||_2 over tokens, Wanda's activation norm."""
        return self.sqsum.sqrt()


@dataclass
class DriftStats:
    """Sums over calibration tokens of the drift D = y_dense - y (m per token): the dense
    model's hidden state after this layer minus the layer's output on the pruned model's
    inputs with its dense weights. Since y = residual + W0 x (+ b), the layer's output state
    error of any down projection W is ||(W - W0) x - D||^2, and the drift target of the refit
    is W0 x + alpha D. Like `ActStats.gram`, each sum is over all windows, and its `_heldout`
    part over the held-out windows alone (float64)."""

    cross: torch.Tensor  # (m, n) sum_t D_t x_t^T
    sq: float  # sum_t ||D_t||^2
    out_sq: float  # sum_t ||y_dense_t||^2 (the scale of the relative output error)
    cross_heldout: torch.Tensor | None = None
    sq_heldout: float = 0.0
    out_sq_heldout: float = 0.0


class DriftAccumulator:
    """Accumulates `DriftStats` from per-batch drift D (tokens, m), the down projection's input
    x (tokens, n) of the same tokens and the dense hidden state y_dense (tokens, m).

    `exact` (the float32 path, as earlier runs): each batch's cross term D^T x is a float64
    product. Otherwise (bf16 compute, precision.py) it is a float32 product, exact in its
    inputs' digits and summed in float32 over one batch's tokens only, added across batches
    in float64: a float64 product runs at 1/64 of the float32 rate on most GPUs (the
    consumer and workstation ones) and at half of it on a CPU, for the largest product of a
    layer's collect with the drift target."""

    def __init__(self, m: int, n: int, device: torch.device | str = "cpu", exact: bool = True):
        self.m, self.n = m, n
        self.device = torch.device(device)
        self.exact = exact
        self.sums = [torch.zeros(m, n, dtype=torch.float64, device=self.device), 0.0, 0.0]
        self.held: list | None = None

    def add(self, d: torch.Tensor, x: torch.Tensor, y_dense: torch.Tensor,
            heldout: bool = False) -> None:
        wide = torch.float64 if self.exact else torch.float32
        d = d.detach().reshape(-1, self.m)  # (tokens, m)
        x = x.detach().reshape(-1, self.n)  # (tokens, n)
        y = y_dense.detach().reshape(-1, self.m)  # (tokens, m)
        with exact_products(d.device.type):
            cross = (d.to(wide).T @ x.to(wide)).to(self.device, torch.float64)
        sq, out_sq = float(d.double().pow(2).sum()), float(y.double().pow(2).sum())
        if heldout and self.held is None:
            self.held = [torch.zeros_like(cross), 0.0, 0.0]
        for sums in (self.sums, self.held) if heldout else (self.sums,):
            sums[0] += cross
            sums[1] += sq
            sums[2] += out_sq

    def result(self) -> DriftStats:
        if self.held is None:
            return DriftStats(*self.sums)
        return DriftStats(*self.sums, *self.held)


def gram_of(x: torch.Tensor, xf: torch.Tensor | None = None) -> torch.Tensor:
    """X^T X in float32 for x (tokens, n).

    On CUDA, bfloat16 / float16 activations are multiplied as they are, with float32 output
    (`torch.mm(..., out_dtype=float32)`): products of two half-precision numbers are exact in
    float32 and the tensor cores accumulate in float32, so this equals the float32 product up
    to summation order, at tensor-core speed (the float32 product was most of the calibration
    pass on an H200, bench/results/gpu-*.json). Elsewhere, or where that overload is missing,
    the activations are upcast to float32 first.
    """
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(x.T, x, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    if xf is None:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return xf.T @ xf


class StatsAccumulator:
    """Accumulates `ActStats` from batches of activations shaped (..., n)."""

    def __init__(self, n: int, want_gram: bool, device: torch.device | str = "cpu"):
        self.n = n
        self.want_gram = want_gram
        self.device = torch.device(device)
        self.count = 0
        self.sum = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.sqsum = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.gram = (
            torch.zeros(n, n, dtype=torch.float64, device=self.device) if want_gram else None
        )
        self.gram_heldout: torch.Tensor | None = None
        self.count_heldout = 0
        self.sum_heldout: torch.Tensor | None = None
        self.sqsum_heldout: torch.Tensor | None = None

    def add(self, x: torch.Tensor, heldout: bool = False) -> None:
        """Add a batch; `heldout` batches also count into the held-out parts. A batch of
        windows (batch, seq, n) is added one window at a time: every product then covers the
        same tokens however the windows were batched (or shared between the ranks of a
        data-parallel run), and only the float64 sums' order can change."""
        if x.dim() == 3 and x.shape[0] > 1:
            for w in x:
                self.add(w, heldout)
            return
        x = x.detach().reshape(-1, self.n)  # (tokens, n)
        if not torch.isfinite(x).all():
            raise SpapError(
                "non-finite activations (inf or nan) in the calibration pass; "
                "use --dtype float32 or bfloat16 instead of float16, or check the model weights"
            )
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        s = xf.sum(0).to(self.device, torch.float64)  # (n,)
        sq = (xf * xf).sum(0).to(self.device, torch.float64)  # (n,)
        self.count += x.shape[0]
        self.sum += s
        self.sqsum += sq
        if heldout:
            self.count_heldout += x.shape[0]
            self.sum_heldout = s if self.sum_heldout is None else self.sum_heldout + s
            self.sqsum_heldout = sq if self.sqsum_heldout is None else self.sqsum_heldout + sq
        if self.gram is not None:
            g = gram_of(x, xf).to(self.device)  # (n, n)
            _add_rows(self.gram, g)
            if heldout:
                if self.gram_heldout is None:
                    self.gram_heldout = g.to(torch.float64)
                else:
                    _add_rows(self.gram_heldout, g)

    def result(self, drift: DriftStats | None = None) -> ActStats:
        return ActStats(self.count, self.sum, self.sqsum, self.gram, self.gram_heldout, drift,
                        self.count_heldout, self.sum_heldout, self.sqsum_heldout)


def _add_rows(total: torch.Tensor, part: torch.Tensor, rows: int = 1024) -> None:
    """total += part (float32 into float64) a block of rows at a time: the float64 copy of
    `part` that a mixed-dtype sum makes is a block, never the full n x n (1.6 GB at n =
    14336)."""
    for s in range(0, total.shape[0], rows):
        total[s:s + rows] += part[s:s + rows]


def stats_from_activations(x: torch.Tensor, want_gram: bool = True) -> ActStats:
    """Convenience for tests and small problems: X given as (tokens, n)."""
    acc = StatsAccumulator(x.shape[-1], want_gram, x.device)
    acc.add(x)
    return acc.result()


def _sum_part(shard: Shard, part: torch.Tensor | None,
              like: torch.Tensor | None) -> torch.Tensor | None:
    """`part` summed over ranks, zeros (shaped as `like`) standing in where a rank has none;
    None when no rank has one."""
    if like is None:
        return None
    n_with = shard.sum_float(0.0 if part is None else 1.0, like.device)
    if n_with == 0:
        return None
    return shard.sum_(torch.zeros_like(like) if part is None else part)


def reduce_stats(stats: ActStats, shard: Shard) -> ActStats:
    """`stats` summed over the ranks of a data-parallel run (in place; float64), so every
    rank decides from the statistics of all calibration windows (`distributed.py`)."""
    if not shard.distributed:
        return stats
    dev = stats.sum.device
    stats.count = int(shard.sum_float(float(stats.count), dev))
    for t in (stats.sum, stats.sqsum, stats.gram):
        if t is not None:
            shard.sum_(t)
    # a rank without held-out windows has no held-out part: it adds zeros
    stats.gram_heldout = _sum_part(shard, stats.gram_heldout, stats.gram)
    stats.count_heldout = int(shard.sum_float(float(stats.count_heldout), dev))
    stats.sum_heldout = _sum_part(shard, stats.sum_heldout, stats.sum)
    stats.sqsum_heldout = _sum_part(shard, stats.sqsum_heldout, stats.sqsum)
    d = stats.drift
    if d is not None:
        shard.sum_(d.cross)
        d.cross_heldout = _sum_part(shard, d.cross_heldout, d.cross)
        floats = torch.tensor([d.sq, d.out_sq, d.sq_heldout, d.out_sq_heldout],
                              dtype=torch.float64, device=dev)
        d.sq, d.out_sq, d.sq_heldout, d.out_sq_heldout = shard.sum_(floats).tolist()
    return stats
