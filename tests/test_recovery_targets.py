"""The two recovery targets of SPAP_METHOD.md section 4, as the pipeline hands them over:
`layer` is the dense MLP on the pruned model's inputs, `model` the dense model's own MLP
output at that layer."""

from __future__ import annotations

import copy

import pytest
import torch

import spap
from conftest import random_ids, tiny_model
from spap.models import get_adapter
from spap.solvers.spap import SpapSolver

_SOLVE = SpapSolver.solve


def _targets_seen(model, calib, target, monkeypatch):
    seen = []
    orig = _SOLVE

    def spy(self, problem, k):
        seen.append((problem.inputs.clone(), problem.targets.clone(), problem.heldout_tokens))
        return orig(self, problem, k)

    monkeypatch.setattr(SpapSolver, "solve", spy)
    spap.prune(model, calib_ids=calib, sparsity=0.5, compute="float32",  # (as the reference)
               method_options={"recovery_target": target, "recovery_epochs": 1})
    return seen


def _dense_mlp_outputs(dense, calib):
    adapter = get_adapter(dense.config)
    outs = {}
    hooks = [adapter.out_linear(layer).register_forward_hook(
        lambda _m, _a, o, i=i: outs.setdefault(i, []).append(o.reshape(-1, o.shape[-1])))
        for i, layer in enumerate(adapter.layers(dense))]
    with torch.no_grad():
        dense(calib, use_cache=False)
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in outs.items()}


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_model_target_is_the_dense_models_mlp_output(family, monkeypatch):
    dense = tiny_model(family)
    calib = random_ids(8, 16, seed=3)
    ref = _dense_mlp_outputs(dense, calib)
    seen_model = _targets_seen(copy.deepcopy(dense), calib, "model", monkeypatch)
    seen_layer = _targets_seen(copy.deepcopy(dense), calib, "layer", monkeypatch)
    assert len(seen_model) == len(seen_layer) == 2
    for i, (_, t, n_val) in enumerate(seen_model):
        assert n_val == 16  # one of 8 windows held out: its 16 tokens
        torch.testing.assert_close(t, ref[i], rtol=1e-5, atol=1e-6)
    # layer 0 sees the dense inputs either way; layer 1 sees pruned inputs, so the targets differ
    torch.testing.assert_close(seen_layer[0][1], seen_model[0][1])
    assert not torch.allclose(seen_layer[1][1], seen_model[1][1], atol=1e-4)


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="recovery_target"):
        spap.prune(tiny_model("llama"), calib_ids=random_ids(4, 16), sparsity=0.5,
                   method_options={"recovery_target": "teacher"})
