"""Tests of spap.eval.speed: FLOP counts against hand arithmetic, and a tiny end-to-end bench.

No wall-clock assertions: timings on a shared CPU are noise; only the shape of the result and
the arithmetic are checked.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from spap.errors import SpapError
from spap.eval.speed import bench, count_flops, format_table, weight_bytes

# hidden 64, 4 heads of 16, 2 KV heads, 2 layers, vocab 256, untied LM head
LLAMA = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    vocab_size=256,
    max_position_embeddings=128,
)
OPT = dict(
    hidden_size=32,
    num_attention_heads=4,
    ffn_dim=64,
    num_hidden_layers=2,
    vocab_size=100,
    word_embed_proj_dim=16,  # exercises project_in / project_out
    max_position_embeddings=64,
)


def _llama(width: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(intermediate_size=width, **LLAMA)).eval()


def test_count_flops_llama_by_hand():
    # Per layer per token MACs: q 64*64 = 4096, k 64*32 = 2048, v 2048, o 64*64 = 4096 -> 12288;
    # MLP 3*64*128 = 24576 (base) or 3*64*96 = 18432 (pruned). Batch 1, prompt 16, gen 4.
    base = count_flops(LlamaConfig(intermediate_size=128, **LLAMA), 1, 16, 4, dtype_bytes=4)
    pruned = count_flops(LlamaConfig(intermediate_size=96, **LLAMA), 1, 16, 4, dtype_bytes=4)
    p = base["prefill"]
    assert p["attn_linear"] == 2 * 16 * 2 * 12288  # 2 FLOPs x 16 tokens x 2 layers
    # causal: keys 1..16 sum to 136; QK^T and AV, h*e = 64, 2 layers
    assert p["attn_matmul"] == 2 * 2 * 2 * 64 * 136
    assert p["mlp"] == 2 * 16 * 2 * 24576
    assert p["lm_head"] == 2 * 1 * 64 * 256  # logits_to_keep=1: last position only
    assert p["other"] == 0
    assert p["total"] == 786432 + 69632 + 1572864 + 32768 == 2461696
    assert pruned["prefill"]["mlp"] == 2 * 16 * 2 * 18432
    assert pruned["prefill"]["total"] == 786432 + 69632 + 1179648 + 32768 == 2068480

    # Decode steps see 17, 18, 19, 20 keys: mean 18.5.
    d = base["decode_per_token"]
    assert d["attn_linear"] == 2 * 2 * 12288
    assert d["attn_matmul"] == 2 * 2 * 2 * 64 * 18.5
    assert d["mlp"] == 2 * 2 * 24576
    assert d["lm_head"] == 2 * 64 * 256
    assert d["total"] == 49152 + 9472 + 98304 + 32768

    # Weights read per step: per layer 12288 attn + 24576 MLP + 2*64 norms = 36992, two layers,
    # final norm 64, one embedding row 64, full LM head 256*64; float32.
    b = base["decode_bytes_per_token"]
    assert b["weights"] == (2 * 36992 + 64 + 64 + 256 * 64) * 4
    assert b["kv_cache"] == 2 * 2 * 32 * 18.5 * 4  # layers, K and V, kv_heads*head_dim, keys
    assert base["params"] == 2 * 36992 + 64 + 2 * 256 * 64  # untied embedding and LM head

    # All positions' logits when logits_to_keep=0.
    full = count_flops(LlamaConfig(intermediate_size=128, **LLAMA), 1, 16, 4, logits_to_keep=0)
    assert full["prefill"]["lm_head"] == 2 * 16 * 64 * 256


def test_count_flops_opt_by_hand():
    # q, k, v, o: 32*32 each -> 4096 MACs; fc1 + fc2: 2*32*64 = 4096; project_in + project_out
    # 2*16*32 = 1024 per token; LM head 16*100 = 1600 per position. Batch 2, prompt 8, gen 2.
    f = count_flops(OPTConfig(**OPT), 2, 8, 2, logits_to_keep=0, dtype_bytes=4)
    p = f["prefill"]
    assert p["attn_linear"] == 2 * 16 * 2 * 4096  # 16 tokens, 2 layers
    assert p["attn_matmul"] == 2 * 2 * 2 * 32 * 2 * 36  # keys 1..8 sum to 36, batch 2
    assert p["mlp"] == 2 * 16 * 2 * 4096
    assert p["lm_head"] == 2 * 2 * 8 * 1600  # every position
    assert p["other"] == 2 * 16 * 1024
    assert p["total"] == 262144 + 18432 + 262144 + 51200 + 32768
    d = f["decode_per_token"]  # keys 9, 10: mean 9.5
    assert (d["attn_linear"], d["attn_matmul"], d["mlp"], d["lm_head"], d["other"]) == (
        2 * 2 * 4096,
        2 * 2 * 2 * 32 * 9.5,
        2 * 2 * 4096,
        2 * 1600,
        2 * 1024,
    )
    # per layer: 4 projections 4096 + 4*32 biases, fc1/fc2 4096 + 64 + 32 biases, 2 LayerNorms
    # 2*2*32; final LayerNorm 64; projections 1024; rows: 2 token rows of 16, one position row
    # of 32; LM head 100*16. Per token = per step / batch 2.
    layer = 4096 + 128 + 4096 + 96 + 128
    assert f["decode_bytes_per_token"]["weights"] == (
        (2 * layer + 64 + 1024 + 2 * 16 + 32 + 1600) * 4 / 2
    )


@pytest.mark.parametrize(
    "model",
    [
        lambda: LlamaForCausalLM(LlamaConfig(intermediate_size=96, **LLAMA)),
        lambda: LlamaForCausalLM(
            LlamaConfig(
                intermediate_size=96,
                attention_bias=True,
                mlp_bias=True,
                tie_word_embeddings=True,
                **LLAMA,
            )
        ),
        lambda: Qwen2ForCausalLM(Qwen2Config(intermediate_size=96, **LLAMA)),
        lambda: MistralForCausalLM(MistralConfig(intermediate_size=96, head_dim=8, **LLAMA)),
        lambda: OPTForCausalLM(OPTConfig(**OPT)),
        lambda: OPTForCausalLM(
            OPTConfig(**{**OPT, "word_embed_proj_dim": 32, "do_layer_norm_before": False})
        ),
    ],
    ids=["llama", "llama-bias-tied", "qwen2", "mistral-head_dim", "opt-proj", "opt-postnorm"],
)
def test_config_reading_matches_real_parameter_count(model):
    """The config reading behind the FLOPs (widths, heads, biases, norms, tying) is right when
    the parameter count it implies equals the real model's."""
    m = model()
    assert count_flops(m.config, 1, 4, 1)["params"] == sum(p.numel() for p in m.parameters())


