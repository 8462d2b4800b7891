"""The drift target (`refit_target=drift`): its statistics against a dense forward, its closed
form against a brute-force fit, and its refusal where a layer's output is not the residual
plus the MLP's output."""

from __future__ import annotations

import copy

import pytest
import torch

import spap
from conftest import random_ids, tiny_model
from spap.models import get_adapter
from spap.solvers import get_solver
from spap.solvers.refit import heldout_drift_errors
from spap.solvers.spap import SpapSolver

F64 = torch.float64


def _layer_outputs(model, ids, index):
    """The hidden state after decoder layer `index`, (tokens, m)."""
    layers = get_adapter(model.config).layers(model)
    seen = []
    h = layers[index].register_forward_hook(
        lambda _m, _a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach()))
    with torch.no_grad():
        model(ids, use_cache=False)
    h.remove()
    return seen[0].reshape(-1, seen[0].shape[-1]).double()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_drift_equals_dense_state_minus_pruned_layer_output(family, monkeypatch):
    """At layer 1, D = (dense model's state after layer 1) - (layer 1, dense weights, on the
    inputs that the pruned layer 0 gives): checked per token against two plain forwards."""
    calib = random_ids(8, 16)
    opts = {"refit": "ridge", "refit_target": "drift"}
    problems = []
    solve = SpapSolver.solve

    def spy(self, problem, k):
        problems.append(copy.copy(problem))
        return solve(self, problem, k)

    dense = tiny_model(family)
    cut0 = copy.deepcopy(dense)
    monkeypatch.setattr(SpapSolver, "solve", spy)
    # (float32 products: the reference forwards below are float32)
    spap.prune(copy.deepcopy(dense), calib_ids=calib, sparsity=0.5, layer_limit=2,
               method_options=opts, compute="float32")
    # the same layer 0 cut alone (the driver is deterministic), layer 1 still dense
    spap.prune(cut0, calib_ids=calib, sparsity=0.5, layer_limit=1, method_options=opts,
               compute="float32")
    n_held = spap.data.heldout_windows(8)
    fit, held = calib[: 8 - n_held], calib[8 - n_held:]
    ids = torch.cat([fit, held])  # the driver's order: fit windows, then held-out ones
    want = _layer_outputs(dense, ids, 1) - _layer_outputs(cut0, ids, 1)  # (tokens, m)
    got = problems[1].drift.double()
    assert got.shape == want.shape and want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the sums the closed-form refit uses are of the same drift
    x_rows = problems[1].stats.drift
    assert x_rows.sq == pytest.approx(float(want.pow(2).sum()), rel=1e-4)
    held_rows = want[-held.numel():]
    assert x_rows.sq_heldout == pytest.approx(float(held_rows.pow(2).sum()), rel=1e-4)
    # layer 0 inherits no drift: its inputs are the dense model's
    assert float(problems[0].drift.abs().max()) == 0.0


def test_closed_form_matches_a_brute_force_fit():
    g = torch.Generator().manual_seed(0)
    m, n, p_fit, p_val = 5, 12, 200, 80
    w0 = torch.randn(m, n, generator=g, dtype=F64)
    x_fit, x_val = (torch.randn(p, n, generator=g, dtype=F64) for p in (p_fit, p_val))
    d_fit, d_val = (torch.randn(p, m, generator=g, dtype=F64) for p in (p_fit, p_val))
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    grid, alphas = [0.01, 0.1, 1.0], [0.0, 0.5, 1.0]
    best, table = heldout_drift_errors(
        w0, x_fit.T @ x_fit, x_val.T @ x_val, d_fit.T @ x_fit, d_val.T @ x_val,
        float(d_val.pow(2).sum()), keep, grid, alphas, search="all")
    xk = x_fit[:, keep]
    mu_unit = float(torch.diagonal(xk.T @ xk).mean())
    for lam in grid:
        mu = lam * mu_unit
        for al in alphas:
            y = x_fit @ w0.T + al * d_fit  # the drift target on the fit windows
            # argmin ||xk W^T - y||^2 + mu ||W - W0_K||^2
            a = xk.T @ xk + mu * torch.eye(keep.numel(), dtype=F64)
            w = torch.linalg.solve(a, xk.T @ y + mu * w0[:, keep].T).T
            full = torch.zeros_like(w0)
            full[:, keep] = w
            err = float(((x_val @ (full - w0).T) - d_val).pow(2).sum())
            assert table[lam][al] == pytest.approx(err, rel=1e-9)
    lam_best = min(best, key=lambda k: best[k][1])
    assert best[lam_best][1] == min(min(t.values()) for t in table.values())


