"""The penalty continuation inside recovery (solvers/continuation.py) on small random layers:
its closed forms against brute force, its contract (exactly the requested channels, the pruned
ones exactly zero before the cut, never above the start on held-out tokens), and the two
mechanisms, the growing penalty and the re-chosen mask, each with a test that fails without it.
"""

from __future__ import annotations

import copy

import pytest
import torch

import spap
from conftest import random_ids, tiny_model
from spap.driver.surgery import masked_dense
from spap.models import get_adapter
from spap.solvers.continuation import (
    continue_penalty,
    penalized_down,
    removal_costs,
    schedule,
)
from spap.solvers.recovery import mlp_forward

f64 = torch.float64
ACT = torch.nn.functional.silu


def layer(p=2400, d=6, n=12, m=8, seed=3, noise=0.3, scales=None):
    """A random gated layer: a (p, d), y = W0 (act(G a) * (U a)) plus noise; `scales` multiplies
    the down columns (some channels matter far more than others)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(p, d, generator=g, dtype=f64)
    w_in = {"gate": torch.randn(n, d, generator=g, dtype=f64),
            "up": torch.randn(n, d, generator=g, dtype=f64)}
    w0 = torch.randn(m, n, generator=g, dtype=f64)
    if scales is not None:
        w0 = w0 * torch.as_tensor(scales, dtype=f64)
    y = mlp_forward(a, w_in, w0, ACT, "up")
    y = y + noise * y.std() * torch.randn(y.shape, generator=g, dtype=f64)
    return a, y, w_in, w0


def normal_problem(n=7, m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 40, generator=g, dtype=f64)
    y = torch.randn(m, 40, generator=g, dtype=f64)
    anchor = torch.randn(m, n, generator=g, dtype=f64)
    pen = torch.rand(n, generator=g, dtype=f64) * (torch.arange(n) % 2 == 0)
    return x, y, anchor, pen


def objective(w, x, y, anchor, mu, pen):
    return float(((w @ x - y) ** 2).sum() + mu * ((w - anchor) ** 2).sum()
                 + (pen * (w ** 2).sum(0)).sum())


def test_penalized_down_is_the_minimizer():
    x, y, anchor, pen = normal_problem()
    gram, cross = x @ x.T, x @ y.T
    w, bii = penalized_down(gram, cross, anchor, 0.1, pen)
    mu = 0.1 * float(torch.diagonal(gram).mean())
    # the normal equations of the objective, solved independently
    a_mat = gram + mu * torch.eye(7, dtype=f64) + torch.diag(pen)
    ref = torch.linalg.solve(a_mat, cross + mu * anchor.T).T
    torch.testing.assert_close(w, ref)
    torch.testing.assert_close(bii, torch.diagonal(torch.linalg.inv(a_mat)))
    for _ in range(5):  # and no nearby point does better
        assert objective(w, x, y, anchor, mu, pen) <= objective(
            w + 1e-3 * torch.randn_like(w), x, y, anchor, mu, pen)


def test_removal_cost_is_the_cost_of_zeroing_the_column_with_its_penalty_lifted():
    x, y, anchor, pen = normal_problem(seed=1)
    gram, cross = x @ x.T, x @ y.T
    ridge = 0.05
    mu = ridge * float(torch.diagonal(gram).mean())
    w, bii = penalized_down(gram, cross, anchor, ridge, pen)
    costs = removal_costs(w, bii, pen)
    for i in range(7):
        lifted = pen.clone()
        lifted[i] = 0
        free, _ = penalized_down(gram, cross, anchor, ridge, lifted)
        # the same objective with column i held at zero: solve over the other columns
        rest = [j for j in range(7) if j != i]
        a_mat = (gram + mu * torch.eye(7, dtype=f64) + torch.diag(lifted))[rest][:, rest]
        w_rest = torch.linalg.solve(a_mat, (cross + mu * anchor.T)[rest]).T
        zeroed = torch.zeros_like(w)
        zeroed[:, rest] = w_rest
        brute = (objective(zeroed, x, y, anchor, mu, lifted)
                 - objective(free, x, y, anchor, mu, lifted))
        assert costs[i].item() == pytest.approx(brute, rel=1e-8)


def test_schedule_is_geometric_between_the_two_weights():
    assert schedule((0.1, 10.0), 3) == pytest.approx([0.1, 1.0, 10.0])
    assert schedule((0.1, 10.0), 1) == [10.0]
    with pytest.raises(ValueError, match="0 < first <= last"):
        schedule((0.0, 1.0), 2)


def _full_forward(res, a):
    """The full-width MLP before the cut, the down projection's pruned columns at zero."""
    return mlp_forward(a.float(), res.w_in_full, res.w_down_full, ACT, "up")


