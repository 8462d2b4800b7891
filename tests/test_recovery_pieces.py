"""The pieces of "recovery at full strength" (solvers/recovery.py), on small random gated layers:
a step budget per epoch (`steps`), held-out early stopping (`patience`), shrinkage of gate and
up toward their start (`shrink`), the final down refit on all windows (`final_refit`), and
recovery's loss weighted by an output Fisher (`out_root`).

Each piece: its held-out choice never ends above the start's held-out loss, and a test fails
when its mechanism is gone."""

from __future__ import annotations

import pytest
import torch

from spap.solvers import get_solver
from spap.solvers.base import LayerProblem
from spap.solvers.recovery import down_input, recover
from spap.solvers.refit import solve_toward
from spap.solvers.stats import stats_from_activations

f64 = torch.float64
ACT = torch.nn.functional.silu


def gated_layer(p=3000, d=6, n=16, m=8, seed=7, noise=0.0):
    """A random gated layer: inputs a (p, d), targets y = W0 (act(G a) * (U a)) plus noise (a
    share of y's spread), so that a few hundred tokens overfit."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(p, d, generator=g, dtype=f64)
    up = torch.randn(n, d, generator=g, dtype=f64)
    gate = torch.randn(n, d, generator=g, dtype=f64)
    x = ACT(a @ gate.T) * (a @ up.T)  # (p, n)
    w0 = torch.randn(m, n, generator=g, dtype=f64)
    y = x @ w0.T
    y = y + noise * y.std() * torch.randn(y.shape, generator=g, dtype=f64)
    return a, y, {"gate": gate, "up": up}, w0


def recover_args(p, n_val, seed=0, noise=1.0):
    a, y, w_in, w0 = gated_layer(p=p, seed=seed, noise=noise)
    keep = torch.arange(0, 16, 2)
    args = (a, y, {k: v[keep] for k, v in w_in.items()}, w0[:, keep], ACT, "up", n_val)
    kw = dict(w_down_dense=w0[:, keep], ridge=0.01, epochs=6, lr=0.05)
    return args, kw


def heldout_loss(res, a, y, n_val):
    from spap.solvers.recovery import mlp_forward

    val = slice(a.shape[0] - n_val, a.shape[0])
    pred = mlp_forward(a[val].float(), res.w_in, res.w_down, ACT, "up")
    return float(((pred.double() - y[val]) ** 2).sum() / (y[val] ** 2).sum())


# ---- steps ----------------------------------------------------------------------------------
def test_steps_sets_adam_steps_per_epoch_whatever_the_token_count(monkeypatch):
    """With 2,400 fit tokens and minibatches of 1,024 the plain rule takes 2 steps an epoch;
    `steps=16` takes 16 (minibatches of 150), and never fewer than the plain rule."""
    args, kw = recover_args(p=3000, n_val=600, noise=0.0)
    calls = []
    orig = torch.optim.Adam.step

    def counting(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", counting)
    # (steps=1: at least one full pass, ceil(2400 / 1024) = 3 minibatches)
    for steps, expect in ((0, 2), (16, 16), (1, 3)):
        calls.clear()
        res = recover(*args, **{**kw, "epochs": 3}, steps=steps, batch=1024)
        assert len(calls) == 3 * expect, steps
        assert res.heldout[res.epochs] == min(res.heldout) <= res.heldout[0]


def test_steps_with_fewer_tokens_than_steps_still_runs():
    args, kw = recover_args(p=120, n_val=40)
    res = recover(*args, **{**kw, "epochs": 2}, steps=200)
    assert res.heldout[res.epochs] == min(res.heldout)
    assert all(torch.isfinite(torch.tensor(res.heldout)))


def test_steps_changes_the_result():
    args, kw = recover_args(p=3000, n_val=600, noise=0.0)
    plain = recover(*args, **kw, batch=1024)
    more = recover(*args, **kw, batch=1024, steps=16)
    assert not torch.allclose(plain.w_in["up"], more.w_in["up"])


# ---- patience -------------------------------------------------------------------------------
def test_patience_stops_when_heldout_loss_stops_improving():
    """This layer overfits after its first epoch: with patience 1 recovery stops one epoch after
    the best, with the same choice as running every epoch."""
    args, kw = recover_args(p=300, n_val=150)
    full = recover(*args, **kw)
    early = recover(*args, **kw, patience=1)
    assert len(full.heldout) == kw["epochs"] + 1
    assert early.epochs == full.epochs
    assert len(early.heldout) == early.epochs + 2 < len(full.heldout)
    assert early.heldout == full.heldout[:len(early.heldout)]
    assert early.heldout[early.epochs] == min(early.heldout) <= early.heldout[0]
    torch.testing.assert_close(early.w_down, full.w_down)


def test_patience_never_stops_while_improving():
    args, kw = recover_args(p=3000, n_val=600, noise=0.0)
    res = recover(*args, **kw, patience=1)
    assert len(res.heldout) == kw["epochs"] + 1


# ---- shrink ---------------------------------------------------------------------------------
def test_shrink_chosen_on_heldout_never_worse_and_interpolates():
    """On this overfitting layer half of the recovered update beats all of it: the chosen t
    has the lowest held-out loss of the grid, which holds the start (t = 0) and the recovered
    weights (t = 1) with their losses; the input rows are start + t (recovered - start) and the
    reported loss is the one the returned weights have."""
    args, kw = recover_args(p=300, n_val=150)
    a, y, w_start = args[0], args[1], args[2]
    plain = recover(*args, **kw)
    res = recover(*args, **kw, shrink=(0.25, 0.5, 0.75))
    losses = {float(t): v for t, v in res.shrink["heldout"].items()}
    t = res.shrink["chosen"]
    assert losses[t] == min(losses.values())
    assert losses[0.0] == res.heldout[0] and losses[1.0] == plain.heldout[plain.epochs]
    assert losses[t] <= min(res.heldout)
    assert 0 < t < 1  # the mechanism is at work here (else this test proves nothing)
    for key in ("gate", "up"):
        expect = w_start[key].float() + t * (plain.w_in[key] - w_start[key].float())
        torch.testing.assert_close(res.w_in[key], expect)
    assert abs(heldout_loss(res, a, y, 150) - losses[t]) < 1e-5
    assert heldout_loss(res, a, y, 150) < heldout_loss(plain, a, y, 150)


def test_shrink_back_to_the_start_keeps_zero_epochs():
    """When the start wins, recovery reports 0 epochs (the caller keeps its all-window
    refit)."""
    args, kw = recover_args(p=300, n_val=150, seed=2)
    res = recover(*args, **kw, shrink=(0.5,))
    if res.shrink and res.shrink["chosen"] == 0.0:
        assert res.epochs == 0
    assert min(float(v) for v in res.shrink.get("heldout", {"0": res.heldout[0]}).values()) \
        <= res.heldout[0]


def test_shrink_runs_when_no_epoch_beats_the_start():
    """Started, as the solver starts it, from the down refit on the fit tokens: every epoch
    ends above the start, yet a quarter of the best epoch's update beats it; without the
    shrinkage recovery keeps 0 epochs."""
    args, kw = recover_args(p=300, n_val=150, seed=4)
    a, y, w_in = args[0], args[1], args[2]
    x = down_input(a[:150], w_in, ACT, "up")
    w_start = solve_toward(x.T @ x, x.T @ y[:150], kw["w_down_dense"], kw["ridge"])
    args = (a, y, w_in, w_start, *args[4:])
    kw["lr"] = 0.2
    plain = recover(*args, **kw)
    res = recover(*args, **kw, shrink=(0.1, 0.25, 0.5))
    assert plain.epochs == 0 and min(plain.heldout[1:]) > plain.heldout[0]
    losses = {float(t): v for t, v in res.shrink["heldout"].items()}
    assert 0 < res.shrink["chosen"] < 1 and res.epochs > 0
    assert losses[res.shrink["chosen"]] == min(losses.values()) < res.heldout[0]
    assert abs(heldout_loss(res, a, y, 150) - min(losses.values())) < 1e-5


def test_shrink_refuses_negative_fractions():
    args, kw = recover_args(p=300, n_val=150)
    with pytest.raises(ValueError, match="shrink"):
        recover(*args, **kw, shrink=(-0.5,))


# ---- final_refit ----------------------------------------------------------------------------
def test_final_refit_solves_the_down_projection_on_all_tokens():
    """The held-out choice is that of the run without it (same epochs, same input rows, whose
    held-out loss is not above the start's); only the down projection changes, to the ridge
    solve toward the dense weights on fit and held-out tokens together."""
    args, kw = recover_args(p=3000, n_val=600, noise=0.3)
    a, y = args[0], args[1]
    plain = recover(*args, **kw)
    final = recover(*args, **kw, final_refit=True)
    assert plain.epochs == final.epochs > 0
    assert final.heldout[final.epochs] <= final.heldout[0]
    for key in ("gate", "up"):
        torch.testing.assert_close(final.w_in[key], plain.w_in[key])
    x = down_input(a.float(), final.w_in, ACT, "up").double()  # all tokens
    expect = solve_toward(x.T @ x, x.T @ y, kw["w_down_dense"], kw["ridge"]).float()
    torch.testing.assert_close(final.w_down, expect, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(final.w_down, plain.w_down, rtol=1e-4, atol=1e-5)


# ---- rerun ----------------------------------------------------------------------------------
def test_rerun_keeps_the_choice_and_fits_the_heldout_tokens_too():
    """The held-out windows choose the epochs as without the rerun; the returned weights are
    then fit on every token: other held-out targets change them, and leave the run without
    the rerun (whose gate and up see only the fit tokens) exactly as it was."""
    args, kw = recover_args(p=3000, n_val=600, noise=0.3)
    a, y = args[0], args[1]
    y2 = y.clone()
    y2[-600:] += 0.01 * y.std() * torch.randn(600, y.shape[1], dtype=f64,
                                              generator=torch.Generator().manual_seed(5))
    args2 = (a, y2, *args[2:])
    plain, plain2 = recover(*args, **kw), recover(*args2, **kw)
    rerun, rerun2 = recover(*args, **kw, rerun=True), recover(*args2, **kw, rerun=True)
    assert plain.epochs == rerun.epochs == plain2.epochs == rerun2.epochs > 0
    assert rerun.heldout == plain.heldout
    for key in ("gate", "up"):
        assert torch.equal(plain.w_in[key], plain2.w_in[key])
        assert not torch.allclose(rerun.w_in[key], rerun2.w_in[key], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(rerun.w_in[key], plain.w_in[key], rtol=1e-4, atol=1e-5)


def test_rerun_takes_adam_steps_on_every_token(monkeypatch):
    """The rerun's epochs draw their minibatches from all 3,000 tokens; the choosing run's
    from the 2,400 fit tokens only."""
    from spap.solvers import recovery

    drawn: list[torch.Tensor] = []
    orig = recovery.LayerTokens.minibatch

    def spy(self, idx):
        drawn.append((self.every, idx.clone()))
        return orig(self, idx)

    monkeypatch.setattr(recovery.LayerTokens, "minibatch", spy)
    args, kw = recover_args(p=3000, n_val=600, noise=0.3)
    res = recover(*args, **kw, rerun=True, steps=16)
    assert res.epochs > 0
    choose = torch.cat([i for every, i in drawn if not every])
    again = torch.cat([i for every, i in drawn if every])
    assert int(choose.max()) < 2400
    assert again.numel() >= res.epochs * 2400 and set(again.tolist()) == set(range(3000))


def test_rerun_generalizes_better_on_a_small_noisy_layer():
    """600 noisy tokens, 200 of them held out: a third more tokens to fit lowers the error on
    fresh tokens of the same layer."""
    a, y, w_in, w0 = gated_layer(p=600 + 6000, seed=2, noise=1.0)
    keep = torch.arange(0, 16, 2)
    args = (a[:600], y[:600], {k: v[keep] for k, v in w_in.items()}, w0[:, keep], ACT, "up",
            200)
    kw = dict(w_down_dense=w0[:, keep], ridge=0.01, epochs=6, lr=0.05, final_refit=True)
    plain, rerun = recover(*args, **kw), recover(*args, **kw, rerun=True)
    assert plain.epochs > 0

    def fresh(res):
        from spap.solvers.recovery import mlp_forward

        pred = mlp_forward(a[600:].float(), res.w_in, res.w_down, ACT, "up").double()
        return float(((pred - y[600:]) ** 2).sum() / (y[600:] ** 2).sum())

    assert fresh(rerun) < fresh(plain)


def test_rerun_with_no_epoch_kept_returns_the_start():
    args, kw = recover_args(p=300, n_val=150, noise=5.0)
    res = recover(*args, **{**kw, "lr": 50.0}, rerun=True)  # every epoch does worse
    assert res.epochs == 0
    assert torch.equal(res.w_in["up"], args[2]["up"].float())
    assert torch.equal(res.w_down, args[3].float())


def test_rerun_and_shrink_are_refused_together():
    args, kw = recover_args(p=300, n_val=150)
    with pytest.raises(ValueError, match="rerun"):
        recover(*args, **kw, rerun=True, shrink=(0.5,))


# ---- out_root -------------------------------------------------------------------------------
def _uneven_root(m=8, seed=3):
    """The root of a Fisher that cares for two output directions 100x more than the rest."""
    from spap.solvers.weighting import weight_root

    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=f64))
    vals = torch.full((m,), 0.01, dtype=f64)
    vals[:2] = 1.0
    return weight_root((q * vals) @ q.T, 0.0)


def weighted_loss(w_in, w_down, a, y, root):
    from spap.solvers.recovery import mlp_forward

    w_in = {k: v.float() for k, v in w_in.items()}
    r = (mlp_forward(a.float(), w_in, w_down.float(), ACT, "up").double() - y) @ root
    return float((r ** 2).sum() / ((y @ root) ** 2).sum())


def test_out_root_weighs_every_heldout_choice_and_never_ends_above_the_start():
    """The held-out losses recovery reports and chooses by are the weighted ones, from the
    start on; the weighted held-out loss it ends with is not above the start's."""
    args, kw = recover_args(p=3000, n_val=600, noise=0.3)
    a, y, w_in, w_start, n_val = args[0], args[1], args[2], args[3], args[6]
    root = _uneven_root()
    res = recover(*args, **kw, out_root=root)
    val = slice(a.shape[0] - n_val, a.shape[0])
    want0 = weighted_loss(w_in, w_start, a[val], y[val], root)
    assert res.heldout[0] == pytest.approx(want0, rel=1e-5)
    assert res.epochs > 0
    got = weighted_loss(res.w_in, res.w_down, a[val], y[val], root)
    assert got == pytest.approx(res.heldout[res.epochs], rel=1e-5)
    assert got <= want0
    assert res.heldout[res.epochs] == min(res.heldout)


def test_out_root_fits_the_weighted_directions_better_than_the_plain_loss():
    """Gate and up fit to the weighted loss do better on it, out of sample, than the same
    recovery fit to the plain loss (over several random layers); the down projection's
    closed form is the same unweighted solve."""
    root = _uneven_root()
    wins = 0
    for seed in range(4):
        args, kw = recover_args(p=3000, n_val=600, seed=seed, noise=0.3)
        a, y, n_val = args[0], args[1], args[6]
        val = slice(a.shape[0] - n_val, a.shape[0])
        plain = recover(*args, **kw)
        weighted = recover(*args, **kw, out_root=root)
        assert not torch.allclose(plain.w_in["gate"], weighted.w_in["gate"])
        wins += (weighted_loss(weighted.w_in, weighted.w_down, a[val], y[val], root)
                 < weighted_loss(plain.w_in, plain.w_down, a[val], y[val], root))
        # for its own gate and up, the down projection is the plain ridge solve on fit tokens
        fit = slice(0, a.shape[0] - n_val)
        x = down_input(a[fit].float(), weighted.w_in, ACT, "up").double()
        expect = solve_toward(x.T @ x, x.T @ y[fit], kw["w_down_dense"], kw["ridge"]).float()
        torch.testing.assert_close(weighted.w_down, expect, rtol=1e-4, atol=1e-5)
    assert wins >= 3


# ---- through the solver ---------------------------------------------------------------------
def _problem(seed=0, p=1200, n_val=300):
    a, y, w_in, w0 = gated_layer(p=p, seed=seed, noise=0.3)
    x = ACT(a @ w_in["gate"].T) * (a @ w_in["up"].T)
    stats = stats_from_activations(x)
    stats.gram_heldout = x[p - n_val:].T @ x[p - n_val:]
    return LayerProblem(w_down=w0, w_in=w_in, stats=stats, inputs=a, targets=y,
                        linear_key="up", act=ACT, heldout_tokens=n_val)


def test_solver_options_reach_recovery():
    prob = _problem()
    base = dict(recovery_epochs=6, recovery_lr=0.05)
    plain = get_solver("spap", **base).solve(prob, 8)
    opts = get_solver("spap", **base, recovery_steps=8, recovery_patience=1,
                      recovery_shrink="0.25,0.5,0.75", recovery_final_refit=True)
    dec = opts.solve(prob, 8)
    assert torch.equal(dec.keep, plain.keep)
    assert dec.info["recovery_epochs"] > 0  # else no shrink runs and this proves nothing
    assert "recovery_shrink" in dec.info and "recovery_shrink" not in plain.info
    losses = dec.info["recovery_shrink_heldout_loss"]
    assert losses[str(dec.info["recovery_shrink"])] == min(losses.values())
    assert min(losses.values()) <= dec.info["recovery_heldout_loss"][0]
    # --option recovery_shrink=0.5 arrives as a float
    one = get_solver("spap", **base, recovery_shrink=0.5).solve(prob, 8)
    assert set(one.info.get("recovery_shrink_heldout_loss", {"0.5": 0})) >= {"0.5"}
    with pytest.raises(ValueError, match="recovery_shrink"):
        get_solver("spap", **base, recovery_shrink="half").solve(prob, 8)


def test_solver_rerun_reaches_recovery():
    prob = _problem()
    base = dict(recovery_epochs=6, recovery_lr=0.05)
    plain = get_solver("spap", **base).solve(prob, 8)
    rerun = get_solver("spap", **base, recovery_rerun=True).solve(prob, 8)
    assert torch.equal(rerun.keep, plain.keep)
    assert rerun.info["recovery_epochs"] == plain.info["recovery_epochs"] > 0
    assert rerun.info["recovery_heldout_loss"] == plain.info["recovery_heldout_loss"]
    assert not torch.allclose(rerun.w_in["up"], plain.w_in["up"])
    with pytest.raises(ValueError, match="recovery_rerun"):
        get_solver("spap", **base, recovery_rerun=True, recovery="continuation").solve(prob, 8)


def test_recovery_weight_fisher_reaches_recovery_and_needs_a_fisher(monkeypatch):
    from spap.solvers.weighting import weight_root

    prob = _problem()
    m = prob.w_down.shape[0]
    g = torch.Generator().manual_seed(1)
    b = torch.randn(m, m, generator=g, dtype=f64)
    base = dict(recovery_epochs=4, recovery_lr=0.05)
    solver = get_solver("spap", **base, recovery_weight="fisher")
    assert solver.needs_fisher and not solver.needs_out_weight
    assert not get_solver("spap", **base).needs_fisher
    assert not get_solver("spap", recovery="none", recovery_weight="fisher").needs_fisher
    with pytest.raises(ValueError, match="output Fisher"):
        solver.solve(prob, 8)
    prob.out_weight = b @ b.T
    plain = get_solver("spap", **base).solve(prob, 8)
    dec = solver.solve(prob, 8)
    assert torch.equal(dec.keep, plain.keep)  # the decision is not weighted
    seen = []
    import spap.solvers.spap as mod
    orig = mod.recover
    monkeypatch.setattr(mod, "recover",
                        lambda *a, **k: seen.append(k["out_root"]) or orig(*a, **k))
    solver.solve(prob, 8)
    torch.testing.assert_close(seen[0], weight_root(prob.out_weight, solver.out_weight_damp))
    assert dec.info["recovery_heldout_loss"] != plain.info["recovery_heldout_loss"]
    with pytest.raises(ValueError, match="unknown recovery_weight"):
        get_solver("spap", recovery_weight="hessian").solve(prob, 8)
    with pytest.raises(ValueError, match="continuation"):
        get_solver("spap", recovery="continuation", recovery_weight="fisher").solve(prob, 8)
