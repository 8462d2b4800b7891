"""The attention adapter contract, on a tiny random model of every family whose heads spap
prunes: a cut model computes what the dense one does with the removed heads' o_proj columns
zeroed (query heads within KV groups, and whole KV groups; one layer cut while the config still
holds the dense counts, as mid-pipeline, and every layer); keeping every head is bit-identical;
the saved cut model reloads with stock transformers and gives the same logits. Plus the table's
coverage and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import _MORE, ALL_FAMILIES, random_ids, tiny_model
from spap.driver.head_surgery import commit_head_counts, zero_heads
from spap.errors import SpapError
from spap.models import FAMILIES, HEADS_SUPPORTED, get_attention_adapter
from spap.models.attention import ATTENTION, REFUSED, LayerConfig

HEAD_FAMILIES = [f for f in ALL_FAMILIES if f in HEADS_SUPPORTED]
REFUSED_FAMILIES = [f for f in ALL_FAMILIES if f not in HEADS_SUPPORTED]
# Cohere's per-head q/k LayerNorms (weights (n_heads, head_dim)) are built only under
# use_qk_norm: a variant with it on, so the norm slicing is exercised
VARIANTS = [*HEAD_FAMILIES, "cohere-qk-norm"]


def build(family: str, seed: int = 0):
    if family != "cohere-qk-norm":
        return tiny_model(family, seed)
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model("cohere", **_MORE["cohere"], use_qk_norm=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norm weights, different per head
        for name, p in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.normal_(1.0, 0.3)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def choice(attn, config, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept heads: one query head removed from every KV group ("heads"), or the first KV
    group removed with its query heads ("kv"; on a model with one KV head per query head,
    the same as removing heads)."""
    n_heads, n_kv, _ = attn.head_layout(config)
    r = n_heads // n_kv
    if mode == "heads" and r > 1:
        keep = torch.tensor([h for h in range(n_heads) if h % r != (h // r) % r])
    else:  # whole groups: every group but the first
        keep = torch.arange(r, n_heads)
    return keep, torch.unique(keep // r)


def cut_copy(model, mode: str, layers: slice = slice(None)):
    """A copy with the chosen heads cut physically in `layers` (o_proj columns unchanged),
    and a dense-shaped copy with those heads' o_proj columns zeroed."""
    attn = get_attention_adapter(model.config)
    keep, kv = choice(attn, model.config, mode)
    cut, ref = copy.deepcopy(model), copy.deepcopy(model)
    for layer in list(attn.layers(cut))[layers]:
        attn.keep_heads(layer, cut.config, keep, kv)
    for layer in list(attn.layers(ref))[layers]:
        zero_heads(attn, layer, ref.config, keep)
    return attn, cut, ref, keep, kv


def test_the_table_covers_every_family():
    """Every MLP family is either supported or refused with a reason, never both."""
    assert set(ATTENTION) | set(REFUSED) == set(FAMILIES)
    assert not set(ATTENTION) & set(REFUSED)
    assert HEAD_FAMILIES and REFUSED_FAMILIES


@pytest.mark.parametrize("mode", ["heads", "kv"])
@pytest.mark.parametrize("family", VARIANTS)
class TestHeadCut:
    def test_one_layer_cut_mid_pipeline(self, family, mode):
        """Layer 0 cut, the config still dense (as while the pipeline runs): equal to the
        dense model with layer 0's removed heads zeroed. A deep copy (the pipeline copies
        layers) computes the same."""
        model = build(family)
        ids = random_ids(2, 12, seed=3)
        attn, cut, ref, keep, kv = cut_copy(model, mode, slice(0, 1))
        n_heads, n_kv, hd = attn.head_layout(model.config)
        assert attn.head_layout(cut.config) == (n_heads, n_kv, hd)  # config untouched
        layer = attn.layers(cut)[0]
        assert attn.layer_layout(layer, cut.config) == (keep.numel(), kv.numel(), hd)
        assert not torch.allclose(logits(ref, ids), logits(model, ids))  # heads mattered
        torch.testing.assert_close(logits(cut, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits(copy.deepcopy(cut), ids), logits(ref, ids),
                                   rtol=1e-5, atol=1e-5)

    def test_every_layer_cut_and_reloaded(self, family, mode, tmp_path):
        """Every layer cut and the counts committed to the config: equal to the zeroed dense
        model, and the saved folder reloads with stock AutoModelForCausalLM to the same
        logits, with the cut shapes."""
        from transformers import AutoModelForCausalLM

        model = build(family)
        ids = random_ids(2, 12, seed=4)
        attn, cut, ref, keep, kv = cut_copy(model, mode)
        hd = attn.head_layout(model.config)[2]
        assert commit_head_counts(cut, attn) == (keep.numel(), kv.numel(), hd)
        assert attn.head_layout(cut.config) == (keep.numel(), kv.numel(), hd)
        out = logits(cut, ids)
        torch.testing.assert_close(out, logits(ref, ids), rtol=1e-5, atol=1e-5)
        cut.save_pretrained(tmp_path)
        back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        assert attn.text_config(back.config).head_dim == hd  # explicit in the saved config
        assert attn.head_layout(back.config) == (keep.numel(), kv.numel(), hd)
        for a, b in zip(attn.layers(back), attn.layers(cut)):
            shapes = {n: p.shape for n, p in attn.module(a).named_parameters()}
            assert shapes == {n: p.shape for n, p in attn.module(b).named_parameters()}
        torch.testing.assert_close(logits(back, ids), out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", VARIANTS)
def test_keeping_every_head_is_bit_identical(family):
    model = build(family)
    ids = random_ids(2, 10, seed=5)
    attn = get_attention_adapter(model.config)
    n_heads, n_kv, _ = attn.head_layout(model.config)
    cut = copy.deepcopy(model)
    for layer in attn.layers(cut):
        attn.keep_heads(layer, cut.config, torch.arange(n_heads), torch.arange(n_kv))
    commit_head_counts(cut, attn)
    before, after = model.state_dict(), cut.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(cut, ids), logits(model, ids))


def test_uneven_groups_are_refused_by_the_adapter():
    model = tiny_model("llama")  # 4 heads, 2 KV groups
    attn = get_attention_adapter(model.config)
    layer = attn.layers(model)[0]
    with pytest.raises(ValueError, match="same number"):  # 2 heads in group 0, 0 in group 1
        attn.keep_heads(layer, model.config, torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same number"):  # head 2 without its group
        attn.keep_heads(layer, model.config, torch.tensor([0, 2]), torch.tensor([0]))


@pytest.mark.parametrize("family", REFUSED_FAMILIES)
def test_unsupported_families_are_refused(family):
    model = tiny_model(family)
    with pytest.raises(SpapError, match="supported: ") as e:
        get_attention_adapter(model.config)
    message = str(e.value)
    assert "\n" not in message and f"'{family}'" in message
    assert REFUSED[family] in message  # the reason, read from the modeling file


def test_a_flag_that_breaks_the_cut_is_refused():
    """Phi's q/k LayerNorms are sized hidden_size // num_attention_heads: refused when on."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("phi", **_MORE["phi"], qk_layernorm=True)
    with pytest.raises(SpapError, match="qk_layernorm=True"):
        get_attention_adapter(config)
    get_attention_adapter(AutoConfig.for_model("phi", **_MORE["phi"]))


def test_an_unknown_family_is_refused():
    from transformers import GPT2Config

    with pytest.raises(SpapError, match="'gpt2'; supported: apertus"):
        get_attention_adapter(GPT2Config())


def test_the_layer_config_view():
    """A cut Phi-3 layer reads its own counts; everything else, and writes, go to the shared
    config (so the model's config is unchanged until the counts are committed)."""
    model = tiny_model("phi3")
    attn = get_attention_adapter(model.config)
    keep, kv = choice(attn, model.config, "heads")
    layer = attn.layers(model)[0]
    attn.keep_heads(layer, model.config, keep, kv)
    view = attn.module(layer).config
    assert isinstance(view, LayerConfig)
    assert view.num_attention_heads == keep.numel() and model.config.num_attention_heads == 4
    assert view.hidden_size == model.config.hidden_size
    view._attn_implementation_internal = "eager"
    assert model.config._attn_implementation_internal == "eager"
    # cutting again narrows the same view over the same shared config
    attn.keep_heads(layer, model.config, torch.tensor([0]), torch.tensor([0]))
    assert attn.module(layer).config._base is model.config