def test_drift_target_changes_the_weights_and_never_raises_the_heldout_output_error():
    calib = random_ids(16, 32)
    layer_t = spap.prune(tiny_model("llama"), calib_ids=calib, sparsity=0.5, method="obs",
                         method_options={"refit": "ridge"})
    drift_t = spap.prune(tiny_model("llama"), calib_ids=calib, sparsity=0.5, method="obs",
                         method_options={"refit": "ridge", "refit_target": "drift"})
    info = drift_t.report["layers"][1]["info"]
    assert info["output_error_heldout"] <= info["output_error_heldout_alpha0"]
    assert info["drift_alpha"] > 0  # this layer's held-out windows want some of the drift
    a = get_adapter(layer_t.model.config)
    w_layer = a.out_linear(a.layers(layer_t.model)[1]).weight
    w_drift = a.out_linear(a.layers(drift_t.model)[1]).weight
    assert not torch.allclose(w_layer, w_drift)
    # layer 0 has no drift: alpha is irrelevant there, and the weights are the layer target's
    torch.testing.assert_close(a.out_linear(a.layers(layer_t.model)[0]).weight,
                               a.out_linear(a.layers(drift_t.model)[0]).weight)


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_a_norm_or_scale_after_the_mlp_is_refused(family):
    model = tiny_model(family)
    if family == "granite":  # Granite scales the MLP's output by residual_multiplier
        for layer in get_adapter(model.config).layers(model):
            layer.residual_multiplier = 0.5
    with pytest.raises(spap.SpapError, match="refit_target=drift needs a decoder layer"):
        spap.prune(model, calib_ids=random_ids(8, 16), sparsity=0.5, method="obs",
                   method_options={"refit": "ridge", "refit_target": "drift"})


def test_bad_drift_options_are_refused_before_any_model():
    with pytest.raises(spap.SpapError, match="needs refit=ridge"):
        get_solver("obs", refit="exact", refit_target="drift")
    with pytest.raises(spap.SpapError, match="unknown refit_target"):
        get_solver("fasp", refit_target="hidden")


def test_spap_recovery_fits_the_drift_target(monkeypatch):
    """SPAP's recovery starts from the drift refit and fits W0 x + alpha D, not W0 x."""
    import spap.solvers.spap as spap_solver

    seen = []
    real = spap_solver.recover

    def spy(inputs, targets, *args, **kwargs):
        seen.append(targets)
        return real(inputs, targets, *args, **kwargs)

    problems = []
    solve = SpapSolver.solve

    def keep_problem(self, problem, k):
        problems.append(problem)
        return solve(self, problem, k)

    monkeypatch.setattr(spap_solver, "recover", spy)
    monkeypatch.setattr(SpapSolver, "solve", keep_problem)
    res = spap.prune(tiny_model("llama"), calib_ids=random_ids(16, 32), sparsity=0.5,
                     method_options={"refit_target": "drift"})
    alpha = res.report["layers"][1]["info"]["drift_alpha"]
    assert alpha > 0
    p = problems[1]
    torch.testing.assert_close(seen[1], p.targets + alpha * p.drift)


def test_drift_target_accepted_in_bf16_with_the_drift_in_float32(monkeypatch):
    """A bf16 llama adds the MLP's output to the residual up to bf16 rounding: the drift
    target is accepted, and D reaches the solver in float32 (a bf16 D would round away
    most of a drift that is small against the states it is the difference of)."""
    problems = []
    solve = SpapSolver.solve

    def spy(self, problem, k):
        problems.append(problem.drift)
        return solve(self, problem, k)

    monkeypatch.setattr(SpapSolver, "solve", spy)
    res = spap.prune(tiny_model("llama").to(torch.bfloat16), calib_ids=random_ids(8, 16),
                     sparsity=0.5, method_options={"refit_target": "drift"})
    assert res.report["model"]["dtype"] == "bfloat16"
    assert [d.dtype for d in problems] == [torch.float32] * 2
    assert "drift_alpha" in res.report["layers"][1]["info"]


def test_drift_target_refused_for_gemma2_in_bf16():
    with pytest.raises(spap.SpapError, match="refit_target=drift needs a decoder layer"):
        spap.prune(tiny_model("gemma2").to(torch.bfloat16), calib_ids=random_ids(8, 16),
                   sparsity=0.5, method="obs",
                   method_options={"refit": "ridge", "refit_target": "drift"})
