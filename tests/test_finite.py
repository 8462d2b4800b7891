"""Silent failures of the solves, made loud or repaired (solvers/refit.py, solvers/obs.py,
driver/surgery.py).

A Gram that is not positive definite (a dead channel, two identical channels, no damping) is
solved with more damping, recorded in the layer's record, and gives the decision an oracle
expects; an OBS search whose inverse Gram loses positive definiteness stops instead of
ranking NaN saliencies; NaN in a weight or in the calibration statistics stops the run with one
line that names the layer and the fix, whatever the method.
"""

from __future__ import annotations

import pytest
import torch

from conftest import random_ids, tiny_model
from spap.driver.surgery import apply_decision, solve_layer
from spap.errors import SpapError
from spap.solvers import get_solver
from spap.solvers import obs as obs_module
from spap.solvers.base import Decision, LayerProblem
from spap.solvers.obs import greedy_obs
from spap.solvers.refit import SolveError, damping_log, relative_error, scatter_columns
from spap.solvers.stats import stats_from_activations

F64 = torch.float64
N, M, P = 10, 6, 80
DEAD, TWIN, ORIGINAL = 3, 7, 2  # channel 3 never fires; channel 7 is a copy of channel 2


def deficient_problem(seed: int = 0) -> tuple[LayerProblem, torch.Tensor]:
    """A layer whose activations X (P, N) have a dead channel and a duplicated one: its Gram
    has rank N - 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(P, N, generator=g, dtype=F64) * (torch.rand(N, generator=g, dtype=F64) + 0.5)
    x[:, DEAD] = 0
    x[:, TWIN] = x[:, ORIGINAL]
    w_in = {"gate": torch.randn(N, 4, generator=g, dtype=F64),
            "up": torch.randn(N, 4, generator=g, dtype=F64)}
    problem = LayerProblem(w_down=torch.randn(M, N, generator=g, dtype=F64), w_in=w_in,
                           stats=stats_from_activations(x))
    return problem, x


def lstsq_error(w0: torch.Tensor, x: torch.Tensor, keep: torch.Tensor) -> float:
    """The oracle: the smallest relative error ||W_K X_K - W0 X||^2 / ||W0 X||^2 any refit of
    the kept columns reaches (least squares on the activations themselves, rank-deficient or
    not)."""
    y = x @ w0.T  # (P, M)
    sol = torch.linalg.lstsq(x[:, keep], y, driver="gelsd").solution  # (k, M)
    return float((x[:, keep] @ sol - y).pow(2).sum() / y.pow(2).sum())


SOLVERS = [
    ("obs", {"damp": 0.0, "solve_dtype": "float64"}),
    ("obs", {"damp": 0.0}),  # the float32 search
    ("spap", {"damp": 0.0, "refit": "exact", "recovery": "none"}),
]


@pytest.mark.parametrize("name,options", SOLVERS, ids=["obs-f64", "obs-f32", "spap"])
def test_a_rank_deficient_gram_without_damping_gives_the_least_squares_decision(name, options):
    problem, x = deficient_problem()
    n_keep = N - 2
    decision = solve_layer(get_solver(name, **options), problem, n_keep, index=0)
    keep = decision.keep
    assert torch.isfinite(decision.w_down).all()
    assert DEAD not in keep.tolist()  # it costs nothing to drop
    # the retry that made the solve possible is in the layer's record
    assert decision.info["damping_retries"]
    # the mask-aware methods drop the dead channel and one twin, which loses nothing: the
    # refit reaches that (up to the retry's damping)
    assert not {ORIGINAL, TWIN} <= set(keep.tolist())
    err = relative_error(problem.w_down, scatter_columns(decision.w_down.to(F64), keep, N),
                         problem.stats.gram)
    assert lstsq_error(problem.w_down, x, keep) < 1e-12
    assert err < 1e-4


@pytest.mark.parametrize("refit", ["exact", "ridge"])
def test_the_shared_refit_of_a_singular_block_is_the_least_squares_one(refit):
    """The refit every method shares (fasp's, obs's, spap's), without damping, of a mask that
    keeps the dead channel and both twins: H[K, K] is singular. It is solved with more damping,
    which the record shows, instead of by an LU solve of a singular matrix."""
    problem, x = deficient_problem(1)
    keep = torch.tensor([0, 1, ORIGINAL, DEAD, 5, TWIN])
    solver = get_solver("fasp", damp=0.0, refit=refit, ridge_fallback=0.0)
    with damping_log() as retries:
        w, _ = solver.refit_kept(problem.w_down, problem.stats, keep)
    assert retries and retries[0]["n"] == keep.numel()
    assert torch.isfinite(w).all()
    err = relative_error(problem.w_down, scatter_columns(w, keep, N), problem.stats.gram)
    assert err == pytest.approx(lstsq_error(problem.w_down, x, keep), abs=1e-6)


def _indefinite_hinv() -> torch.Tensor:
    """Symmetric, positive diagonal, but indefinite: after removing column 0 the downdated
    pivot of column 1 is 1 - 0.9^2 / 0.5 < 0."""
    h = torch.eye(4, dtype=F64)
    h[0, 0] = 0.5
    h[0, 1] = h[1, 0] = 0.9
    return h


@pytest.mark.parametrize("block", [1, 2])
def test_an_indefinite_inverse_gram_stops_the_obs_search(block):
    w0 = torch.ones(3, 4, dtype=F64)
    w0[:, 0] = 0.1  # column 0 goes first
    with pytest.raises(SolveError, match="positive definiteness"):
        greedy_obs(w0, _indefinite_hinv(), 3, block=block)


def test_the_obs_solver_retries_with_ten_times_the_damping(monkeypatch):
    """A search that fails at the configured damping is run again with more, and the layer's
    record says at which damping it succeeded."""
    real = obs_module.greedy_obs
    seen = []

    def flaky(w, hinv, *args):
        seen.append(hinv)
        if len(seen) == 1:
            raise SolveError("the OBS search's inverse Gram lost positive definiteness")
        return real(w, hinv, *args)

    monkeypatch.setattr(obs_module, "greedy_obs", flaky)
    problem, _ = deficient_problem()
    decision = solve_layer(get_solver("obs", damp=0.01, solve_dtype="float64"), problem, 6, 4)
    assert len(seen) == 2
    assert decision.info["damping_retries"] == [{"n": N, "obs_damp": pytest.approx(0.1)}]
    # the retry's search really used the larger damping: its inverse Gram is smaller
    assert float(torch.diagonal(seen[1]).sum()) < float(torch.diagonal(seen[0]).sum())


def test_a_search_that_never_recovers_names_the_layer_and_the_fix(monkeypatch):
    def never(*_args):
        raise SolveError("the OBS search's inverse Gram lost positive definiteness")

    monkeypatch.setattr(obs_module, "greedy_obs", never)
    problem, _ = deficient_problem()
    with pytest.raises(SpapError) as e:
        solve_layer(get_solver("obs"), problem, 6, 4)
    assert str(e.value).startswith("layer 4: ")
    assert "--option solve_dtype=float64" in str(e.value) and "\n" not in str(e.value)


def test_a_decision_that_is_not_finite_is_not_cut_in():
    from spap.models import get_adapter

    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    layer = adapter.layers(model)[1]
    down = adapter.out_linear(layer)
    keep = torch.arange(0, down.in_features, 2)
    w = down.weight[:, keep].detach().to(F64).clone()
    before = down.weight.detach().clone()
    w[2, 3] = float("nan")
    with pytest.raises(SpapError, match="^layer 1: the new down projection holds NaN"):
        apply_decision(adapter, layer, Decision(keep, w), 1)
    assert torch.equal(adapter.out_linear(layer).weight, before)  # nothing was cut
    with pytest.raises(RuntimeError, match="not a sorted set"):
        apply_decision(adapter, layer, Decision(keep.flip(0), w.nan_to_num()), 1)


METHODS = [("magnitude", {}), ("wanda-sp", {}), ("obs", {}), ("fasp", {}),
           ("spap", {"recovery_epochs": 1})]


def _prune_with(model, method, options):
    import spap

    return spap.prune(model, calib_ids=random_ids(4, 16, seed=1), sparsity=0.5, method=method,
                      method_options=options, batch_size=2)


def _one_line_naming_layer_one(e: pytest.ExceptionInfo) -> None:
    msg = str(e.value)
    assert msg.startswith("layer 1: ") and "\n" not in msg, msg
    assert "--dtype float32" in msg or "--option damp=" in msg, msg


@pytest.mark.parametrize("method,options", METHODS, ids=[m for m, _ in METHODS])
def test_a_nan_weight_stops_the_run_at_its_layer(method, options):
    model = tiny_model("llama")
    with torch.no_grad():  # one output row of layer 1's down projection: every column holds it
        model.model.layers[1].mlp.down_proj.weight[5] = float("nan")
    with pytest.raises(SpapError) as e:
        _prune_with(model, method, options)
    _one_line_naming_layer_one(e)


@pytest.mark.parametrize("name,options", [("obs", {}), ("fasp", {}),
                                          ("spap", {"recovery": "none"})],
                         ids=["obs", "fasp", "spap"])
def test_nan_statistics_stop_the_solve_with_the_layer(name, options):
    """A Gram with one NaN entry (the driver refuses NaN activations as it collects them; this
    is the solve's own guard, e.g. for statistics summed from another process)."""
    problem, _ = deficient_problem(2)
    problem.stats.gram[4, 4] = float("nan")
    with pytest.raises(SpapError) as e:
        solve_layer(get_solver(name, **options), problem, 6, 1)
    _one_line_naming_layer_one(e)


def test_the_retry_is_in_the_layer_record_of_a_run():
    """A dead channel in layer 0 of a real forward (its gate and up rows zero: it never
    fires), pruned without damping: the run goes through, and that layer's record, not the
    other's, says the solve needed more damping."""
    import spap

    model = tiny_model("llama")
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[5] = 0
        mlp.up_proj.weight[5] = 0
    # (256 tokens for 96 channels: layer 1's Gram has full rank)
    res = spap.prune(model, calib_ids=random_ids(8, 32, seed=1), sparsity=0.5, method="obs",
                     method_options={"damp": 0.0, "solve_dtype": "float64"}, batch_size=4)
    assert res.layers[0].info["damping_retries"]
    assert "damping_retries" not in res.layers[1].info
    assert 5 not in res.layers[0].keep
    assert all(torch.isfinite(p).all() for p in model.parameters())
