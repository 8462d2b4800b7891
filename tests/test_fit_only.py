"""Decisions see the fit windows only; the held-out windows choose settings; the final refit
uses all windows (`stats.ActStats.fit`, the one rule).

Each test plants held-out tokens that would flip the decision if a decision saw them, so it
fails as soon as held-out statistics leak into a decision."""

from __future__ import annotations

import pytest
import torch

import spap
from conftest import random_ids, tiny_model
from spap.data import heldout_windows
from spap.solvers import get_solver
from spap.solvers.base import LayerProblem
from spap.solvers.heads import HeadLayout, HeadProblem, HeadSolver
from spap.solvers.refit import damp, refit_down
from spap.solvers.stats import StatsAccumulator, stats_from_activations

F64 = torch.float64
N, M, KEEP = 8, 6, 4


def _planted(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit tokens whose channels 4..7 are the large ones; held-out tokens where only channels
    0..3 are, and far larger: seen by a decision, they would keep 0..3."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.3, 0.4, 0.5, 0.6, 2.0, 2.5, 3.0, 3.5], dtype=F64)
    fit = torch.randn(400, N, generator=g, dtype=F64) * scale
    held = torch.randn(60, N, generator=g, dtype=F64) * torch.tensor([40.0] * 4 + [0.0] * 4,
                                                                      dtype=F64)
    return fit, held


def _stats(fit: torch.Tensor, held: torch.Tensor, want_gram: bool = True):
    acc = StatsAccumulator(N, want_gram)
    acc.add(fit)
    acc.add(held, heldout=True)
    return acc.result()


def test_fit_statistics_are_those_of_the_fit_tokens_alone():
    fit, held = _planted()
    s = _stats(fit, held).fit()
    ref = stats_from_activations(fit)
    assert s.count == ref.count and s.gram_heldout is None
    for a, b in ((s.sum, ref.sum), (s.sqsum, ref.sqsum), (s.gram, ref.gram)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)
    assert _stats(fit, held).fit(gram=False).gram is None
    assert _stats(fit, held).fit(dtype=torch.float32).gram.dtype == torch.float32


@pytest.mark.parametrize("method,options", [
    ("wanda-sp", {}), ("flap", {}), ("fasp", {}), ("obs", {}), ("obs", {"refit": "ridge"}),
    ("spap", {"recovery": "none"}),
])
def test_held_out_tokens_do_not_choose_the_channels(method, options):
    fit, held = _planted()
    w0 = torch.randn(M, N, generator=torch.Generator().manual_seed(1), dtype=F64)
    solver = get_solver(method, **options)

    def keep_of(stats):
        prob = LayerProblem(w_down=w0, w_in={"up": torch.eye(N, dtype=F64)}, stats=stats)
        return solver.solve(prob, KEEP).keep.tolist()

    assert keep_of(stats_from_activations(torch.cat([fit, held]))) == [0, 1, 2, 3]  # the plant
    assert keep_of(_stats(fit, held, solver.needs_gram)) == [4, 5, 6, 7]


def test_the_final_refit_uses_all_windows():
    """The exact refit of the (fit-chosen) mask is solved on the Gram of every window."""
    fit, held = _planted()
    w0 = torch.randn(M, N, generator=torch.Generator().manual_seed(1), dtype=F64)
    solver = get_solver("obs", solve_dtype="float64")
    stats = _stats(fit, held)
    dec = solver.solve(LayerProblem(w_down=w0, w_in={"up": torch.eye(N, dtype=F64)},
                                    stats=stats), KEEP)
    want = refit_down(w0, damp(stats.gram, solver.damp), dec.keep)
    fit_only = refit_down(w0, damp(stats.fit().gram, solver.damp), dec.keep)
    torch.testing.assert_close(dec.w_down, want, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(dec.w_down, fit_only, rtol=1e-3, atol=1e-3)
    assert dec.info["obs_refit_gap"] < 1e-6  # OBS weights = the refit on the decision's Gram


@pytest.mark.parametrize("method", ["obs", "wanda-sp", "flap"])
def test_held_out_tokens_do_not_choose_the_heads(method):
    """Two KV groups of two heads (head_dim 2): fit tokens make heads 1 and 3 large, held-out
    tokens heads 0 and 2."""
    lay = HeadLayout(n_heads=4, n_kv=2, head_dim=2)
    g = torch.Generator().manual_seed(2)
    big_fit = torch.tensor([0.3, 0.3, 3.0, 3.0] * 2, dtype=F64)
    big_held = torch.tensor([40.0, 40.0, 0.0, 0.0] * 2, dtype=F64)
    fit = torch.randn(400, 8, generator=g, dtype=F64) * big_fit
    held = torch.randn(60, 8, generator=g, dtype=F64) * big_held
    acc = StatsAccumulator(8, True)
    acc.add(fit)
    acc.add(held, heldout=True)
    w_o = torch.randn(5, 8, generator=g, dtype=F64)
    solver = HeadSolver(method=method)

    def kept(stats):
        return solver.solve(HeadProblem(w_o, stats, lay), keep_per_group=1).keep_heads.tolist()

    assert kept(stats_from_activations(torch.cat([fit, held]))) == [0, 2]  # the plant
    assert kept(acc.result()) == [1, 3]


def _swap_heldout(ids: torch.Tensor) -> torch.Tensor:
    """The same windows with the held-out ones (the last) replaced by one repeated token."""
    out = ids.clone()
    out[ids.shape[0] - heldout_windows(ids.shape[0]):] = 7
    return out


@pytest.mark.parametrize("method,options", [("obs", {"refit": "exact"}),
                                            ("spap", {"recovery": "none"}),
                                            ("wanda-sp", {})])
def test_pipeline_masks_do_not_depend_on_the_held_out_windows(method, options):
    """Through the driver: other held-out windows leave the first layer's mask as it is, while
    its refit (all windows) changes."""
    ids = random_ids(16, 16, seed=3)
    runs = []
    for calib in (ids, _swap_heldout(ids)):
        m = tiny_model("llama")
        res = spap.prune(m, calib_ids=calib, sparsity=0.5, method=method,
                         method_options=options, layer_limit=1, batch_size=4)
        runs.append((res.layers[0].keep, m.model.layers[0].mlp.down_proj.weight.clone()))
    assert runs[0][0] == runs[1][0]
    if method != "wanda-sp":  # (no refit: the kept columns are the dense ones)
        assert not torch.allclose(runs[0][1], runs[1][1])


def test_the_head_driver_marks_the_held_out_batches():
    """o_proj's statistics as the driver collects them: their fit part (what the head decision
    reads) is that of the fit batches alone, the Gram of all batches stays for the refit."""
    from spap.driver.heads import collect_o_stats
    from spap.models import get_attention_adapter
    from test_heads_driver import layer_inputs

    model = tiny_model("llama")
    attn = get_attention_adapter(model.config)
    layer = attn.layers(model)[0]
    batches = layer_inputs(model, layer, [random_ids(2, 12, seed=s) for s in range(3)])
    both = collect_o_stats(attn, layer, batches, heldout_batches=1)
    fit_only = collect_o_stats(attn, layer, batches[:2])
    everything = collect_o_stats(attn, layer, batches)
    fit = both.fit()
    assert fit.count == fit_only.count < both.count == everything.count
    for a, b in ((fit.sum, fit_only.sum), (fit.sqsum, fit_only.sqsum),
                 (fit.gram, fit_only.gram), (both.gram, everything.gram)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
