"""Held-out data is disjoint: calibration windows never share a token, the held-out windows
follow one documented rule, local files split into calibration and evaluation parts, and every
refitting method shares one refit."""

from __future__ import annotations

import json

import pytest
import torch

from spap.data import (
    HELDOUT_SHARE,
    calibration_windows,
    heldout_windows,
    load_text,
)
from spap.errors import SpapError
from spap.solvers import get_solver
from spap.solvers.base import LayerProblem
from spap.solvers.obs import ObsSolver
from spap.solvers.stats import stats_from_activations

F64 = torch.float64


@pytest.mark.parametrize("nsamples,seqlen,seed", [(128, 64, 0), (16, 100, 3), (50, 7, 1)])
def test_calibration_windows_share_no_token(nsamples, seqlen, seed):
    # a stream barely longer than what is drawn: random overlapping draws would collide
    stream = torch.arange(nsamples * seqlen + seqlen // 2 + 5)
    ids = calibration_windows(stream, nsamples, seqlen, seed)
    assert ids.shape == (nsamples, seqlen)
    tokens = ids.flatten().tolist()
    assert len(set(tokens)) == len(tokens)  # positions are unique: no token drawn twice
    for w in ids:  # each window is a contiguous slice of the stream
        assert torch.equal(w, torch.arange(int(w[0]), int(w[0]) + seqlen))
    n_held = heldout_windows(nsamples)
    fit = set(ids[: nsamples - n_held].flatten().tolist())
    held = set(ids[nsamples - n_held:].flatten().tolist())
    assert held and not (fit & held)


def test_windows_depend_on_seed_and_are_reproducible():
    stream = torch.arange(10_000)
    a = calibration_windows(stream, 8, 50, 0)
    assert torch.equal(a, calibration_windows(stream, 8, 50, 0))
    assert not torch.equal(a, calibration_windows(stream, 8, 50, 1))


def test_too_little_text_is_refused():
    with pytest.raises(SpapError, match="needs"):
        calibration_windows(torch.arange(99), 10, 10, 0)


@pytest.mark.parametrize("nsamples,expect", [(1, 0), (2, 1), (4, 1), (8, 1), (16, 2),
                                              (64, 8), (128, 16)])
def test_heldout_share_is_documented_share(nsamples, expect):
    assert heldout_windows(nsamples) == expect
    if nsamples >= 8:
        assert heldout_windows(nsamples) == round(nsamples * HELDOUT_SHARE)


def test_heldout_share_does_not_depend_on_batch_size():
    """The pipeline holds out windows, not batches: the held-out Gram is the same whatever
    the batch size."""
    import copy

    import spap
    from conftest import random_ids, tiny_model

    dense = tiny_model("llama")
    calib = random_ids(16, 16, seed=4)
    grams = []
    for bs in (1, 4, 16):
        m = copy.deepcopy(dense)
        seen = []
        solver_cls = get_solver("obs").__class__

        orig = solver_cls.solve

        def spy(self, problem, k, seen=seen, orig=orig):
            seen.append(problem.stats.gram_heldout.clone())
            return orig(self, problem, k)

        solver_cls.solve = spy
        try:
            spap.prune(m, calib_ids=calib, sparsity=0.5, method="obs", batch_size=bs,
                       layer_limit=1)
        finally:
            solver_cls.solve = orig
        grams.append(seen[0])
    for g in grams[1:]:
        torch.testing.assert_close(g, grams[0], rtol=1e-5, atol=1e-6)
    assert float(grams[0].abs().sum()) > 0


def test_local_file_splits_like_wikipedia(tmp_path):
    paras = [f"paragraph {i} " + "word " * 5 for i in range(30)]
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(paras))
    cal, test = load_text(str(f), "calib"), load_text(str(f), "test")
    cal_p, test_p = cal.text.split("\n\n"), test.text.split("\n\n")
    assert not set(cal_p) & set(test_p)
    assert sorted(cal_p + test_p) == sorted(paras)
    assert len(test_p) == 3 and "index % 10 == 9" in test.split
    j = tmp_path / "t.jsonl"
    j.write_text("\n".join(json.dumps({"text": p}) for p in paras))
    assert load_text(str(j), "test").text.split("\n\n") == test_p


