"""`out_weight=fisher`: decisions ranked by the loss-weighted output error (weighting.py), the
refit left exact, and the Fisher itself (driver/sensitivity.py) against a direct computation."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import random_ids, tiny_model
from spap.driver.sensitivity import output_fisher
from spap.models import get_adapter
from spap.solvers import get_solver
from spap.solvers.base import LayerProblem
from spap.solvers.refit import (
    complement,
    damp,
    mask_error,
    refit_down,
    scatter_columns,
    spd_inverse,
)
from spap.solvers.stats import stats_from_activations
from spap.solvers.weighting import weight_root

F64 = torch.float64


def _problem(x, w0, g=None):
    return LayerProblem(w_down=w0, w_in={"up": torch.zeros(w0.shape[1], 2, dtype=F64)},
                        stats=stats_from_activations(x), out_weight=g)


def _random(n=10, m=5, p=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(p, n, generator=gen, dtype=F64) @ (
        torch.eye(n, dtype=F64) + 0.3 * torch.randn(n, n, generator=gen, dtype=F64))
    w0 = torch.randn(m, n, generator=gen, dtype=F64)
    a = torch.randn(m, m, generator=gen, dtype=F64)
    g = a @ a.T + 0.05 * torch.eye(m, dtype=F64)  # a full, uneven Fisher
    return x, w0, g


def test_the_root_squares_to_the_normalized_damped_fisher():
    _, _, g = _random()
    r = weight_root(g, 0.01)
    want = g / torch.diagonal(g).mean() + 0.01 * torch.eye(g.shape[0], dtype=F64)
    torch.testing.assert_close(r @ r, want)
    torch.testing.assert_close(r, r.T)
    with pytest.raises(ValueError, match="no gradient"):
        weight_root(torch.zeros(3, 3, dtype=F64), 0.01)


def test_the_decision_objective_is_the_weighted_error_and_the_refit_its_minimizer():
    """mask_error of R W0 is 1/2 tr(G' E H E^T) of the unweighted refit, and no other kept
    weights do better under G': the refit needs no weighting."""
    x, w0, g = _random()
    h = damp(x.T @ x, 0.01)
    r = weight_root(g, 0.01)
    gw = r @ r
    keep = torch.tensor([0, 2, 3, 5, 7, 8])
    pruned = complement(keep, w0.shape[1])

    def weighted(w_k):
        e = scatter_columns(w_k, keep, w0.shape[1]) - w0
        return 0.5 * torch.trace(gw @ e @ h @ e.T)

    w_k = refit_down(w0, h, keep).requires_grad_()
    val = weighted(w_k)
    want = mask_error(r @ w0, spd_inverse(h), pruned)
    assert float(val.detach()) == pytest.approx(want, rel=1e-9)
    (grad,) = torch.autograd.grad(val, w_k)
    assert float(grad.abs().max()) < 1e-8 * float(val.detach())


def _two_groups():
    """Channels 0-2 feed output 0 weakly, channels 3-5 feed output 1 strongly: the plain
    decision keeps 3-5; a loss that cares about output 0 alone must keep 0-2."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(400, 6, generator=gen, dtype=F64)
    w0 = torch.zeros(2, 6, dtype=F64)
    w0[0, :3] = torch.tensor([1.0, 1.1, 0.9])
    w0[1, 3:] = torch.tensor([3.0, 3.2, 2.9])
    g = torch.diag(torch.tensor([1.0, 1e-6], dtype=F64))
    return x, w0, g


@pytest.mark.parametrize("method, opts", [("obs", {}), ("fasp", {}),
                                          ("spap", {"recovery": "none"})])
def test_the_weighted_decision_keeps_what_the_loss_cares_about(method, opts):
    x, w0, g = _two_groups()
    plain = get_solver(method, **opts).solve(_problem(x, w0, g), 3)
    assert plain.keep.tolist() == [3, 4, 5]
    weighted = get_solver(method, out_weight="fisher", out_weight_damp=1e-6, **opts).solve(
        _problem(x, w0, g), 3)
    assert weighted.keep.tolist() == [0, 1, 2]


def test_the_weighted_obs_returns_the_plain_refit_of_its_mask():
    x, w0, g = _random(seed=1)
    dec = get_solver("obs", out_weight="fisher", solve_dtype="float64").solve(
        _problem(x, w0, g), 6)
    h = damp(x.T @ x, 0.01)
    torch.testing.assert_close(dec.w_down, refit_down(w0, h, dec.keep))
    assert dec.info["obs_refit_gap"] < 1e-8  # the OBS steps ran on R W0 and agree there


def test_the_weighted_spap_decision_is_near_the_weighted_optimum():
    within = cases = 0
    for seed in range(20):
        x, w0, g = _random(n=8 + seed % 4, seed=50 + seed)
        n = w0.shape[1]
        n_keep = n // 2
        solver = get_solver("spap", out_weight="fisher", recovery="none", refit="exact",
                            iters=2, starts="greedy,uniform", solve_dtype="float64")
        dec = solver.solve(_problem(x, w0, g), n_keep)
        hinv = spd_inverse(damp(x.T @ x, 0.01))
        rw = weight_root(g, 0.01) @ w0
        err = mask_error(rw, hinv, complement(dec.keep, n))
        best = min(mask_error(rw, hinv, complement(torch.tensor(k), n))
                   for k in itertools.combinations(range(n), n_keep))
        cases += 1
        within += err <= 1.01 * best
    assert within >= 0.9 * cases, f"{within}/{cases} within 1% of the weighted optimum"


def test_a_fisher_is_needed_and_the_name_known():
    x, w0, _ = _random()
    with pytest.raises(ValueError, match="output Fisher"):
        get_solver("obs", out_weight="fisher").solve(_problem(x, w0), 5)
    with pytest.raises(ValueError, match="unknown out_weight"):
        get_solver("fasp", out_weight="hessian").solve(_problem(x, w0), 5)


def test_output_fisher_is_the_sum_of_gradient_outer_products():
    """Against a direct computation: a zero offset added to one layer's down-projection
    output, its gradient is g per token."""
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    ids = random_ids(3, 12, seed=2)
    got = output_fisher(model, adapter, ids, batch_size=2)
    assert len(got) == len(adapter.layers(model))
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    for i, layer in enumerate(adapter.layers(model)):
        down = adapter.out_linear(layer)
        want = torch.zeros(down.out_features, down.out_features, dtype=F64)
        for w in ids.split(2):
            offset = torch.zeros(w.shape[0], w.shape[1], down.out_features, requires_grad=True)
            h = down.register_forward_hook(lambda _m, _a, out, o=offset: out + o)
            try:
                logits = model(w, use_cache=False).logits[:, :-1]
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                    reduction="sum")
                (gr,) = torch.autograd.grad(loss, offset)
            finally:
                h.remove()
            gr = gr.reshape(-1, gr.shape[-1]).to(F64)
            want += gr.T @ gr
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
def test_output_fisher_recomputes_each_layer_and_gives_the_same_sums(family):
    """The checkpointed pass keeps only the layers' inputs: every decoder layer runs twice
    per batch (its forward again in the backward pass), and the sums are the plain pass's."""
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    ids = random_ids(4, 12, seed=3)
    calls = [0] * len(adapter.layers(model))
    for i, layer in enumerate(adapter.layers(model)):  # (the MLP inside: the recomputation
        # calls the layer's forward itself, not the module)
        adapter.out_linear(layer).register_forward_pre_hook(
            lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    plain = output_fisher(model, adapter, ids, batch_size=2, checkpointed=False)
    assert calls == [2] * len(calls)
    got = output_fisher(model, adapter, ids, batch_size=2)
    assert calls == [2 + 4] * len(calls)
    for g, p in zip(got, plain):
        torch.testing.assert_close(g, p, rtol=1e-5, atol=1e-9)
    assert all("forward" not in layer.__dict__ for layer in adapter.layers(model))


def test_the_driver_hands_each_layer_the_dense_models_fisher_on_the_fit_windows(monkeypatch):
    import copy

    import spap
    from spap.data import heldout_windows
    from spap.solvers.obs import ObsSolver

    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    ids = random_ids(8, 16, seed=5)
    seen = []
    orig = ObsSolver.solve
    monkeypatch.setattr(ObsSolver, "solve",
                        lambda self, pr, k: seen.append(pr.out_weight) or orig(self, pr, k))
    res = spap.prune(model, calib_ids=ids, sparsity=0.5, method="obs", batch_size=2,
                     method_options={"out_weight": "fisher"}, compute="float32")  # (as `want`)
    assert res.report["options"]["out_weight"] == "fisher"
    n_fit = ids.shape[0] - heldout_windows(ids.shape[0])
    want = output_fisher(dense, get_adapter(dense.config), ids[:n_fit], batch_size=2)
    assert len(seen) == len(want)
    for got, g in zip(seen, want):
        torch.testing.assert_close(got, g, rtol=1e-5, atol=1e-9)


def test_recovery_weight_alone_makes_the_driver_collect_the_fisher(monkeypatch):
    """recovery_weight=fisher (the decision unweighted) still hands every layer the dense
    model's output Fisher on the fit windows, the one checked against the gradients above."""
    import copy

    import spap
    from spap.data import heldout_windows
    from spap.solvers.spap import SpapSolver

    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    ids = random_ids(8, 16, seed=5)
    seen = []
    orig = SpapSolver.solve
    monkeypatch.setattr(SpapSolver, "solve",
                        lambda self, pr, k: seen.append(pr.out_weight) or orig(self, pr, k))
    spap.prune(model, calib_ids=ids, sparsity=0.5, method="spap", batch_size=2,
               compute="float32",  # (the reference below runs in float32)
               method_options={"recovery_weight": "fisher", "recovery_epochs": 1})
    n_fit = ids.shape[0] - heldout_windows(ids.shape[0])
    want = output_fisher(dense, get_adapter(dense.config), ids[:n_fit], batch_size=2)
    assert len(seen) == len(want)
    for got, g in zip(seen, want):
        assert got is not None
        torch.testing.assert_close(got, g, rtol=1e-5, atol=1e-9)


def test_low_memory_refuses_the_fisher_and_writes_nothing(tmp_path, text_file):
    from spap.api import prune_to_disk
    from spap.errors import SpapError
    from test_large import SETTINGS, saved

    src = saved(tmp_path, "llama")
    with pytest.raises(SpapError, match="low-memory"):
        prune_to_disk(str(src), tmp_path / "o", 0.3, low_memory=True, method="obs",
                      method_options={"out_weight": "fisher"},
                      **dict(SETTINGS, calib=str(text_file)))
    assert not (tmp_path / "o").exists()
