"""Tests of spap.eval.speed: FlopCounterMode's counts against hand arithmetic, a bench of a tiny
random model of every supported family (MLP FLOPs and bytes against the weights themselves),
the device-sized defaults, and the refusals that must come before any timing.

No wall-clock assertions: timings on a shared CPU are noise; only the arithmetic and the
structure of the result are checked.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import statistics
from fractions import Fraction

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

import spap.eval.speed.rss as rss
import spap.eval.speed.timing as timing
from conftest import ALL_FAMILIES, tiny_model
from spap.driver.surgery import apply_decision
from spap.errors import SpapError
from spap.eval.speed import (
    CPU_GRID,
    CUDA_GRID,
    bench,
    count_flops,
    default_grid,
    format_table,
    weight_bytes,
)
from spap.models import get_adapter
from spap.solvers.base import Decision

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


def _llama(width: int, **changes) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(intermediate_size=width, **{**LLAMA, **changes})).eval()


def test_count_flops_llama_by_hand():
    # Per layer per token MACs: q 64*64 = 4096, k 64*32 = 2048, v 2048, o 64*64 = 4096 -> 12288;
    # MLP 3*64*128 = 24576 (base) or 3*64*96 = 18432 (pruned). Batch 1, prompt 16, gen 4.
    base = count_flops(_llama(128), 1, 16, 4)
    pruned = count_flops(_llama(96), 1, 16, 4)
    p = base["prefill"]
    assert p["attn_linear"] == 2 * 16 * 2 * 12288  # 2 FLOPs x 16 tokens x 2 layers
    # the full 16 x 16 rectangle of scores (as torch's SDPA formula counts), QK^T and AV,
    # h*e = 64, 2 layers
    assert p["attn_matmul"] == 2 * 2 * 2 * 64 * 16 * 16
    assert p["mlp"] == 2 * 16 * 2 * 24576
    assert p["lm_head"] == 2 * 1 * 64 * 256  # logits_to_keep=1: last position only
    assert p["other"] == 0
    assert p["total"] == 786432 + 131072 + 1572864 + 32768 == 2523136
    assert pruned["prefill"]["mlp"] == 2 * 16 * 2 * 18432
    assert pruned["prefill"]["total"] == 786432 + 131072 + 1179648 + 32768 == 2129920

    # Decode steps see 17, 18, 19, 20 keys: mean 18.5 (extrapolated from the first two steps).
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
    assert (base["mlp_width"], pruned["mlp_width"]) == (128, 96)

    # All positions' logits when logits_to_keep=0.
    full = count_flops(_llama(128), 1, 16, 4, logits_to_keep=0)
    assert full["prefill"]["lm_head"] == 2 * 16 * 64 * 256


def test_count_flops_opt_by_hand():
    # q, k, v, o: 32*32 each -> 4096 MACs; fc1 + fc2: 2*32*64 = 4096; project_in + project_out
    # 2*16*32 = 1024 per token; LM head 16*100 = 1600 per position. Batch 2, prompt 8, gen 2.
    f = count_flops(OPTForCausalLM(OPTConfig(**OPT)), 2, 8, 2, logits_to_keep=0)
    p = f["prefill"]
    assert p["attn_linear"] == 2 * 16 * 2 * 4096  # 16 tokens, 2 layers
    assert p["attn_matmul"] == 2 * 2 * 2 * 32 * 2 * 8 * 8  # 8 x 8 scores, batch 2
    assert p["mlp"] == 2 * 16 * 2 * 4096
    assert p["lm_head"] == 2 * 2 * 8 * 1600  # every position
    assert p["other"] == 2 * 16 * 1024  # project_in / project_out run outside the layers
    d = f["decode_per_token"]  # keys 9, 10: mean 9.5
    assert (d["attn_linear"], d["attn_matmul"], d["mlp"], d["lm_head"], d["other"]) == (
        2 * 2 * 4096,
        2 * 2 * 2 * 32 * 9.5,
        2 * 2 * 4096,
        2 * 1600,
        2 * 1024,
    )
    # per layer: 4 projections 4096 + 4*32 biases, fc1/fc2 4096 + 64 + 32 biases, 2 LayerNorms
    # 2*2*32; final LayerNorm 64; projections 1024; one position row of 32 per sequence; the
    # token table is the (tied) LM head, read in full once: 100*16. Per token = per step / 2.
    layer = 4096 + 128 + 4096 + 96 + 128
    assert f["decode_bytes_per_token"]["weights"] == (
        (2 * layer + 64 + 1024 + 2 * 32 + 1600) * 4 / 2
    )


@pytest.mark.parametrize(
    ("cls", "config"),
    [
        (LlamaForCausalLM, LlamaConfig(intermediate_size=96, attention_bias=True, mlp_bias=True,
                                       tie_word_embeddings=True, **LLAMA)),
        (OPTForCausalLM, OPTConfig(**{**OPT, "word_embed_proj_dim": 32,
                                      "do_layer_norm_before": False})),
    ],
    ids=["llama-bias-tied", "opt-postnorm"],
)  # fmt: skip
def test_a_config_is_counted_as_its_model(cls, config):
    """count_flops of a config builds a weightless model of it: the same counts and
    parameters as the real model."""
    model = cls(config)
    from_config, from_model = count_flops(config, 2, 6, 3), count_flops(model, 2, 6, 3)
    assert from_config["params"] == sum(p.numel() for p in model.parameters())
    for key in ("prefill", "decode_per_token", "decode_bytes_per_token"):
        assert from_config[key] == from_model[key]


def test_weight_bytes():
    pruned, base = _llama(96), _llama(128)
    for m in (pruned, base):
        assert weight_bytes(m) == sum(p.numel() * p.element_size() for p in m.parameters())
    params = [sum(p.numel() for p in m.parameters()) for m in (pruned, base)]
    assert weight_bytes(pruned) / weight_bytes(base) == params[0] / params[1]
    assert weight_bytes(base.to(torch.bfloat16)) * 2 == params[1] * 4


# ---- every family -------------------------------------------------------------------------


def _cut(model: torch.nn.Module, keep: int) -> torch.nn.Module:
    """A copy of `model` with the first `keep` channels of every MLP, through the adapter."""
    pruned = copy.deepcopy(model)
    adapter = get_adapter(pruned.config)
    idx = torch.arange(keep)
    for layer in adapter.layers(pruned):
        down = adapter.out_linear(layer)
        apply_decision(adapter, layer, Decision(idx, down.weight[:, idx].clone()))
    adapter.set_width(pruned.config, keep)
    return pruned


def _mlp_numel(model: torch.nn.Module) -> int:
    adapter = get_adapter(model.config)
    return sum(
        lin.weight.numel()
        for layer in adapter.layers(model)
        for lin in [*adapter.in_linears(layer).values(), adapter.out_linear(layer)]
    )


def _mlp_bytes(model: torch.nn.Module) -> int:
    adapter = get_adapter(model.config)
    return sum(
        p.numel() * p.element_size()
        for layer in adapter.layers(model)
        for lin in [*adapter.in_linears(layer).values(), adapter.out_linear(layer)]
        for p in lin.parameters()
    )


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_bench_every_family(family):
    """A tiny random model of every supported family benches against its pruned copy; the MLP
    FLOPs and bytes equal what the MLP weights imply, everything else is untouched, and the
    ideal speedups follow from those figures."""
    base = tiny_model(family)
    width = get_adapter(base.config).width(base.config)
    keep = width // 2
    pruned = _cut(base, keep)
    B, L, G = 2, 6, 1  # one decode step: each fake forward costs ~0.1 s even at this size
    res = bench(
        pruned, base, batch_sizes=(B,), prompt_lens=(L,), gen_tokens=G, warmup=0, reps=1,
        cpu_memory=False,
    )  # fmt: skip
    json.dumps(res, allow_nan=False)
    (s,) = res["settings"]
    assert (s["batch"], s["prompt_len"], s["gen_tokens"]) == (B, L, G)
    assert len(s["prefill"]["times"]["pruned"]) == len(s["decode"]["times"]["base"]) == 1
    fp, fb = s["flops"]["pruned"], s["flops"]["base"]
    for f, m in ((fp, pruned), (fb, base)):
        assert f["prefill"]["mlp"] == 2 * B * L * _mlp_numel(m)  # every token, every layer
        assert f["decode_per_token"]["mlp"] == 2 * _mlp_numel(m)
        head = m.get_output_embeddings().weight.numel()
        positions = 1 if f["logits_to_keep"] == 1 else L
        assert f["prefill"]["lm_head"] == 2 * B * positions * head
        assert f["params"] == res["params"]["pruned" if m is pruned else "base"]
    assert Fraction(fp["prefill"]["mlp"], fb["prefill"]["mlp"]) == Fraction(keep, width)
    assert (fp["mlp_width"], fb["mlp_width"]) == (keep, width)
    for part in ("attn_linear", "attn_matmul", "lm_head", "other"):  # pruning cuts only the MLP
        assert fp["prefill"][part] == fb["prefill"][part], part
        assert fp["decode_per_token"][part] == fb["decode_per_token"][part], part
    assert fp["decode_bytes_per_token"]["kv_cache"] == fb["decode_bytes_per_token"]["kv_cache"]
    # The bytes a decode step reads shrink by exactly the MLP bytes removed (per token: / B).
    removed = _mlp_bytes(base) - _mlp_bytes(pruned)
    assert removed == weight_bytes(base) - weight_bytes(pruned) > 0
    wb, wp = fb["decode_bytes_per_token"]["weights"], fp["decode_bytes_per_token"]["weights"]
    assert wb - wp == removed / B
    rest = fb["prefill"]["total"] - fb["prefill"]["mlp"]
    assert s["ideal_speedup"] == pytest.approx(
        (rest + 2 * B * L * _mlp_numel(base)) / (rest + 2 * B * L * _mlp_numel(pruned)), rel=1e-12
    )
    assert s["decode"]["ideal_speedup"] == pytest.approx(wb / (wb - removed / B), rel=1e-12)
    assert s["decode"]["ideal_speedup"] > 1 and s["ideal_speedup"] > 1


# ---- refusals before any timing -----------------------------------------------------------


@pytest.fixture
def timing_calls(monkeypatch):
    """Every call of the timing and running functions, recorded; none of them runs."""
    calls = []
    for name in ("_timed", "prefill", "generate", "rss_in_subprocess", "_cuda_peak"):
        monkeypatch.setattr(timing, name, lambda *a, _n=name, **k: calls.append(_n))
    return calls


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def test_unsupported_family_fails_before_timing(timing_calls):
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=64)
    with pytest.raises(SpapError, match="model_type 'gpt2' is not supported; supported:") as e:
        bench(GPT2LMHeadModel(cfg), GPT2LMHeadModel(cfg), batch_sizes=(1,), prompt_lens=(4,),
              gen_tokens=1, reps=1)  # fmt: skip
    _one_line_error(e)
    assert timing_calls == []


def test_uncountable_forward_fails_before_timing(timing_calls):
    """A family whose forward cannot run on fake tensors fails at once, naming the cause."""
    pruned = _llama(96)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this op\nsecond line")

    pruned.model.layers[1].mlp.forward = broken
    with pytest.raises(SpapError, match="cannot count the FLOPs of model_type 'llama'") as e:
        bench(pruned, _llama(128), batch_sizes=(1, 2), prompt_lens=(4,), gen_tokens=1, reps=1)
    assert _one_line_error(e).endswith("RuntimeError: no kernel for this op")
    assert timing_calls == []


def test_too_long_a_setting_fails_before_timing(timing_calls):
    with pytest.raises(SpapError, match="max_position_embeddings is 128") as e:
        bench(_llama(96), _llama(128), batch_sizes=(1,), prompt_lens=(16, 120), gen_tokens=8)
    _one_line_error(e)
    assert timing_calls == []


def test_bench_rejects_different_vocabularies(timing_calls):
    other = LlamaForCausalLM(LlamaConfig(intermediate_size=96, **{**LLAMA, "vocab_size": 128}))
    with pytest.raises(SpapError, match="vocab"):
        bench(other, _llama(128), batch_sizes=(1,), prompt_lens=(4,), gen_tokens=1, reps=1)
    assert timing_calls == []


# ---- defaults, progress, the result and its table -----------------------------------------


def test_defaults_are_sized_to_the_device(monkeypatch, capsys):
    assert default_grid("cuda:0") == CUDA_GRID and default_grid("cpu") == CPU_GRID
    assert CPU_GRID.batch_sizes == (1,) and len(CPU_GRID.prompt_lens) == 1
    ticks = itertools.count(1)
    monkeypatch.setattr(timing, "_timed", lambda fn, device: float(next(ticks)))  # no run
    longer = CPU_GRID.gen_tokens + max(CPU_GRID.prompt_lens) + 1
    pruned, base = (_llama(w, max_position_embeddings=longer) for w in (96, 128))
    res = bench(pruned, base, cpu_memory=False, progress=True)
    rows = [(s["batch"], s["prompt_len"], s["gen_tokens"]) for s in res["settings"]]
    assert rows == [(b, p, CPU_GRID.gen_tokens) for b in CPU_GRID.batch_sizes
                    for p in CPU_GRID.prompt_lens]  # fmt: skip
    assert res["protocol"]["reps"] == CPU_GRID.reps
    assert len(res["settings"][0]["prefill"]["times"]["base"]) == CPU_GRID.reps
    err = capsys.readouterr().err
    steps = len(rows) * (1 + 1 + CPU_GRID.reps)  # FLOP count, warm-up, repetitions
    assert f"{steps}/{steps}" in err and "bench" in err  # the bar ran to its end

    bench(_llama(96), _llama(128), batch_sizes=(1,), prompt_lens=(4,), gen_tokens=1, reps=1,
          cpu_memory=False)  # fmt: skip
    assert capsys.readouterr().err == ""  # quiet unless asked


def test_cli_help_states_the_defaults(capsys):
    from spap.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())

    def ints(xs) -> str:
        return ",".join(map(str, xs))

    for flag, cuda, cpu in (
        ("batch", ints(CUDA_GRID.batch_sizes), ints(CPU_GRID.batch_sizes)),
        ("prompt", ints(CUDA_GRID.prompt_lens), ints(CPU_GRID.prompt_lens)),
        ("tokens", CUDA_GRID.gen_tokens, CPU_GRID.gen_tokens),
        ("reps", CUDA_GRID.reps, CPU_GRID.reps),
    ):
        assert re.search(rf"default {cuda} on cuda, {cpu} on cpu", text), flag


@pytest.fixture(scope="module")
def result():
    # cpu_memory=False: the RSS subprocess is tested once below (each costs an interpreter
    # start and a transformers import); tests/test_cli.py runs it through bench
    return bench(
        _llama(96), _llama(128), batch_sizes=(1,), prompt_lens=(16,), gen_tokens=4, reps=2,
        cpu_memory=False,
    )  # fmt: skip


def test_bench_result_shape(result):
    json.dumps(result, allow_nan=False)  # JSON-serialisable, no inf/nan
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["threads"] == torch.get_num_threads()
    (s,) = result["settings"]
    assert (s["batch"], s["prompt_len"], s["gen_tokens"]) == (1, 16, 4)
    assert set(s["decode"]["tokens_per_s"]) == {"pruned", "base"}
    assert len(s["prefill"]["times"]["pruned"]) == len(s["decode"]["times"]["base"]) == 2
    for part in ("prefill", "decode"):
        for name in ("pruned", "base"):
            assert s[part][f"{name}_s"] == statistics.median(s[part]["times"][name])
    assert s["speedup"] == s["prefill"]["speedup"]
    memory = result["memory"]
    assert memory["method"] == "skipped (cpu_memory=False)"
    assert memory["weight_bytes"] == {k: result["weight_bytes"][k] for k in ("pruned", "base")}
    assert memory["process_peak_rss_bytes"] > 0


def test_rss_subprocess_reports_what_the_report_reads():
    model = _llama(96)
    m = rss.rss_in_subprocess(model, 1, 16, 4, True, 0)
    assert "error" not in m, m
    # the keys bench/report.py reads
    assert m["weight_bytes"] == weight_bytes(model)
    assert m["run_peak_rss"] >= m["rss_after_load"] > m["rss_after_import"] > 0, m
    assert m["run_peak_above_loaded"] is None or m["run_peak_above_loaded"] >= 0


def test_bench_ideal_speedups_are_the_hand_ratios(result):
    (s,) = result["settings"]
    assert s["ideal_speedup"] == pytest.approx(2523136 / 2129920)
    assert s["prefill"]["ideal_speedup"] == s["ideal_speedup"]
    # Decode ideal from weights read per token: only the MLP shrinks, 2 layers * 3*64*32.
    base_bytes = (2 * 36992 + 64 + 64 + 256 * 64) * 4
    pruned_bytes = base_bytes - 2 * 3 * 64 * 32 * 4
    assert s["decode"]["ideal_speedup"] == pytest.approx(base_bytes / pruned_bytes)
    kv = 2 * 2 * 32 * 18.5 * 4
    assert s["decode"]["ideal_speedup_with_kv"] == pytest.approx(
        (base_bytes + kv) / (pruned_bytes + kv)
    )
    assert result["params"]["pruned"] / result["params"]["base"] == pytest.approx(
        result["weight_bytes"]["ratio"]
    )


def test_format_table(result):
    table = format_table(result)
    (s,) = result["settings"]
    (row,) = [line for line in table.splitlines() if line.split()[:3] == ["1", "16", "4"]]
    assert f"{s['ideal_speedup']:.3f}" in row and f"{s['decode']['ideal_speedup']:.3f}" in row
    mlp_share = 100 * 2 * 16 * 2 * 24576 / 2523136  # base MLP share of the prefill FLOPs
    assert row.split()[-1] == f"{mlp_share:.1f}"