def test_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(SpapError, match="supported: llama, mistral, opt, qwen2"):
        count_flops(GPT2Config(), 1, 4, 1)


def test_weight_bytes():
    pruned, base = _llama(96), _llama(128)
    for m in (pruned, base):
        assert weight_bytes(m) == sum(p.numel() * p.element_size() for p in m.parameters())
    params = [sum(p.numel() for p in m.parameters()) for m in (pruned, base)]
    assert weight_bytes(pruned) / weight_bytes(base) == params[0] / params[1]
    assert weight_bytes(base.to(torch.bfloat16)) * 2 == params[1] * 4


@pytest.fixture(scope="module")
def result():
    return bench(_llama(96), _llama(128), batch_sizes=(1,), prompt_lens=(16,), gen_tokens=4, reps=2)


def test_bench_result_shape(result):
    json.dumps(result, allow_nan=False)  # JSON-serialisable, no inf/nan
    for key in ("device", "torch_version", "threads", "dtype", "params", "weight_bytes"):
        assert key in result
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    (s,) = result["settings"]
    assert (s["batch"], s["prompt_len"], s["gen_tokens"]) == (1, 16, 4)
    for key in ("speedup", "ideal_speedup", "prefill", "decode", "flops"):
        assert key in s
    for key in ("pruned_s", "base_s", "spread", "speedup", "ideal_speedup", "ratio"):
        assert key in s["prefill"] and key in s["decode"]
    assert set(s["decode"]["tokens_per_s"]) == {"pruned", "base"}
    assert "ideal_speedup_flops" in s["decode"]
    assert len(s["prefill"]["times"]["pruned"]) == 2
    assert s["prefill"]["pruned_s"] > 0 and s["prefill"]["base_s"] > 0
    assert s["speedup"] == s["prefill"]["speedup"]
    memory = result["memory"]
    for name in ("pruned", "base"):
        assert memory[name]["run_peak_rss"] > 0, memory[name]
        assert memory[name]["weight_bytes"] == result["weight_bytes"][name]


def test_bench_ideal_speedups_are_the_hand_ratios(result):
    (s,) = result["settings"]
    assert s["ideal_speedup"] == pytest.approx(2461696 / 2068480)
    assert s["prefill"]["ideal_speedup"] == s["ideal_speedup"]
    # Decode ideal from weights read per token: only the MLP shrinks, 2 layers * 3*64*32.
    base_bytes = (2 * 36992 + 64 + 64 + 256 * 64) * 4
    pruned_bytes = base_bytes - 2 * 3 * 64 * 32 * 4
    assert s["decode"]["ideal_speedup"] == pytest.approx(base_bytes / pruned_bytes)
    assert result["params"]["pruned"] / result["params"]["base"] == pytest.approx(
        result["weight_bytes"]["ratio"]
    )


def test_format_table(result):
    table = format_table(result)
    assert "prefill" in table and "decode" in table
    assert any(line.split()[:3] == ["1", "16", "4"] for line in table.splitlines())


def test_bench_rejects_different_vocabularies():
    other = LlamaForCausalLM(LlamaConfig(intermediate_size=96, **{**LLAMA, "vocab_size": 128}))
    with pytest.raises(SpapError, match="vocab"):
        bench(other, _llama(128), batch_sizes=(1,), prompt_lens=(4,), gen_tokens=1, reps=1)
