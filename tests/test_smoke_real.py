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
    """All 30 layers at 30% with SPAP's fast setting (greedy start, refit toward dense) on
    8 x 128 calibration tokens: reloads exactly, and perplexity rises but stays sane."""
    from transformers import AutoModelForCausalLM

    model, tok, _ = smollm
    dense = perplexity(model, tok, seqlen=128, windows=4)["ppl"]
    res = spap.prune(model, tok, 0.3, nsamples=8, seqlen=128,
                     method_options={"starts": "greedy", "iters": 0})
    assert [r.kept for r in res.layers] == [1075] * 30
    assert all(0 < r.rel_error < 0.5 for r in res.layers)
    assert model.config.intermediate_size == 1075
    out = spap.save_pruned(model, tok, tmp_path / "x", res.report, check_ids=res.calib_ids[:1, :32])
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    assert again.config.intermediate_size == 1075
    ids = res.calib_ids[:1, :48]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=1e-4)
    pruned = perplexity(again, tok, seqlen=128, windows=4)["ppl"]
    assert math.isfinite(pruned) and dense < pruned < 3 * dense, (dense, pruned)
