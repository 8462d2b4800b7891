"""The adapter contract, on a tiny random model of every supported family: the adapter reads
the MLP as transformers runs it, the cut model equals the dense one with those channels
zeroed, 0% changes nothing, the saved model reloads with stock transformers, and `spap prune`
works on a saved folder. Plus the fused gate_up slice against an unfused oracle, the refusals,
and the README's generated family list."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import spap
from conftest import ALL_FAMILIES, byte_tokenizer, random_ids, run_cli, tiny_model
from spap.driver.records import n_keep_for
from spap.driver.surgery import apply_decision, masked_dense, zero_channels
from spap.errors import SpapError
from spap.models import FAMILIES, get_adapter, markdown
from spap.models.layout import FamilyAdapter
from spap.solvers.base import Decision

README = Path(__file__).resolve().parents[1] / "README.md"

# Families whose saved config can carry a new down-projection bias (FLAP's compensation): an
# MLP-only flag (`mlp_bias`), MLP biases always present (phi, gpt_neox), or a shared flag that
# the tiny config has on already (OPT's enable_bias, StarCoder2's use_bias).
BIAS_SAVEABLE = {"opt", "llama", "granite", "smollm3", "helium", "seed_oss", "nemotron", "arcee",
                 "phi", "starcoder2", "gpt_neox"}


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("family", ALL_FAMILIES)
class TestAdapterContract:
    def test_reads_the_mlp_as_transformers_runs_it(self, family):
        """mlp_forward on in_weights/in_biases reproduces the real down-projection output,
        captured inside the model's own forward; the roles and shapes are the contract's."""
        model = tiny_model(family)
        adapter = get_adapter(model.config)
        layer = adapter.layers(model)[1]
        seen = {}
        first = next(iter(adapter.in_linears(layer).values()))
        # clones: Falcon adds the attention output into the MLP output in place
        hooks = [first.register_forward_pre_hook(lambda _m, a: seen.update(a=a[0].clone())),
                 adapter.out_linear(layer).register_forward_hook(
                     lambda _m, _a, out: seen.update(out=out.clone()))]
        try:
            logits(model, random_ids(2, 12, seed=4))
        finally:
            for h in hooks:
                h.remove()
        w, b = adapter.in_weights(layer), adapter.in_biases(layer)
        n, d = adapter.width(model.config), seen["a"].shape[-1]
        gated = adapter.linear_key is not None
        assert set(w) == ({"gate", "up"} if gated else {"up"})
        assert all(t.shape == (n, d) for t in w.values())
        assert all(t.shape == (n,) for t in b.values()) and set(b) <= set(w)
        down = adapter.out_linear(layer)
        out = adapter.mlp_forward(w, b, down.weight, down.bias, adapter.activation(layer),
                                  seen["a"])
        torch.testing.assert_close(out, seen["out"], rtol=1e-5, atol=1e-6)
        g = adapter.gate_act(layer, seen["a"])
        assert (g is not None) == gated and (g is None or g.shape == (*seen["a"].shape[:-1], n))

    def test_cut_equals_dense_with_channels_zeroed(self, family):
        """A score-only cut is the dense model with the removed down columns zeroed; a refit
        cut (SPAP with recovery) is `masked_dense` of its own weights."""
        dense = tiny_model(family)
        ids = random_ids(2, 20, seed=2)
        calib = random_ids(4, 16, seed=1)
        n = get_adapter(dense.config).width(dense.config)

        model = copy.deepcopy(dense)
        res = spap.prune(model, calib_ids=calib, sparsity=0.5, method="magnitude")
        adapter = get_adapter(model.config)
        assert adapter.width(model.config) == n_keep_for(n, 0.5) < n
        for layer in adapter.layers(model):
            assert adapter.out_linear(layer).in_features == n_keep_for(n, 0.5)
            assert all(t.shape[0] == n_keep_for(n, 0.5) for t in adapter.in_weights(layer).values())
        zeroed = copy.deepcopy(dense)
        for rec, layer in zip(res.layers, adapter.layers(zeroed), strict=True):
            zero_channels(adapter, layer, torch.tensor(rec.keep))
        torch.testing.assert_close(logits(model, ids), logits(zeroed, ids), rtol=1e-5, atol=1e-5)

        model = copy.deepcopy(dense)
        # enough held-out tokens (one window of 32) for recovery to pay on every family
        res = spap.prune(model, calib_ids=random_ids(8, 32, seed=1), sparsity=0.5,
                         method_options={"recovery_epochs": 2})
        # recovery rewrote input rows (fused halves included) in at least one layer
        assert any(r.info.get("recovery_epochs", 0) > 0 for r in res.layers)
        ref = masked_dense(dense, model, adapter, [r.keep for r in res.layers])
        torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logits(model, ids), logits(dense, ids))
        assert res.report["params_after"] < res.report["params_before"]

    def test_zero_sparsity_changes_nothing(self, family):
        dense = tiny_model(family)
        model = copy.deepcopy(dense)
        res = spap.prune(model, calib_ids=random_ids(2, 16), sparsity=0.0)
        ids = random_ids(2, 20, seed=3)
        assert torch.equal(logits(model, ids), logits(dense, ids))
        assert res.report["params_after"] == res.report["params_before"]

    def test_save_and_stock_reload(self, family, tmp_path, tokenizer):
        from transformers import AutoModelForCausalLM

        model = tiny_model(family)
        res = spap.prune(model, calib_ids=random_ids(4, 16), sparsity=0.3, round_to=8)
        out = spap.save_pruned(model, tokenizer, tmp_path / "out", res.report,
                               check_ids=random_ids(1, 12))
        again = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(again) is type(model)
        ids = random_ids(2, 20, seed=5)
        torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=1e-6)
        width = json.loads((out / "spap.json").read_text())["model"]["width_after"]
        assert width % 8 == 0 and width == get_adapter(again.config).width(again.config)

    def test_cli_prune_on_a_saved_folder(self, family, tmp_path, text_file, capsys):
        from transformers import AutoModelForCausalLM

        d, out = tmp_path / family, tmp_path / "pruned"
        tiny_model(family).save_pretrained(d)
        byte_tokenizer().save_pretrained(d)
        code, stdout, err = run_cli(["prune", d, "--sparsity", "0.5", "--nsamples", "2",
                                     "--seqlen", "16", "--device", "cpu", "--calib", text_file,
                                     "--out", out], capsys)
        assert code == 0, err
        again = AutoModelForCausalLM.from_pretrained(out)
        assert get_adapter(again.config).width(again.config) == 48  # 96 channels, half kept
        assert json.loads((out / "spap.json").read_text())["reload_check"][
            "max_abs_logit_diff"] <= 1e-4

    def test_bias_compensation_saved_or_refused(self, family, tmp_path, tokenizer):
        """FLAP adds a down-projection bias: saved and reloaded where the family's config can
        carry it, refused up front (with the reason) where it cannot."""
        from transformers import AutoModelForCausalLM

        model = tiny_model(family)
        calib = random_ids(4, 16)
        if family not in BIAS_SAVEABLE:
            with pytest.raises(SpapError, match="bias"):
                spap.prune(model, calib_ids=calib, sparsity=0.5, method="flap")
            return
        res = spap.prune(model, calib_ids=calib, sparsity=0.5, method="flap")
        out = spap.save_pruned(model, tokenizer, tmp_path / "o", res.report,
                               check_ids=random_ids(1, 8))
        again = AutoModelForCausalLM.from_pretrained(out).eval()
        adapter = get_adapter(again.config)
        assert all(adapter.out_linear(layer).bias is not None for layer in adapter.layers(again))
        ids = random_ids(1, 12, seed=9)
        torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=1e-6)


def test_every_supported_family_has_a_tiny_model():
    from spap.models import SUPPORTED

    assert sorted(ALL_FAMILIES) == list(SUPPORTED)


def test_multimodal_prunes_only_the_language_model():
    """Gemma-3 image-text: the language model's MLPs are cut, the vision tower and projector
    are bit-identical, and the width lands in text_config."""
    dense = tiny_model("gemma3")
    model = copy.deepcopy(dense)
    spap.prune(model, calib_ids=random_ids(2, 16), sparsity=0.5)
    assert model.config.text_config.intermediate_size == 48
    assert not hasattr(model.config, "intermediate_size")
    for name, p in dense.named_parameters():
        if "language_model" not in name:
            assert torch.equal(p, model.get_parameter(name)), name


# ---- fused gate_up_proj ------------------------------------------------------------------
def _unfused_oracle(fused_mlp: nn.Module, n: int) -> tuple[nn.Module, FamilyAdapter]:
    """A layer with a LLaMA MLP (separate gate_proj / up_proj) holding the two halves of
    `fused_mlp`'s gate_up_proj."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    w = fused_mlp.gate_up_proj.weight
    cfg = LlamaConfig(hidden_size=w.shape[1], intermediate_size=n, hidden_act="silu")
    layer = nn.Module()
    layer.mlp = LlamaMLP(cfg).to(w.dtype)
    with torch.no_grad():
        layer.mlp.gate_proj.weight.copy_(w[:n])
        layer.mlp.up_proj.weight.copy_(w[n:])
        layer.mlp.down_proj.weight.copy_(fused_mlp.down_proj.weight)
    return layer, FamilyAdapter("llama", FAMILIES["llama"])


