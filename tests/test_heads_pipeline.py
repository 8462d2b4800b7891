"""Head pruning through the driver and the run path: `--heads` / `--kv-groups` with the MLP,
saved and reloaded by stock transformers, resumed, refused where it cannot apply."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import spap
from conftest import TEXT, random_ids, run_cli, tiny_model
from spap.api import prune_to_disk
from spap.driver.head_surgery import zero_heads
from spap.errors import SpapError
from spap.modelio.runfolder import partial_dir
from spap.models import get_attention_adapter
from test_large import SETTINGS, interrupted_then_resumed, outputs_equal, saved


@pytest.fixture
def calib_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("\n\n".join(f"{i}. {TEXT * 4}" for i in range(40)))
    return p


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_heads_without_refit_equal_the_dense_model_with_those_heads_zeroed():
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    ids = random_ids(16, 24, seed=1)
    res = spap.prune(model, calib_ids=ids, sparsity=0.0, heads=0.5,
                     head_options={"update": False}, batch_size=2)
    attn = get_attention_adapter(dense.config)
    ref = copy.deepcopy(dense)
    for rec, layer in zip(res.layers, attn.layers(ref)):
        assert len(rec.heads["kept_heads"]) == 2  # 1 of 2 per KV group
        zero_heads(attn, layer, dense.config, torch.tensor(rec.heads["kept_heads"]))
    x = random_ids(2, 24, seed=5)
    torch.testing.assert_close(_logits(model, x), _logits(ref, x), rtol=1e-5, atol=1e-5)
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 2
    rep = res.report["heads"]
    assert (rep["heads_before"], rep["heads_after"]) == (4, 2)
    assert res.report["params_non_embedding_removed_frac"] > 0


def test_no_heads_changes_nothing_and_reports_none():
    a, b = tiny_model("llama"), tiny_model("llama")
    ids = random_ids(16, 24, seed=1)
    ra = spap.prune(a, calib_ids=ids, sparsity=0.3, batch_size=2)
    rb = spap.prune(b, calib_ids=ids, sparsity=0.3, heads=0.0, kv_groups=0.0, batch_size=2)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ra.report["heads"] is None and rb.report["heads"] is None


@pytest.mark.parametrize("flags", [dict(heads=0.5), dict(kv_groups=0.5),
                                   dict(heads=0.5, kv_groups=0.5)])
def test_saved_head_pruned_model_reloads_with_the_same_logits(tmp_path, calib_file, flags):
    from transformers import AutoModelForCausalLM

    src = saved(tmp_path, "llama")
    job = prune_to_disk(str(src), tmp_path / "out", 0.3, method="obs",
                        **dict(SETTINGS, calib=str(calib_file)), **flags)
    rep = job.report["heads"]
    back = AutoModelForCausalLM.from_pretrained(job.out).eval()
    kv = 1 if "kv_groups" in flags else 2
    q = kv * (1 if "heads" in flags else 2)
    assert (back.config.num_key_value_heads, back.config.num_attention_heads) == (kv, q)
    assert (rep["kv_heads_after"], rep["heads_after"]) == (kv, q)
    saved_report = json.loads((job.out / "spap.json").read_text())
    assert saved_report["heads"]["heads_after"] == q
    assert saved_report["params_after"] < saved_report["params_before"]


@pytest.mark.parametrize("family,low_memory", [("phi3", False), ("llama", True)])
def test_resumed_head_pruned_run_equals_the_uninterrupted_one(tmp_path, calib_file,
                                                              monkeypatch, family, low_memory):
    # the resumed layers come back cut from the resume folder: their attention modules must
    # be told their head counts (Phi-3 reads them from its config), or the next layers'
    # inputs are wrong or the forward fails
    src = saved(tmp_path, family)
    kw = dict(SETTINGS, calib=str(calib_file), method="obs", heads=0.5, low_memory=low_memory)
    whole = prune_to_disk(str(src), tmp_path / "whole", 0.3, **kw)
    again = interrupted_then_resumed(monkeypatch, src, tmp_path / "cut", 2, **kw)
    assert again.report["resumed_from_layer"] == 2
    outputs_equal(whole.out, again.out)  # every file byte for byte


def test_heads_on_a_family_without_prunable_heads_is_refused(tmp_path, calib_file, capsys):
    src = saved(tmp_path, "opt")
    out = tmp_path / "o"
    capsys.readouterr()
    code, _, err = run_cli(["prune", src, "--sparsity", "0.3", "--heads", "0.5", "--out", out,
                            "--nsamples", "6", "--seqlen", "32", "--calib", calib_file,
                            "--device", "cpu"], capsys)
    assert code == 2 and "opt" in err and "supported:" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and not partial_dir(out).exists()


def test_head_settings_are_checked():
    with pytest.raises(SpapError, match="--heads must be in"):
        spap.prune(tiny_model("llama"), calib_ids=random_ids(8, 16), heads=1.0)
    with pytest.raises(SpapError, match="layer limit"):
        spap.prune(tiny_model("llama"), calib_ids=random_ids(8, 16), heads=0.5,
                   layer_limit=1)
    with pytest.raises(SpapError, match="unknown head option"):
        spap.prune(tiny_model("llama"), calib_ids=random_ids(8, 16), heads=0.5,
                   head_options={"bogus": 1})
    with pytest.raises(SpapError, match="removes none"):  # 2 heads per group: 0.2 rounds to 0
        spap.prune(tiny_model("llama"), calib_ids=random_ids(8, 16), heads=0.2)
    with pytest.raises(SpapError, match="dense model's hidden states"):
        spap.prune(tiny_model("llama"), calib_ids=random_ids(8, 16), heads=0.5,
                   method="obs", method_options={"refit": "ridge", "refit_target": "drift"})


def test_heldout_head_error_on_probes_equal_to_calibration_is_the_in_sample_error():
    # probes that are the calibration windows themselves: the held-out error of each layer's
    # head step must then be its in-sample error (the same tokens, the same formula; the
    # exact refit's in-sample Gram is over all 8 windows)
    ids = random_ids(8, 24, seed=1)
    model = tiny_model("llama")
    res = spap.prune(model, calib_ids=ids, probe_ids=ids, sparsity=0.0, heads=0.5,
                     head_options={"refit": "exact"}, batch_size=2)
    for rec in res.layers:
        assert rec.heads["rel_error"] > 0
        # (the probes are batched otherwise: float32 per-batch Grams, summed in float64)
        assert rec.heads["rel_error_heldout"] == pytest.approx(rec.heads["rel_error"],
                                                               rel=1e-4)
    assert res.report["heads"]["layer_error_heldout_mean"] == pytest.approx(
        res.report["heads"]["layer_error_mean"], rel=1e-4)


def test_compare_runs_head_variants_on_the_same_tokens(tmp_path):
    from spap.compare import compare, parse_variants

    variants = parse_variants("obs-h=obs:heads=0.5;head.refit=exact,"
                              "wanda-h=obs:heads=0.5;head_method=wanda-sp")
    assert variants[0].settings == {"heads": 0.5, "head_options": {"refit": "exact"}}
    assert variants[1].options == {} and variants[1].settings["head_method"] == "wanda-sp"
    ids = random_ids(16, 24, seed=1)
    from conftest import byte_tokenizer

    result = compare(tiny_model("llama"), byte_tokenizer(), variants, [0.0], calib_ids=ids,
                     eval_stream=random_ids(1, 200, seed=4)[0], eval_seqlen=24,
                     probe_ids=random_ids(4, 24, seed=2))
    recs = {r["method"]: r for r in result["records"]}
    for r in recs.values():
        assert r["heads"]["heads_after"] == 2 and r["params_non_embedding_removed_frac"] > 0
    assert recs["wanda-h"]["heads"]["method"] == "wanda-sp"
    with pytest.raises(SpapError, match="--heads must be in"):
        parse_variants("x=obs:heads=2")
