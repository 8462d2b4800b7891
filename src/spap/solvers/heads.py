"""Which attention heads to keep, and the new output projection: tensors in, decision out.

The input of o_proj is the concatenation of the heads' outputs, so removing query head h
removes the block of head_dim columns [h*hd, (h+1)*hd) of W = o_proj.weight (m, H*hd), and
the kept columns can be refit from the Gram matrix G = sum x x^T of o_proj's input exactly as
the MLP's down projection is (SPAP_METHOD.md section 2, `refit.py`), block by block:

- error of removing the column set P with the best refit:  1/2 tr(W_P (Hinv_PP)^-1 W_P^T)
- OBS step, removing block B from the current W and Hinv (block Schur complement):
      cost_B = 1/2 tr(W_B (Hinv_BB)^-1 W_B^T)
      W    <- W    - W_B (Hinv_BB)^-1 Hinv_B:
      Hinv <- Hinv - Hinv_:B (Hinv_BB)^-1 Hinv_B:
  so the costs of the steps add up to the closed-form error of the final set (tested).

Grouped-query attention constrains the choice: query head h reads KV head h // r (r = H /
n_kv), and a saved config has one head count, so every kept KV group keeps the same number of
query heads. Greedy OBS removes, among the heads of the groups still above that number, the
one of least cost (`obs_heads`); `search="exact"` enumerates every feasible subset (small
problems, and the tests' oracle). Whole KV groups are removed the same way first, with blocks
of r * hd columns (a group's query heads together).

Baselines, with their published head scores (FLAP, An et al. 2024, lib/prune.py; per head
the channel scores are summed over the head's head_dim columns of o_proj):
- wanda-sp: sum_j |W[j, i]| * ||X_i||  (FLAP's `prune_wanda_sp`: the mean over j, the same
  ranking);
- flap: (var(X_i) * ||W[:, i]||^2)^2, the fluctuation metric squared for attention as FLAP
  does, with its bias compensation b += W_P mean(X_P);
- magnitude: ||W[:, i]||_2 (FLAP's `prune_magnitude_sp`: o_proj's column norms).
KV groups are ranked by the sum of their heads' scores. As published, these keep the dense
columns unless `update` asks for the refit.

The refit of the kept columns is the shared one (`RefitOptions.refit_kept`: exact, or ridge
toward the dense weights chosen on the held-out windows), called with the kept heads expanded
to their columns. Everything runs in float64.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SpapError
from .base import top_k_keep
from .flap import _rel_error_with_shift
from .refit import (
    RefitOptions,
    complement,
    damp,
    mask_error,
    refit_down,
    relative_error,
    scatter_columns,
    spd_inverse,
    spd_solve,
)
from .stats import ActStats

HEAD_METHODS = ("obs", "wanda-sp", "flap", "magnitude")
SEARCHES = ("greedy", "exact")


@dataclass(frozen=True)
class HeadLayout:
    """n_heads query heads of head_dim, in n_kv KV groups of consecutive heads."""

    n_heads: int
    n_kv: int
    head_dim: int

    def __post_init__(self) -> None:
        if min(self.n_heads, self.n_kv, self.head_dim) < 1 or self.n_heads % self.n_kv:
            raise SpapError(f"{self.n_heads} query heads do not split into {self.n_kv} KV "
                            "groups of equal size")

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv

    @property
    def width(self) -> int:
        return self.n_heads * self.head_dim

    def columns(self, heads: torch.Tensor) -> torch.Tensor:
        """o_proj's input columns of `heads`, in head order: (len(heads) * head_dim,)."""
        heads = torch.as_tensor(heads, dtype=torch.long)
        offsets = torch.arange(self.head_dim, device=heads.device)
        return (heads[:, None] * self.head_dim + offsets).flatten()

    def heads_of(self, groups: torch.Tensor) -> torch.Tensor:
        """The query heads of KV groups `groups`, sorted: (len(groups) * group_size,)."""
        groups = torch.as_tensor(groups, dtype=torch.long)
        r = self.group_size
        return torch.sort((groups[:, None] * r + torch.arange(r, device=groups.device))
                          .flatten()).values


