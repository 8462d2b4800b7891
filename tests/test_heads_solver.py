"""The head solver's math against independent oracles: the exact search meets the optimum
found by enumerating every head subset with explicit least squares (same-per-group
constraint, and at KV-group granularity); greedy OBS equals that optimum when one block goes;
its step costs add up to the closed-form best-refit error and its compensated weights are the
exact refit; the baselines' head scores are the published formulas; FLAP's bias compensation
makes the mean output exact; the refit is the shared one; and the refusals."""

from __future__ import annotations

import itertools

import pytest
import torch

from spap.errors import SpapError
from spap.solvers.heads import (
    HeadLayout,
    HeadProblem,
    HeadSolver,
    head_scores,
    keep_counts,
    obs_heads,
)
from spap.solvers.refit import (
    complement,
    damp,
    mask_error,
    refit_down,
    refit_toward_dense,
    spd_inverse,
)
from spap.solvers.stats import StatsAccumulator, stats_from_activations

F64 = torch.float64


def problem(n_heads=6, n_kv=2, hd=3, m=5, p=80, seed=0, heldout=False):
    """Correlated head outputs X (p, H*hd), a random o_proj W (m, H*hd), and the stats."""
    g = torch.Generator().manual_seed(seed)
    n = n_heads * hd
    mix = torch.randn(n, n, generator=g, dtype=F64) / n**0.5 + torch.eye(n, dtype=F64)
    x = torch.randn(p, n, generator=g, dtype=F64) @ mix + 0.3  # (p, n), nonzero mean
    x = x * torch.rand(n, generator=g, dtype=F64).add(0.2)  # uneven column scales
    w = torch.randn(m, n, generator=g, dtype=F64)
    if heldout:
        acc = StatsAccumulator(n, True)
        acc.add(x[: p * 3 // 4])
        acc.add(x[p * 3 // 4:], heldout=True)
        stats = acc.result()
    else:
        stats = stats_from_activations(x)
    return HeadProblem(w, stats, HeadLayout(n_heads, n_kv, hd)), x


def lstsq_error(w, x, cols):
    """min over V of ||X_K V^T - X W^T||^2, by explicit least squares on the tokens."""
    y = x @ w.T  # (p, m)
    if cols.numel() == 0:
        return float((y * y).sum())
    sol = torch.linalg.lstsq(x[:, cols], y).solution  # (k, m)
    r = x[:, cols] @ sol - y
    return float((r * r).sum())


def brute_force(prob, x, keep_per_group, kv_keep):
    """Every kept set with kv_keep groups of keep_per_group heads, written out here."""
    lay = prob.layout
    r = lay.group_size
    best = None
    for groups in itertools.combinations(range(lay.n_kv), kv_keep):
        for picks in itertools.product(*[itertools.combinations(range(g * r, (g + 1) * r),
                                                                keep_per_group)
                                         for g in groups]):
            keep = sorted(h for pick in picks for h in pick)
            err = lstsq_error(prob.w_o, x, lay.columns(torch.tensor(keep)))
            if best is None or err < best[1]:
                best = (keep, err)
    return best


@pytest.mark.parametrize("keep_per_group,kv_keep", [(2, 2), (1, 2), (3, 1), (2, 1), (1, 1)])
def test_exact_search_meets_the_enumerated_optimum(keep_per_group, kv_keep):
    prob, x = problem()
    dec = HeadSolver(search="exact", damp=0.0).solve(prob, keep_per_group, kv_keep)
    keep, err = brute_force(prob, x, keep_per_group, kv_keep)
    assert dec.keep_heads.tolist() == keep
    assert dec.info["obs_cost"] == pytest.approx(0.5 * err, rel=1e-8)
    assert dec.keep_kv.tolist() == sorted({h // 3 for h in keep})
    # the refit of the kept columns is the exact least-squares one
    y = x @ prob.w_o.T
    r = x[:, prob.layout.columns(dec.keep_heads)] @ dec.w_o.T - y
    assert float((r * r).sum()) == pytest.approx(err, rel=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_is_the_optimum_when_one_block_goes(seed):
    """Removing one query head (one KV group of 4 heads), and one whole KV group of three."""
    prob, x = problem(n_heads=4, n_kv=1, seed=seed)
    dec = HeadSolver(damp=0.0).solve(prob, keep_per_group=3)
    assert dec.keep_heads.tolist() == brute_force(prob, x, 3, 1)[0]
    prob, x = problem(n_heads=6, n_kv=3, seed=seed)
    dec = HeadSolver(damp=0.0).solve(prob, kv_keep=2)
    assert dec.keep_heads.tolist() == brute_force(prob, x, 2, 2)[0]
    assert dec.keep_kv.numel() == 2


@pytest.mark.parametrize("keep_per_group,kv_keep", [(1, 2), (2, 1), (1, 1)])
def test_greedy_costs_add_up_to_the_closed_form(keep_per_group, kv_keep):
    """The OBS step costs sum to 1/2 tr(W_P (Hinv_PP)^-1 W_P^T) of the final set; the OBS
    compensated weights are the exact refit of the damped Gram; the constraint holds."""
    prob, _ = problem(n_heads=6, n_kv=2, hd=4)
    lay = prob.layout
    h = damp(prob.stats.gram, 0.01)
    hinv = spd_inverse(h)
    keep, keep_kv, w_obs, steps = obs_heads(prob.w_o, hinv, lay, keep_per_group, kv_keep)
    cols = lay.columns(keep)
    assert sum(steps) == pytest.approx(mask_error(prob.w_o, hinv, complement(cols, lay.width)),
                                       rel=1e-9)
    torch.testing.assert_close(w_obs, refit_down(prob.w_o, h, cols), rtol=1e-8, atol=1e-9)
    per_group = torch.bincount(keep // lay.group_size, minlength=lay.n_kv)
    assert per_group[keep_kv].tolist() == [keep_per_group] * kv_keep
    assert int(per_group.sum()) == keep_per_group * kv_keep
    dec = HeadSolver().solve(prob, keep_per_group, kv_keep)
    assert dec.info["obs_refit_gap"] < 1e-8 and dec.info["refit"] == "exact"


def test_the_ridge_refit_is_the_shared_one():
    """refit=ridge picks its strength on the held-out Gram and refits with refit_toward_dense
    on the kept heads' columns."""
    prob, _ = problem(heldout=True)
    dec = HeadSolver(refit="ridge").solve(prob, keep_per_group=2)
    assert dec.info["ridge_chosen_on"] == "held-out windows"
    cols = prob.layout.columns(dec.keep_heads)
    expected = refit_toward_dense(prob.w_o, prob.stats.gram, cols, dec.info["ridge"])
    torch.testing.assert_close(dec.w_o, expected)


def test_baseline_scores_are_the_published_formulas():
    prob, x = problem()
    lay, w = prob.layout, prob.w_o
    var = x.var(0, unbiased=False)
    norm = x.norm(dim=0)
    for method, per_col in (
        ("wanda-sp", torch.stack([sum(w[j, i].abs() * norm[i] for j in range(w.shape[0]))
                                  for i in range(lay.width)])),
        ("flap", torch.stack([(var[i] * w[:, i].pow(2).sum()) ** 2 for i in range(lay.width)])),
        ("magnitude", torch.stack([w[:, i].pow(2).sum().sqrt() for i in range(lay.width)])),
    ):
        expected = torch.stack([per_col[h * lay.head_dim:(h + 1) * lay.head_dim].sum()
                                for h in range(lay.n_heads)])
        torch.testing.assert_close(head_scores(method, w, prob.stats, lay), expected)


@pytest.mark.parametrize("method", ["wanda-sp", "flap", "magnitude"])
def test_baselines_keep_their_top_heads_per_group(method):
    prob, _ = problem()
    lay = prob.layout
    scores = head_scores(method, prob.w_o, prob.stats, lay)
    dec = HeadSolver(method=method, bias=False).solve(prob, keep_per_group=2)
    expected = sorted(int(h) for g in range(lay.n_kv)
                      for h in g * 3 + torch.topk(scores[g * 3:(g + 1) * 3], 2).indices)
    assert dec.keep_heads.tolist() == expected
    torch.testing.assert_close(dec.w_o, prob.w_o[:, lay.columns(dec.keep_heads)])  # no update
    assert dec.b_o is None
    dec = HeadSolver(method=method).solve(prob, kv_keep=1)  # groups by their summed score
    assert dec.keep_kv.tolist() == [int(torch.argmax(scores.reshape(2, 3).sum(1)))]


def test_flap_bias_compensation_makes_the_mean_output_exact():
    prob, x = problem()
    prob.b_o = torch.linspace(-1, 1, prob.w_o.shape[0], dtype=F64)
    dec = HeadSolver(method="flap").solve(prob, keep_per_group=1)
    cols = prob.layout.columns(dec.keep_heads)
    dense = x @ prob.w_o.T + prob.b_o  # (p, m)
    pruned = x[:, cols] @ dec.w_o.T + dec.b_o
    torch.testing.assert_close(pruned.mean(0), dense.mean(0))
    rel = float(((pruned - dense) ** 2).sum() / ((dense - prob.b_o) ** 2).sum())
    assert dec.info["rel_error"] == pytest.approx(rel, rel=1e-9)


def test_the_reported_error_is_the_error_on_the_tokens():
    prob, x = problem()
    for solver in (HeadSolver(), HeadSolver(method="wanda-sp")):
        dec = solver.solve(prob, keep_per_group=1, kv_keep=1)
        y = x @ prob.w_o.T
        r = x[:, prob.layout.columns(dec.keep_heads)] @ dec.w_o.T - y
        assert dec.info["rel_error"] == pytest.approx(float((r * r).sum() / (y * y).sum()))


def test_keeping_everything_changes_nothing():
    prob, _ = problem()
    dec = HeadSolver().solve(prob)
    assert dec.keep_heads.tolist() == list(range(6)) and dec.keep_kv.tolist() == [0, 1]
    assert torch.equal(dec.w_o, prob.w_o) and dec.info["rel_error"] == 0.0


def test_keep_counts():
    lay = HeadLayout(32, 8, 128)  # LLaMA-3-8B
    assert keep_counts(lay) == (4, 8)
    assert keep_counts(lay, heads=0.25) == (3, 8)
    assert keep_counts(lay, kv_groups=0.25) == (4, 6)
    assert keep_counts(lay, heads=0.5, kv_groups=0.5) == (2, 4)
    assert keep_counts(lay, heads=0.125) == (3, 8)  # a half rounds up (Python's round: 0)
    mha = HeadLayout(8, 8, 16)  # one query head per KV head: heads go as whole groups
    assert keep_counts(mha, heads=0.25) == (1, 6)
    assert keep_counts(mha, heads=0.5, kv_groups=0.25) == (1, 3)


def test_refusals():
    with pytest.raises(SpapError, match="single KV group"):
        keep_counts(HeadLayout(8, 1, 16), kv_groups=0.5)
    with pytest.raises(SpapError, match="removes all 2 query heads"):
        keep_counts(HeadLayout(8, 4, 16), heads=0.8)
    with pytest.raises(SpapError, match="removes all 2 KV groups"):
        keep_counts(HeadLayout(8, 2, 16), kv_groups=0.8)
    with pytest.raises(SpapError, match="removes none of the 4 query heads.*steps of 0.25"):
        keep_counts(HeadLayout(32, 8, 128), heads=0.1)
    with pytest.raises(SpapError, match="removes none of the 8 KV groups"):
        keep_counts(HeadLayout(32, 8, 128), kv_groups=0.05)
    prob, _ = problem()
    with pytest.raises(SpapError, match="leave a group empty"):
        HeadSolver().solve(prob, keep_per_group=0)
    with pytest.raises(SpapError, match="keep at least one"):
        HeadSolver().solve(prob, kv_keep=0)
    with pytest.raises(SpapError, match="max_subsets"):
        HeadSolver(search="exact", max_subsets=3).solve(prob, keep_per_group=1)
    with pytest.raises(SpapError, match="unknown head method"):
        HeadSolver(method="sparsegpt").solve(prob, keep_per_group=1)
    with pytest.raises(SpapError, match="refit_target=layer"):
        HeadSolver(refit="ridge", refit_target="drift").solve(prob, keep_per_group=1)
    with pytest.raises(SpapError, match="do not split"):
        HeadLayout(6, 4, 8)