@pytest.mark.parametrize("family", ["phi3", "glm4"])
def test_fused_slice_matches_unfused_oracle(family):
    """Cutting channels of a fused gate_up_proj keeps rows i and n + i; a refit `w_in["up"]`
    lands in the up half and the gate half keeps its dense rows; the cut fused MLP computes
    what the cut unfused oracle computes."""
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    layer = adapter.layers(model)[0]
    n = adapter.width(model.config)
    oracle, oracle_adapter = _unfused_oracle(layer.mlp, n)
    a = torch.randn(10, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(layer.mlp(a), oracle.mlp(a))
    dense_w = {role: w.clone() for role, w in adapter.in_weights(layer).items()}

    g = torch.Generator().manual_seed(1)
    keep = torch.sort(torch.randperm(n, generator=g)[: n // 2]).values
    refit_up = torch.randn(n // 2, a.shape[1], generator=g, dtype=torch.float64)
    w_down = torch.randn(a.shape[1], n // 2, generator=g, dtype=torch.float64)
    decision = Decision(keep=keep, w_down=w_down, w_in={"up": refit_up})
    apply_decision(adapter, layer, decision)
    apply_decision(oracle_adapter, oracle, decision)

    fused = layer.mlp.gate_up_proj.weight
    assert fused.shape == (n, a.shape[1])  # 2 * (n // 2) rows
    torch.testing.assert_close(fused[: n // 2], dense_w["gate"][keep])
    torch.testing.assert_close(fused[n // 2:], refit_up.float())
    cut = adapter.in_weights(layer)
    torch.testing.assert_close(cut["up"], refit_up.float())
    torch.testing.assert_close(cut["gate"], dense_w["gate"][keep])
    with torch.no_grad():
        torch.testing.assert_close(layer.mlp(a), oracle.mlp(a))
        act = adapter.activation(layer)
        torch.testing.assert_close(adapter.gate_act(layer, a), act(a @ dense_w["gate"][keep].T))


# ---- refusals ----------------------------------------------------------------------------
def _refused(argv, capsys, out, needle):
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("spap: error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert needle in errors[0], err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def _moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                          moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)


def _mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=96, num_local_experts=4)


def _per_layer_list_config():
    from transformers import AutoConfig

    return AutoConfig.for_model("gemma3n_text", vocab_size=256, hidden_size=64,
                                num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=[96, 64])


def _per_layer_override_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=96, per_layer_config={1: {"intermediate_size": 64}})


def _multimodal_config():
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig()


def _unknown_config():
    from transformers import GPT2Config

    return GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)


@pytest.mark.parametrize("make,needle", [
    (_moe_config, "mixture-of-experts"),
    (_mixtral_config, "mixture-of-experts model (num_experts=4)"),
    (_per_layer_list_config, "different MLP width per layer"),
    (_per_layer_override_config, "different MLP width per layer"),
    (_multimodal_config, "multimodal model_type 'qwen2_vl'"),
    (_unknown_config, "model_type 'gpt2' is not supported; supported: apertus, arcee,"),
], ids=["moe", "mixtral", "per-layer-list", "per-layer-override", "multimodal", "unknown"])
def test_refused_with_one_line_and_no_folder(make, needle, tmp_path, capsys):
    d = tmp_path / "model"
    make().save_pretrained(d)  # the family is checked from config.json, before any weights
    out = tmp_path / "out"
    _refused(["prune", d, "--sparsity", "0.3", "--out", out], capsys, out, needle)
    with pytest.raises(SpapError, match=re.escape(needle)):
        get_adapter(make())


def test_dense_config_with_a_single_expert_field_is_accepted():
    from transformers import LlamaConfig

    assert get_adapter(LlamaConfig(num_experts=1)).model_type == "llama"


# ---- the README --------------------------------------------------------------------------
def test_readme_family_list_is_generated(capsys):
    from spap.models.__main__ import main

    main(["--markdown"])
    printed = capsys.readouterr().out
    assert printed == markdown()
    assert markdown() in README.read_text(), (
        "README's family list is stale: paste `python -m spap.models --markdown`")
    for model_type in FAMILIES:
        assert f"`{model_type}`" in printed