def _removed(fraction: float, n: int) -> int:
    """round(fraction * n), halves up (Python's round takes 0.5 to 0)."""
    return math.floor(fraction * n + 0.5)


def keep_counts(layout: HeadLayout, heads: float = 0.0, kv_groups: float = 0.0
                ) -> tuple[int, int]:
    """(query heads kept per KV group, KV groups kept) for removal fractions `heads` of every
    group's query heads and `kv_groups` of the KV groups: r - round(heads * r) and
    n_kv - round(kv_groups * n_kv), halves rounded up. Without grouping (one query head per
    KV head) a query head is a whole group, so `heads` then removes that share of the groups
    left by `kv_groups`. SpapError where a fraction removes nothing, everything, or cannot
    apply (KV groups of a model with one)."""
    for name, x in (("heads", heads), ("kv_groups", kv_groups)):
        if not 0.0 <= x < 1.0:
            raise SpapError(f"--{name.replace('_', '-')} must be in [0, 1), got {x}")
    r, n_kv = layout.group_size, layout.n_kv
    if kv_groups > 0 and n_kv == 1:
        raise SpapError("--kv-groups removes whole KV heads, but this model has a single KV "
                        f"group ({layout.n_heads} query heads share one KV head); use --heads")
    gone_kv = _removed(kv_groups, n_kv)
    if kv_groups > 0 and gone_kv == 0:
        raise SpapError(f"--kv-groups {kv_groups} removes none of the {n_kv} KV groups: it "
                        f"moves in steps of {1 / n_kv:.3g}")
    if gone_kv >= n_kv:
        raise SpapError(f"--kv-groups {kv_groups} removes all {n_kv} KV groups; use at most "
                        f"{(n_kv - 1) / n_kv:.3g}")
    keep_q, keep_kv = r, n_kv - gone_kv
    if heads > 0:
        # without grouping each query head is its own KV group, removed as one
        pool = r if r > 1 else keep_kv
        gone = _removed(heads, pool)
        what = "of every KV group" if r > 1 else "left in a layer"
        if gone == 0:
            raise SpapError(f"--heads {heads} removes none of the {pool} query heads {what}: "
                            f"it moves in steps of {1 / pool:.3g}")
        if gone >= pool:
            raise SpapError(f"--heads {heads} removes all {pool} query heads {what}; use at "
                            f"most {(pool - 1) / pool:.3g}"
                            + (", or --kv-groups to remove whole groups" if r > 1 else ""))
        if r > 1:
            keep_q = r - gone
        else:
            keep_kv -= gone
    return keep_q, keep_kv


@dataclass
class HeadProblem:
    """One attention output projection: out = W x + b over o_proj's inputs x (H*hd)."""

    w_o: torch.Tensor  # (m, H*hd)
    stats: ActStats  # of o_proj's input; gram (H*hd, H*hd) and gram_heldout as collected
    layout: HeadLayout
    b_o: torch.Tensor | None = None  # (m,)


@dataclass
class HeadDecision:
    """Kept query heads and KV heads (sorted), and o_proj over the kept heads' columns."""

    keep_heads: torch.Tensor  # (k,) int64
    keep_kv: torch.Tensor  # (g,) int64
    w_o: torch.Tensor  # (m, k*hd) float64
    b_o: torch.Tensor | None = None  # (m,) new bias, None when unchanged
    info: dict[str, Any] = field(default_factory=dict)


def decision_error(problem: HeadProblem, decision: HeadDecision, stats: ActStats) -> float:
    """||o_new(x) - o_dense(x)||^2 / ||o_dense(x)||^2 over the tokens whose o_proj-input
    statistics are `stats` (the calibration ones, or held-out probe windows'), from their
    Gram (and their mean where the decision shifts the bias)."""
    w0 = problem.w_o.to(torch.float64)
    lay = problem.layout
    cols = lay.columns(decision.keep_heads).to(w0.device)
    w = decision.w_o.to(w0)
    if decision.b_o is None:
        return relative_error(w0, scatter_columns(w, cols, lay.width), stats.gram.to(w0))
    shift = decision.b_o.to(w0) - (problem.b_o.to(w0) if problem.b_o is not None else 0)
    return _rel_error_with_shift(w0, w, cols, shift, stats)


