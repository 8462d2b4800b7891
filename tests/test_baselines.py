"""The five baseline solvers against hand computations and the closed-form oracles of refit.py.

All problems are small, random (seeded generators) and run on the CPU in milliseconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from spap.solvers import get_solver
from spap.solvers.base import LayerProblem
from spap.solvers.obs import greedy_obs
from spap.solvers.refit import damp, mask_error, refit_down, spd_inverse
from spap.solvers.stats import stats_from_activations

BASELINES = ["magnitude", "wanda-sp", "flap", "fasp", "obs"]
F64 = torch.float64


def make_problem(
    n: int = 12,
    m: int = 7,
    d: int = 5,
    p: int = 64,
    family: str = "llama",
    seed: int = 0,
    want_gram: bool = True,
) -> tuple[LayerProblem, torch.Tensor]:
    """A random layer and its activations X (p, n), with a non-zero mean per channel and
    channel scales that differ, so that every score has something to rank."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, generator=g, dtype=F64) * 2 + 0.1  # (n,)
    offset = torch.randn(n, generator=g, dtype=F64)  # (n,)
    x = torch.randn(p, n, generator=g, dtype=F64) * scale + offset  # (p, n)
    w_down = torch.randn(m, n, generator=g, dtype=F64)
    if family == "opt":
        w_in = {"fc1": torch.randn(n, d, generator=g, dtype=F64)}
        b_down = torch.randn(m, generator=g, dtype=F64)
        b_in = torch.randn(n, generator=g, dtype=F64)
    else:
        w_in = {
            "gate": torch.randn(n, d, generator=g, dtype=F64),
            "up": torch.randn(n, d, generator=g, dtype=F64),
        }
        b_down = b_in = None
    stats = stats_from_activations(x, want_gram=want_gram)
    return LayerProblem(w_down=w_down, w_in=w_in, stats=stats, b_down=b_down, b_in=b_in), x


# ---------------------------------------------------------------- magnitude


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_magnitude_keeps_largest_channels(norm):
    n, m, d = 6, 4, 3
    size = torch.tensor([1.0, 5.0, 0.1, 3.0, 0.2, 4.0], dtype=F64)
    w_down = torch.ones(m, n, dtype=F64) * size  # column i has entries size_i
    w_in = {"gate": torch.ones(n, d, dtype=F64) * size[:, None], "up": torch.ones(n, d, dtype=F64)}
    x = torch.randn(10, n, dtype=F64)
    problem = LayerProblem(w_down, w_in, stats_from_activations(x, want_gram=False))
    dec = get_solver("magnitude", norm=norm).solve(problem, 3)
    assert dec.keep.tolist() == [1, 3, 5]
    assert torch.equal(dec.w_down, w_down[:, [1, 3, 5]])


def test_magnitude_counts_input_rows():
    """A channel with a tiny down column but a huge gate row is kept: all weights count."""
    n, m, d = 4, 3, 2
    w_down = torch.ones(m, n, dtype=F64)
    w_down[:, 0] = 0.01
    gate = torch.ones(n, d, dtype=F64)
    gate[0] = 100.0
    problem = LayerProblem(w_down, {"gate": gate}, stats_from_activations(torch.ones(5, n)))
    assert 0 in get_solver("magnitude").solve(problem, 1).keep.tolist()


# ---------------------------------------------------------------- wanda-sp


def test_wanda_sp_scores_match_hand_formula():
    problem, x = make_problem(n=10, m=6, want_gram=False, seed=1)
    n, m = problem.n, problem.w_down.shape[0]
    hand = torch.zeros(n, dtype=F64)
    for i in range(n):
        act = math.sqrt(sum(float(x[t, i]) ** 2 for t in range(x.shape[0])))
        hand[i] = sum(abs(float(problem.w_down[j, i])) for j in range(m)) * act
    from spap.solvers.wanda_sp import wanda_sp_scores

    assert torch.allclose(wanda_sp_scores(problem.w_down, problem.stats.norm), hand, rtol=1e-12)
    dec = get_solver("wanda-sp").solve(problem, 4)
    assert dec.keep.tolist() == sorted(torch.argsort(hand, descending=True)[:4].tolist())
    assert torch.equal(dec.w_down, problem.w_down[:, dec.keep])


