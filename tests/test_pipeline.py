"""The pipeline on every family: cut == masked dense, 0% is a no-op, save/reload is exact;
probe windows give a held-out layer error without touching the fit."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import spap
from conftest import FAMILIES, random_ids, tiny_model
from spap.data import eval_windows, probe_windows, token_hash
from spap.driver.records import n_keep_for
from spap.driver.surgery import masked_dense
from spap.errors import SpapError
from spap.models import get_adapter

METHODS_BY_FAMILY = [(f, m) for f in FAMILIES for m in ("spap", "obs", "flap")]


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("family,method", METHODS_BY_FAMILY)
def test_cut_equals_masked_dense(family, method):
    if method == "flap" and family in ("qwen2", "mistral"):
        pytest.skip("flap's bias cannot be stored in this family (tested below)")
    dense = tiny_model(family)
    model = copy.deepcopy(dense)
    calib = random_ids(8, 32, seed=1)
    res = spap.prune(model, calib_ids=calib, sparsity=0.5, method=method)
    adapter = get_adapter(model.config)
    n = adapter.width(dense.config)
    assert adapter.width(model.config) == n_keep_for(n, 0.5) < n
    for layer in adapter.layers(model):
        assert adapter.out_linear(layer).weight.shape[1] == n_keep_for(n, 0.5)
    ref = masked_dense(dense, model, adapter, [r.keep for r in res.layers])
    ids = random_ids(2, 24, seed=2)
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)
    assert res.report["params_after"] < res.report["params_before"]
    # the pruned model is not the dense one: something was actually removed and refit
    assert not torch.allclose(logits(model, ids), logits(dense, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_sparsity_changes_nothing(family):
    dense = tiny_model(family)
    model = copy.deepcopy(dense)
    res = spap.prune(model, calib_ids=random_ids(4, 16), sparsity=0.0)
    ids = random_ids(2, 24, seed=3)
    assert torch.equal(logits(model, ids), logits(dense, ids))
    assert res.report["params_after"] == res.report["params_before"]
    assert all(r.rel_error == 0 for r in res.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_same_logits(family, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    res = spap.prune(model, calib_ids=random_ids(8, 32), sparsity=0.3, round_to=8)
    out = spap.save_pruned(model, tokenizer, tmp_path / "out", res.report,
                           check_ids=random_ids(1, 16))
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = random_ids(2, 20, seed=5)
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=1e-6)
    rep = json.loads((out / "spap.json").read_text())
    width = rep["model"]["width_after"]
    assert width % 8 == 0 and width == get_adapter(again.config).width(again.config)
    for key in ("method", "options", "sparsity_requested", "sparsity_achieved", "params_before",
                "params_after", "layers", "calibration", "timings", "versions", "reload_check"):
        assert key in rep
    assert rep["calibration"]["token_hash"] and len(rep["layers"]) == 2
    assert {"kept", "rel_error", "keep"} <= set(rep["layers"][0])
    assert not list(tmp_path.glob(".*spap-tmp*"))


def test_flap_bias_on_llama_reloads(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    res = spap.prune(model, calib_ids=random_ids(8, 32), sparsity=0.5, method="flap")
    assert model.config.mlp_bias is True
    out = spap.save_pruned(model, tokenizer, tmp_path / "o", res.report, check_ids=random_ids(1, 8))
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = random_ids(1, 12, seed=9)
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=1e-6)


def test_flap_refused_where_bias_cannot_be_saved():
    with pytest.raises(SpapError, match="bias"):
        spap.prune(tiny_model("qwen2"), calib_ids=random_ids(2, 8), sparsity=0.5, method="flap")


def test_layer_error_is_measured_and_refit_beats_no_refit():
    calib = random_ids(16, 32, seed=4)
    errs = {}
    for method in ("wanda-sp", "fasp"):
        model = tiny_model("llama")
        res = spap.prune(model, calib_ids=calib, sparsity=0.5, method=method)
        errs[method] = [r.rel_error for r in res.layers]
    # same decision, fasp adds the exact least-squares refit: the first layer's error (same
    # inputs for both) must drop
    assert 0 < errs["fasp"][0] < errs["wanda-sp"][0]


def test_n_keep_rounding():
    assert n_keep_for(1536, 0.3) == 1075
    assert n_keep_for(1536, 0.3, 64) == 1088
    assert n_keep_for(1536, 0.3, 128) == 1024
    assert n_keep_for(96, 0.0, 8) == 96
    assert n_keep_for(10, 0.99, 8) == 8


@pytest.mark.parametrize("family,method", [("llama", "spap"), ("llama", "obs"), ("opt", "fasp")])
def test_probes_do_not_influence_the_fit(family, method):
    """Probe windows only run after the cut: keep indices, weights and the in-sample error are
    bit-identical to a run without them."""
    calib = random_ids(8, 32, seed=1)
    plain, probed = tiny_model(family), tiny_model(family)
    a = spap.prune(plain, calib_ids=calib, sparsity=0.5, method=method, batch_size=3)
    b = spap.prune(probed, calib_ids=calib, sparsity=0.5, method=method, batch_size=3,
                   probe_ids=random_ids(5, 24, seed=7))
    for ra, rb in zip(a.layers, b.layers, strict=True):
        assert ra.keep == rb.keep and ra.rel_error == rb.rel_error and ra.info == rb.info
    sa, sb = plain.state_dict(), probed.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.report["layer_error_mean"] == b.report["layer_error_mean"]


def test_heldout_error_fields():
    calib = random_ids(8, 32, seed=1)
    probe = random_ids(3, 24, seed=7)
    res = spap.prune(tiny_model("llama"), calib_ids=calib, sparsity=0.5, method="obs")
    assert all(r.rel_error_heldout is None for r in res.layers)
    assert res.report["layer_error_heldout_mean"] is None and res.report["probe"] is None

    res = spap.prune(tiny_model("llama"), calib_ids=calib, sparsity=0.5, method="obs",
                     probe_ids=probe)
    held = [r.rel_error_heldout for r in res.layers]
    assert all(isinstance(e, float) and math.isfinite(e) and e > 0 for e in held)
    assert res.report["layer_error_heldout_mean"] == pytest.approx(sum(held) / len(held))
    assert res.report["probe"] == {"windows": 3, "seqlen": 24, "tokens": 72,
                                   "token_hash": token_hash(probe)}
    assert all("probe" in r.seconds for r in res.layers)
    json.dumps(res.report, allow_nan=False)

    res = spap.prune(tiny_model("llama"), calib_ids=calib, sparsity=0.0, probe_ids=probe)
    assert all(r.rel_error_heldout == 0.0 for r in res.layers)
    assert res.report["layer_error_heldout_mean"] == 0.0


def test_probes_equal_to_calibration_give_the_in_sample_error():
    """The held-out error is the same measurement on other windows: on the calibration windows
    themselves it must reproduce the in-sample error of every layer (probes propagated through
    the pruned layers exactly as the calibration batches are)."""
    calib = random_ids(6, 32, seed=2)
    res = spap.prune(tiny_model("qwen2"), calib_ids=calib, sparsity=0.5, method="fasp",
                     probe_ids=calib.clone())
    for r in res.layers:
        assert r.rel_error_heldout == pytest.approx(r.rel_error, rel=1e-12)


def test_bad_probe_shape_is_refused():
    with pytest.raises(SpapError, match="probe_ids"):
        spap.prune(tiny_model("llama"), calib_ids=random_ids(2, 8), sparsity=0.5,
                   probe_ids=random_ids(1, 8).flatten())


def test_probe_windows_come_from_the_end_disjoint_from_evaluation():
    stream = torch.arange(100)
    p = probe_windows(stream, 3, 10, skip=70)
    assert p.shape == (3, 10) and p.dtype == stream.dtype
    assert torch.equal(p.flatten(), torch.arange(70, 100))
    w = eval_windows(stream[:70], 10)
    assert not set(w.flatten().tolist()) & set(p.flatten().tolist())
    with pytest.raises(SpapError, match=r"overlap the first 71 tokens.*--probe-windows"):
        probe_windows(stream, 3, 10, skip=71)
    with pytest.raises(SpapError, match="probe windows"):
        probe_windows(stream, 0, 10, skip=0)
