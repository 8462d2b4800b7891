"""Smoke test on the real SmolLM2-135M (offline package): prune a few layers with few samples,
save, reload with stock transformers, and check perplexity stays finite and close."""

from __future__ import annotations

import math

import pytest
import torch

import spap
from spap.eval.ppl import perplexity

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm():
    try:
        return spap.load_model("smollm2-135m")
    except spap.SpapError as e:
        pytest.skip(str(e))


def test_prune_reload_ppl(smollm, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok, _ = smollm
    # The first 4 of 30 real layers: a real (if weak) model that prunes in seconds.
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    model.config.layer_types = model.config.layer_types[:4] if getattr(
        model.config, "layer_types", None) else None
    dense = perplexity(model, tok, seqlen=128, windows=4)["ppl"]
    res = spap.prune(model, tok, 0.3, nsamples=8, seqlen=128)
    assert [r.kept for r in res.layers] == [1075] * 4
    assert all(0 < r.rel_error < 0.5 for r in res.layers)
    out = spap.save_pruned(model, tok, tmp_path / "x", res.report, check_ids=res.calib_ids[:1, :32])
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = res.calib_ids[:1, :48]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=1e-4)
    pruned = perplexity(again, tok, seqlen=128, windows=4)["ppl"]
    assert math.isfinite(pruned) and dense <= pruned * 1.05 and pruned < dense * 1.5