def _check_keep(layout: HeadLayout, keep_per_group: int, kv_keep: int) -> None:
    if not 1 <= kv_keep <= layout.n_kv:
        raise SpapError(f"cannot keep {kv_keep} of {layout.n_kv} KV groups: keep at least one")
    if not 1 <= keep_per_group <= layout.group_size:
        raise SpapError(f"keeping {keep_per_group} of the {layout.group_size} query heads of "
                        "every KV group would leave a group empty or overfull; keep 1 to "
                        f"{layout.group_size}, or remove whole groups with --kv-groups")


# ---- OBS over head blocks -----------------------------------------------------------------
def _block_costs(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """cost_B = 1/2 tr(W_B (Hinv_BB)^-1 W_B^T) for every block, cols (c, b): (c,)."""
    wb = w[:, cols].permute(1, 2, 0)  # (c, b, m) = W_B^T per block
    a = hinv[cols[:, :, None], cols[:, None, :]]  # (c, b, b) = Hinv_BB
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info != 0).any()):
        x = torch.linalg.solve(a, wb)
    else:
        x = torch.cholesky_solve(wb, chol)  # (c, b, m) = Hinv_BB^-1 W_B^T
    return 0.5 * (wb * x).sum((1, 2))


def _remove_block(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> None:
    """The OBS update and block Schur downdate of W and Hinv for removing columns `cols`, in
    place; the removed rows and columns end at exactly zero."""
    s = spd_solve(hinv[cols][:, cols], hinv[cols])  # (b, n) = Hinv_BB^-1 Hinv_B:
    w -= w[:, cols] @ s  # (m, n)
    hinv -= hinv[:, cols] @ s  # (n, n)
    w[:, cols] = 0
    hinv[cols] = 0
    hinv[:, cols] = 0


def _remove_cheapest(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor,
                     costs: list[float]) -> int:
    """One greedy OBS step over candidate blocks `cols` (c, b): remove the block of least
    cost (in place), append its cost; returns its index among the candidates."""
    c = _block_costs(w, hinv, cols.to(w.device))  # (c,)
    best = int(torch.argmin(c))
    _remove_block(w, hinv, cols[best].to(w.device))
    costs.append(float(c[best]))
    return best


def obs_heads(w0: torch.Tensor, hinv: torch.Tensor, layout: HeadLayout, keep_per_group: int,
              kv_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """Greedy OBS over head blocks: first whole KV groups down to `kv_keep`, then query heads
    down to `keep_per_group` in every kept group, each step removing the eligible block of
    least cost. Returns (keep_heads, keep_kv, W over the kept columns (m, k*hd) with the OBS
    compensation, the cost of every step)."""
    _check_keep(layout, keep_per_group, kv_keep)
    w, h = w0.clone(), hinv.clone()
    r = layout.group_size
    alive = torch.ones(layout.n_heads, dtype=torch.bool)
    live_groups = torch.ones(layout.n_kv, dtype=torch.bool)
    costs: list[float] = []
    while int(live_groups.sum()) > kv_keep:
        groups = torch.nonzero(live_groups).flatten()
        cols = torch.stack([layout.columns(layout.heads_of(g.reshape(1))) for g in groups])
        best = _remove_cheapest(w, h, cols, costs)
        live_groups[groups[best]] = False
        alive[layout.heads_of(groups[best].reshape(1))] = False
    while True:
        per_group = alive.reshape(layout.n_kv, r).sum(1)  # (n_kv,)
        over = (per_group > keep_per_group) & live_groups
        cand = torch.nonzero(alive & over.repeat_interleave(r)).flatten()
        if cand.numel() == 0:
            break
        cols = torch.stack([layout.columns(hh.reshape(1)) for hh in cand])  # (c, hd)
        alive[cand[_remove_cheapest(w, h, cols, costs)]] = False
    keep = torch.nonzero(alive).flatten()
    w_keep = w[:, layout.columns(keep).to(w.device)]  # (m, k*hd)
    return keep, torch.nonzero(live_groups).flatten(), w_keep, costs


def feasible_keeps(layout: HeadLayout, keep_per_group: int, kv_keep: int):
    """Every kept-head set the constraint allows, as sorted tuples (`exact_heads`, tests)."""
    _check_keep(layout, keep_per_group, kv_keep)
    r = layout.group_size
    for groups in itertools.combinations(range(layout.n_kv), kv_keep):
        per = [itertools.combinations(range(g * r, (g + 1) * r), keep_per_group) for g in groups]
        for choice in itertools.product(*per):
            yield tuple(h for heads in choice for h in heads)


def n_feasible(layout: HeadLayout, keep_per_group: int, kv_keep: int) -> int:
    return math.comb(layout.n_kv, kv_keep) * math.comb(layout.group_size, keep_per_group) ** kv_keep


def exact_heads(w0: torch.Tensor, hinv: torch.Tensor, layout: HeadLayout, keep_per_group: int,
                kv_keep: int, max_subsets: int) -> tuple[torch.Tensor, float]:
    """The kept-head set of least best-refit error, 1/2 tr(W_P (Hinv_PP)^-1 W_P^T), over every
    feasible set; SpapError when there are more than `max_subsets`."""
    count = n_feasible(layout, keep_per_group, kv_keep)
    if count > max_subsets:
        raise SpapError(f"exact head search would evaluate {count} subsets (max_subsets="
                        f"{max_subsets}); use search=greedy")
    best, best_err = None, math.inf
    for keep in feasible_keeps(layout, keep_per_group, kv_keep):
        pruned = complement(layout.columns(torch.tensor(keep)).to(w0.device), layout.width)
        err = mask_error(w0, hinv, pruned)
        if err < best_err:
            best, best_err = keep, err
    return torch.tensor(best, dtype=torch.long), best_err


# ---- baselines ----------------------------------------------------------------------------
def head_scores(method: str, w_o: torch.Tensor, stats: ActStats, layout: HeadLayout
                ) -> torch.Tensor:
    """Per-head score (H,) of a baseline (module docstring), float64."""
    w = w_o.to(torch.float64)  # (m, H*hd)
    if method == "wanda-sp":
        per_col = w.abs().sum(0) * stats.norm.to(w)
    elif method == "flap":
        per_col = (stats.var.to(w) * (w * w).sum(0)) ** 2
    elif method == "magnitude":
        per_col = w.norm(dim=0)
    else:
        raise SpapError(f"'{method}' has no head score; use one of wanda-sp, flap, magnitude")
    return per_col.reshape(layout.n_heads, layout.head_dim).sum(1)


def keep_by_scores(scores: torch.Tensor, layout: HeadLayout, keep_per_group: int, kv_keep: int
                   ) -> torch.Tensor:
    """The kv_keep groups of largest summed score, and in each the keep_per_group heads of
    largest score: sorted kept heads."""
    _check_keep(layout, keep_per_group, kv_keep)
    by_group = scores.reshape(layout.n_kv, layout.group_size)  # (n_kv, r)
    groups = top_k_keep(by_group.sum(1), kv_keep)
    heads = [int(g) * layout.group_size + top_k_keep(by_group[g], keep_per_group)
             for g in groups]
    return torch.sort(torch.cat(heads)).values


# ---- the solver -----------------------------------------------------------------------------
@dataclass
class HeadSolver(RefitOptions):
    """The head decision and o_proj update of one layer. Its fields are its options; the refit
    options are the shared ones (`RefitOptions`), with `damp` also damping the OBS Gram."""

    method: str = "obs"  # one of HEAD_METHODS
    search: str = "greedy"  # obs: "greedy" or "exact" (enumerates every feasible subset)
    # refit the kept o_proj columns; None: obs yes (as OBS does), the baselines no (published)
    update: bool | None = None
    bias: bool = True  # flap's bias compensation (only without the refit)
    max_subsets: int = 100_000  # the most subsets search=exact evaluates

    @property
    def refits(self) -> bool:
        return self.method == "obs" if self.update is None else bool(self.update)

    @property
    def adds_o_bias(self) -> bool:
        """The decision may carry a new o_proj bias (FLAP's compensation)."""
        return self.method == "flap" and self.bias and not self.refits

    def check(self) -> None:
        if self.method not in HEAD_METHODS:
            raise SpapError(f"unknown head method '{self.method}'; supported: "
                            f"{', '.join(HEAD_METHODS)}")
        if self.search not in SEARCHES:
            raise SpapError(f"unknown head search '{self.search}'; use greedy or exact")
        try:
            self.check_refit()
        except ValueError as e:
            raise SpapError(f"head pruning: {e}") from None
        if self.refit_target != "layer":
            raise SpapError("head pruning refits o_proj toward its dense output only; use "
                            "refit_target=layer")

    def solve(self, problem: HeadProblem, keep_per_group: int | None = None,
              kv_keep: int | None = None) -> HeadDecision:
        """Keep `keep_per_group` query heads in each of `kv_keep` KV groups (None: all)."""
        self.check()
        lay = problem.layout
        kpg = lay.group_size if keep_per_group is None else int(keep_per_group)
        kvk = lay.n_kv if kv_keep is None else int(kv_keep)
        _check_keep(lay, kpg, kvk)
        w0 = problem.w_o.to(torch.float64)  # (m, H*hd)
        stats = problem.stats
        gram = stats.gram
        if gram is not None and gram.shape != (lay.width, lay.width):
            raise ValueError(f"Gram of shape {tuple(gram.shape)} for o_proj of {lay.width} "
                             "inputs")
        if (self.method == "obs" or self.refits) and gram is None:
            raise ValueError("head pruning by obs, or with the refit, needs the Gram matrix")
        info: dict[str, Any] = {"method": self.method}
        # the decision sees the fit windows only (stats.ActStats.fit); the refit all of them
        fit = stats.fit(gram=gram is not None)
        h_fit = damp(fit.gram.to(w0), self.damp) if gram is not None else None
        keep, w_obs = self._decide(w0, fit, h_fit, lay, kpg, kvk, info)
        keep_kv = torch.unique(keep // lay.group_size)
        cols = lay.columns(keep).to(w0.device)
        b_new, shift = None, None
        if self.refits and cols.numel() < lay.width:
            w, refit_info = self.refit_kept(w0, stats, cols)
            w = w.to(torch.float64)
            info.update(refit_info)
            if w_obs is not None and refit_info.get("refit") == "exact":
                # the OBS weights equal the exact refit on the Gram the decision saw
                want = refit_down(w0, h_fit, cols)  # (m, k*hd)
                scale = float(want.abs().max()) or 1.0
                info["obs_refit_gap"] = float((w_obs - want).abs().max()) / scale
        else:
            w = w0[:, cols]  # (m, k*hd)
            if self.adds_o_bias and cols.numel() < lay.width:
                pruned = complement(cols, lay.width)
                shift = w0[:, pruned] @ stats.mean.to(w0)[pruned]  # (m,) W_P mean(X_P)
                b_new = shift if problem.b_o is None else problem.b_o.to(w0) + shift
                info["bias_compensation"] = True
        decision = HeadDecision(keep_heads=keep, keep_kv=keep_kv, w_o=w, b_o=b_new, info=info)
        if gram is not None:
            info["rel_error"] = decision_error(problem, decision, stats)
        return decision

    def _decide(self, w0, stats, h_damped, lay, kpg, kvk, info):
        """Sorted kept heads, and the OBS-compensated kept columns where greedy OBS made
        them (None otherwise); what the search found goes into `info`."""
        if kpg == lay.group_size and kvk == lay.n_kv:
            return torch.arange(lay.n_heads), None
        if self.method != "obs":
            scores = head_scores(self.method, w0, stats, lay).cpu()  # (H,)
            return keep_by_scores(scores, lay, kpg, kvk), None
        hinv = spd_inverse(h_damped)  # (n, n)
        if self.search == "exact":
            keep, cost = exact_heads(w0, hinv, lay, kpg, kvk, self.max_subsets)
            w_obs = None
        else:
            keep, _, w_obs, steps = obs_heads(w0, hinv, lay, kpg, kvk)
            cost = sum(steps)
        info.update(search=self.search, obs_cost=cost)
        return keep, w_obs


__all__ = ["HEAD_METHODS", "HeadDecision", "HeadLayout", "HeadProblem", "HeadSolver",
           "exact_heads", "feasible_keeps", "head_scores", "keep_by_scores", "keep_counts",
           "obs_heads"]