@pytest.mark.parametrize("rechoose", ["loo", "fixed"])
def test_ends_with_the_requested_channels_and_the_pruned_ones_exactly_zero(rechoose):
    a, y, w_in, w0 = layer()
    pruned = torch.tensor([1, 4, 5, 8, 10])
    res = continue_penalty(a, y, w_in, w0, ACT, "up", 400, pruned, ridge=0.01, epochs=4,
                           lr=0.05, batch=256, rechoose=rechoose)
    n = w0.shape[1]
    assert res.keep.numel() == n - 5 and torch.equal(res.keep, torch.sort(res.keep).values)
    gone = torch.tensor(sorted(set(range(n)) - set(res.keep.tolist())))
    assert torch.all(res.w_down_full[:, gone] == 0)  # exactly zero before the cut
    torch.testing.assert_close(res.w_down_full[:, res.keep], res.w_down)
    # so cutting them changes nothing: the full-width MLP equals the cut one
    cut = mlp_forward(a.float(), res.w_in, res.w_down, ACT, "up")
    torch.testing.assert_close(_full_forward(res, a), cut, rtol=1e-5, atol=1e-5)
    # the held-out choice never ends above the start (epoch 0, the refit of the mask)
    assert res.heldout[res.epochs] <= res.heldout[0]
    assert len(res.heldout) == 5 and len(res.mus) == 4
    if rechoose == "fixed":
        assert torch.equal(gone, pruned)


def test_the_growing_penalty_shrinks_the_pruned_columns_gradually():
    """With the mask fixed, the pruned columns fade over the epochs rather than being cut at
    once: fails when the penalty is gone (the columns keep their size until the cut)."""
    a, y, w_in, w0 = layer(noise=0.05)
    res = continue_penalty(a, y, w_in, w0, ACT, "up", 400, torch.tensor([0, 3, 6, 9]),
                           ridge=0.01, epochs=4, mu=(0.05, 20.0), lr=0.05, batch=256,
                           rechoose="fixed")
    s = res.shrinkage
    assert all(b < a_ for a_, b in zip(s, s[1:])), s
    assert s[0] > 0.5 and s[-1] < 0.2, s
    # and the kept channels absorbed the work: the last cut beats the first on held-out tokens
    assert res.heldout[-1] < res.heldout[0]


def test_the_pruned_rows_stay_frozen_while_the_kept_ones_train():
    """The pruned channels' gate and up rows keep their dense values (were they trained, the
    loss would scale them up against the shrinking down columns); the kept rows move."""
    a, y, w_in, w0 = layer(noise=0.05)
    pruned = torch.tensor([0, 3, 6, 9])
    res = continue_penalty(a, y, w_in, w0, ACT, "up", 400, pruned, ridge=0.01, epochs=2,
                           lr=0.05, batch=256, rechoose="fixed")
    assert res.epochs > 0
    for k in w_in:
        assert torch.equal(res.w_in_full[k][pruned], w_in[k][pruned].float())
        assert not torch.allclose(res.w_in[k].double(), w_in[k][res.keep], atol=1e-3)


def test_rechoosing_moves_a_bad_starting_mask():
    """A start that removes the channels that matter most: the leave-one-out re-choice swaps
    them back after one epoch and ends far below the fixed mask on held-out tokens; fails when
    the re-choice is gone."""
    scales = [10.0, 10.0, 10.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    a, y, w_in, w0 = layer(scales=scales, noise=0.05)
    bad = torch.tensor([0, 1, 2, 3, 4])  # the three largest among them
    loo = continue_penalty(a, y, w_in, w0, ACT, "up", 400, bad, ridge=0.01, epochs=3,
                           lr=0.05, batch=256)
    fixed = continue_penalty(a, y, w_in, w0, ACT, "up", 400, bad, ridge=0.01, epochs=3,
                             lr=0.05, batch=256, rechoose="fixed")
    assert loo.changed[0] >= 3
    assert {0, 1, 2} <= set(loo.keep.tolist())
    assert min(loo.heldout) < 0.2 * min(fixed.heldout)


def test_bad_settings_are_refused():
    a, y, w_in, w0 = layer(p=300)
    with pytest.raises(ValueError, match="rechoose"):
        continue_penalty(a, y, w_in, w0, ACT, "up", 50, torch.tensor([0]), rechoose="any")
    with pytest.raises(ValueError, match="at least one epoch"):
        continue_penalty(a, y, w_in, w0, ACT, "up", 50, torch.tensor([0]), epochs=0)
    with pytest.raises(ValueError, match="continuation_mu must be two numbers"):
        spap.prune(tiny_model("llama"), calib_ids=random_ids(8, 16), sparsity=0.5,
                   method="spap", method_options={"recovery": "continuation",
                                                  "continuation_mu": "0.1"})


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_continuation_in_the_pipeline_gives_the_masked_dense_model(family):
    """Through `spap.prune`: the requested width in every layer, the cut model equal to the
    dense model with the kept channels' recovered weights and the rest zeroed, and the
    continuation's record in the layer info."""
    dense = tiny_model(family)
    model = copy.deepcopy(dense)
    calib = random_ids(16, 32, seed=1)
    res = spap.prune(model, calib_ids=calib, sparsity=0.5, method="spap",
                     method_options={"recovery": "continuation", "recovery_epochs": 3,
                                     "recovery_batch": 64})
    adapter = get_adapter(model.config)
    n = adapter.width(dense.config)
    assert adapter.width(model.config) == n // 2
    info = [r.info for r in res.layers]
    assert all("continuation" in i and len(i["continuation"]["mu"]) == 3 for i in info)
    ref = masked_dense(dense, model, adapter, [r.keep for r in res.layers])
    ids = random_ids(2, 24, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