# ---------------------------------------------------------------- flap


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_flap_bias_makes_mean_output_exact(family):
    problem, x = make_problem(n=16, m=8, family=family, seed=2)
    dec = get_solver("flap").solve(problem, 9)
    b_old = problem.b_down if problem.b_down is not None else torch.zeros(8, dtype=F64)
    assert dec.b_down is not None and dec.b_down.shape == (8,)
    dense = x @ problem.w_down.T + b_old  # (p, m)
    pruned = x[:, dec.keep] @ dec.w_down.T + dec.b_down  # (p, m)
    assert torch.allclose(pruned.mean(0), dense.mean(0), rtol=0, atol=1e-10)
    # and the reported error is the real one, bias included
    err = ((pruned - dense) ** 2).sum() / (dense - b_old).pow(2).sum()
    assert dec.info["rel_error"] == pytest.approx(float(err), rel=1e-9)


def test_flap_scores_are_variance_times_column_norm():
    problem, x = make_problem(n=10, m=5, seed=3)
    score = x.var(0, unbiased=False) * (problem.w_down**2).sum(0)
    dec = get_solver("flap").solve(problem, 6)
    assert dec.keep.tolist() == sorted(torch.argsort(score, descending=True)[:6].tolist())
    assert torch.equal(dec.w_down, problem.w_down[:, dec.keep])  # no weight update
    assert get_solver("flap", bias=False).solve(problem, 6).b_down is None


# ---------------------------------------------------------------- fasp


def test_fasp_refit_is_least_squares():
    problem, x = make_problem(n=14, m=6, p=80, seed=4)
    dec = get_solver("fasp", damp=0.0).solve(problem, 8)
    from spap.solvers.wanda_sp import wanda_sp_scores

    score = wanda_sp_scores(problem.w_down, problem.stats.norm)
    assert dec.keep.tolist() == sorted(torch.argsort(score, descending=True)[:8].tolist())
    y = x @ problem.w_down.T  # (p, m) dense output
    lstsq = torch.linalg.lstsq(x[:, dec.keep], y).solution.T  # (m, k)
    assert torch.allclose(dec.w_down, lstsq, rtol=1e-9, atol=1e-10)
    # damped: the refit of refit.py with the damped Gram
    damped = get_solver("fasp").solve(problem, 8)
    h = damp(problem.stats.gram, 0.01)
    assert torch.allclose(damped.w_down, refit_down(problem.w_down, h, damped.keep), atol=1e-12)


# ---------------------------------------------------------------- obs


def brute_force_greedy(w0: torch.Tensor, hinv: torch.Tensor, n_remove: int) -> list[int]:
    """At each step, remove the column whose removal increases the exact best-refit error
    (refit.mask_error) the least."""
    pruned: list[int] = []
    for _ in range(n_remove):
        base = mask_error(w0, hinv, torch.tensor(pruned, dtype=torch.long))
        gains = {
            j: mask_error(w0, hinv, torch.tensor(pruned + [j], dtype=torch.long)) - base
            for j in range(w0.shape[1])
            if j not in pruned
        }
        pruned.append(min(gains, key=gains.__getitem__))
    return pruned


def literal_obs(w0: torch.Tensor, hinv: torch.Tensor, n_remove: int) -> list[int]:
    """The textbook loop: full rank-1 OBS update and Schur downdate at every step."""
    w, hinv = w0.clone(), hinv.clone()
    alive = torch.ones(w.shape[1], dtype=torch.bool)
    order = []
    for _ in range(n_remove):
        saliency = (w * w).sum(0) / torch.diagonal(hinv)
        saliency[~alive] = float("inf")
        i = int(torch.argmin(saliency))
        w = w - torch.outer(w[:, i], hinv[i]) / hinv[i, i]
        hinv = hinv - torch.outer(hinv[:, i], hinv[i]) / hinv[i, i]
        alive[i] = False
        order.append(i)
    return order


@pytest.mark.parametrize("delta", [0.0, 0.01])
@pytest.mark.parametrize("buffer", [1, 2, 128])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_obs_order_matches_brute_force(delta, buffer, seed):
    n = 8
    problem, _ = make_problem(n=n, m=5, p=40, seed=10 + seed)
    w0 = problem.w_down
    hinv = spd_inverse(damp(problem.stats.gram, delta))
    order, keep, w_obs = greedy_obs(w0, hinv, 5, block=1, buffer=buffer)
    assert order.tolist() == brute_force_greedy(w0, hinv, 5)
    assert keep.tolist() == sorted(set(range(n)) - set(order.tolist()))
    # the OBS updates land on the exact refit
    h = damp(problem.stats.gram, delta)
    assert torch.allclose(w_obs, refit_down(w0, h, keep), rtol=1e-8, atol=1e-10)