def test_the_fiction_text_splits_by_passage_and_holds_whole_passages():
    """lambada-offline: every passage once (the set's two repeats dropped), in one part only,
    the held-out part every 10th passage, each passage its context plus its last word."""
    import gzip

    from spap.assets import lambada_requests

    with gzip.open(lambada_requests(), "rt") as f:
        rows = [json.loads(line)["doc"] for line in f]
    passages = list(dict.fromkeys(f"{r['query']} {r['answers_text'][0]}" for r in rows))
    cal, test = load_text("lambada-offline", "calib"), load_text("lambada-offline", "test")
    cal_p, test_p = cal.text.split("\n\n"), test.text.split("\n\n")
    assert test_p == passages[9::10] and len(cal_p) + len(test_p) == len(passages) == 5151
    assert not set(cal_p) & set(test_p)
    assert test.source == "lambada-offline" and "passages with index % 10 == 9" in test.split


def test_local_file_too_short_to_split(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("one line only")
    with pytest.raises(SpapError, match="split"):
        load_text(str(f), "calib")


def _problem(seed=0, n=16, m=6, p=300, n_val=60, n_test=0):
    """A layer whose calibration is the first p tokens (the last n_val held out); n_test more
    tokens of the same distribution are returned for an out-of-sample check."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p + n_test, n, generator=g, dtype=F64) @ (
        torch.eye(n, dtype=F64) + 0.4 * torch.randn(n, n, generator=g, dtype=F64))
    w0 = torch.randn(m, n, generator=g, dtype=F64)
    test, x = x[p:], x[:p]
    stats = stats_from_activations(x)
    stats.gram_heldout = x[p - n_val:].T @ x[p - n_val:]
    prob = LayerProblem(w_down=w0, w_in={"up": torch.zeros(n, 3, dtype=F64)}, stats=stats)
    return (prob, test) if n_test else prob


def test_obs_ridge_refit_equals_spap_refit_on_the_same_mask():
    """One refit for everyone: obs with refit=ridge and spap (recovery off) on the same mask
    choose the same ridge and return the same weights."""
    prob = _problem(seed=3)
    sp = get_solver("spap", recovery="none", greedy_block=1, solve_dtype="float64",
                    swap_max_n=0).solve(prob, 9)
    ob = get_solver("obs", refit="ridge", solve_dtype="float64").solve(prob, 9)
    assert torch.equal(sp.keep, ob.keep)
    assert sp.info["ridge"] == ob.info["ridge"]
    torch.testing.assert_close(sp.w_down, ob.w_down, rtol=1e-9, atol=1e-10)
    fa = get_solver("fasp", refit="ridge").solve(prob, 9)
    assert fa.info["refit"] == "ridge" and "ridge_heldout_rel_error" in fa.info


def test_ridge_refit_differs_from_exact_and_is_better_held_out():
    """The option does something: on few-token layers the error of obs on new tokens falls
    with the ridge refit (on most seeds: the ridge is chosen on 20 tokens)."""
    from spap.solvers.refit import relative_error, scatter_columns

    wins = 0
    for seed in range(10):
        prob, test = _problem(seed=seed, n=24, p=40, n_val=10, n_test=2000)
        ex = get_solver("obs", solve_dtype="float64").solve(prob, 10)
        rd = get_solver("obs", refit="ridge", solve_dtype="float64").solve(prob, 10)
        assert ex.info["refit"] == "exact" and rd.info["refit"] == "ridge"
        assert not torch.allclose(ex.w_down, rd.w_down)
        ht = test.T @ test
        e_ex = relative_error(prob.w_down, scatter_columns(ex.w_down, ex.keep, 24), ht)
        e_rd = relative_error(prob.w_down, scatter_columns(rd.w_down, rd.keep, 24), ht)
        wins += e_rd < e_ex
    assert wins >= 7


def test_unknown_refit_is_refused():
    """Before any model is loaded: get_solver checks the refit options."""
    with pytest.raises(SpapError, match="unknown refit 'magic'"):
        get_solver("obs", refit="magic")
    with pytest.raises(ValueError, match="refit"):  # a solver built by hand, at solve time
        ObsSolver(refit="magic").solve(_problem(), 8)
