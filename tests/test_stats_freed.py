"""The driver's statistics (the Grams, n x n float64 each, and the drift sums) are freed once
SPAP's recovery no longer needs them: before its Adam epochs, not at the end of the layer."""

from __future__ import annotations

import weakref

import pytest

import spap
from conftest import random_ids, tiny_model
from spap.solvers import spap as spap_solver
from spap.solvers import stats


@pytest.mark.parametrize("drift", [False, True])
def test_the_grams_are_gone_when_recovery_starts(monkeypatch, drift):
    refs: list[weakref.ref] = []
    alive_at_start: list[int] = []
    result = stats.StatsAccumulator.result

    def remember(self, drift_stats=None):
        out = result(self, drift_stats)
        refs.extend(weakref.ref(t) for t in (out.gram, out.gram_heldout) if t is not None)
        if drift_stats is not None:
            refs.extend(weakref.ref(t) for t in (drift_stats.cross, drift_stats.cross_heldout)
                        if t is not None)
        return out

    real = spap_solver.recover

    def check(*a, **k):
        alive_at_start.append(sum(r() is not None for r in refs))
        return real(*a, **k)

    monkeypatch.setattr(stats.StatsAccumulator, "result", remember)
    monkeypatch.setattr(spap_solver, "recover", check)
    options = {"recovery_epochs": 1, "refit": "ridge"}
    if drift:
        options["refit_target"] = "drift"
    spap.prune(tiny_model("llama"), calib_ids=random_ids(16, 32, seed=1), sparsity=0.5,
               method="spap", method_options=options, batch_size=4)
    assert refs and len(alive_at_start) == 2  # (both layers recovered)
    assert alive_at_start == [0, 0]