def test_obs_fast_path_matches_literal_loop():
    """The buffered implementation makes the same choices as the textbook loop at a size
    where many flushes and shrinks happen."""
    problem, _ = make_problem(n=60, m=9, p=200, seed=5)
    hinv = spd_inverse(damp(problem.stats.gram, 0.01))
    order, _, _ = greedy_obs(problem.w_down, hinv, 41, block=1, buffer=7)
    assert order.tolist() == literal_obs(problem.w_down, hinv, 41)


def test_obs_solver_returns_exact_refit():
    problem, _ = make_problem(n=20, m=6, p=100, seed=6)
    for delta in (0.0, 0.01):
        dec = get_solver("obs", damp=delta, solve_dtype="float64").solve(problem, 11)
        h = damp(problem.stats.gram, delta)
        _, keep, w_obs = greedy_obs(problem.w_down, spd_inverse(h), 9)
        assert torch.equal(dec.keep, keep)
        assert torch.allclose(dec.w_down, refit_down(problem.w_down, h, keep), atol=1e-12)
        assert torch.allclose(dec.w_down, w_obs, rtol=1e-8, atol=1e-10)
        assert dec.info["obs_refit_gap"] < 1e-8


def test_obs_block_removes_jointly():
    """block > 1: the first block is the `block` smallest saliencies, and the joint
    compensation still ends on the exact refit."""
    problem, _ = make_problem(n=24, m=6, p=100, seed=7)
    h = damp(problem.stats.gram, 0.01)
    hinv = spd_inverse(h)
    w0 = problem.w_down
    order, keep, w_obs = greedy_obs(w0, hinv, 12, block=4, buffer=5)
    first = torch.argsort((w0 * w0).sum(0) / torch.diagonal(hinv))[:4]
    assert order[:4].tolist() == first.tolist()
    assert torch.allclose(w_obs, refit_down(w0, h, keep), rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- all baselines


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("n_keep", [0, 1, 7, 15])
def test_decision_shapes(name, family, n_keep):
    n, m = 16, 6
    problem, _ = make_problem(n=n, m=m, family=family, seed=8)
    dec = get_solver(name).solve(problem, n_keep)
    assert dec.keep.dtype == torch.int64
    assert dec.keep.shape == (n_keep,)
    assert torch.equal(dec.keep, torch.unique(dec.keep))  # sorted and unique
    assert dec.w_down.shape == (m, n_keep) and dec.w_down.dtype == F64
    assert dec.b_down is None or dec.b_down.shape == (m,)
    assert dec.w_in is None


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_keep_all_returns_dense_weights(name, family):
    problem, _ = make_problem(n=10, m=4, family=family, seed=9)
    dec = get_solver(name).solve(problem, problem.n)
    assert torch.equal(dec.keep, torch.arange(problem.n))
    assert torch.equal(dec.w_down, problem.w_down)
    assert dec.b_down is None  # bias unchanged


@pytest.mark.parametrize("name", BASELINES)
def test_solver_attributes(name):
    cls = type(get_solver(name))
    assert cls.name == name
    assert cls.needs_gram == (name in ("fasp", "obs"))
    assert cls.needs_inputs is False


@pytest.mark.parametrize("name", ["magnitude", "wanda-sp", "flap"])
def test_gram_free_solvers_run_without_gram(name):
    problem, _ = make_problem(n=10, m=4, want_gram=False, seed=11)
    dec = get_solver(name).solve(problem, 5)
    assert dec.keep.numel() == 5 and "rel_error" not in dec.info


def test_obs_is_no_worse_than_one_shot_scores():
    """Same refit, different choice: greedy OBS, which minimises the exact mask error step by
    step, beats fasp's one-shot Wanda-style choice on this random layer."""
    problem, _ = make_problem(n=40, m=10, p=200, seed=12)
    errs = {name: get_solver(name).solve(problem, 20).info["rel_error"] for name in ("fasp", "obs")}
    assert errs["obs"] <= errs["fasp"] + 1e-12


def test_obs_float32_same_mask_as_float64():
    problem, _ = make_problem(n=40, m=10, p=400, seed=13)
    d32 = get_solver("obs").solve(problem, 24)
    d64 = get_solver("obs", solve_dtype="float64").solve(problem, 24)
    assert torch.equal(d32.keep, d64.keep) and d32.w_down.dtype == torch.float64
    assert torch.allclose(d32.w_down, d64.w_down, rtol=1e-3, atol=1e-4)
