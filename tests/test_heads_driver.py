"""The per-layer head-pruning step on tiny random models: o_proj's input statistics (fit and
held-out windows, the forward stopped at o_proj), the record's error against the attention
output measured on the same batches, keeping everything runs nothing, a whole model pruned
layer by layer reloads with stock transformers, FLAP's compensation bias is saved where the
family allows it and refused where not, and the bench's KV-cache figures."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import random_ids, tiny_model
from spap.driver.head_surgery import add_missing_attention_biases, commit_head_counts
from spap.driver.heads import collect_o_stats, prune_layer_heads
from spap.errors import SpapError
from spap.eval.speed import count_flops, kv_cache_bytes
from spap.models import get_attention_adapter
from spap.solvers.heads import HeadLayout, HeadSolver, keep_counts


def layer_inputs(model, layer, ids_batches):
    """(hidden, args, kwargs) of `layer` for every batch of ids, captured by a pre-hook."""
    seen = []

    def grab(_m, args, kwargs):
        seen.append((args[0], args[1:], kwargs))
        raise StopIteration

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in ids_batches:
            try:
                model(ids, use_cache=False)
            except StopIteration:
                pass
    finally:
        handle.remove()
    return seen


def run(layer, batches):
    with torch.no_grad():
        return [layer(h, *a, **k) for h, a, k in batches]


def o_io(attn, layer, batches):
    """o_proj's inputs and outputs over the batches, (tokens, n) and (tokens, m)."""
    xs, ys = [], []
    o = attn.o_linear(layer)
    hooks = [o.register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]))),
             o.register_forward_hook(lambda _m, _a, out: ys.append(out.reshape(-1, out.shape[-1])))]
    try:
        run(layer, batches)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(xs).double(), torch.cat(ys).double()


@pytest.fixture
def llama():
    model = tiny_model("llama")
    attn = get_attention_adapter(model.config)
    batches = layer_inputs(model, attn.layers(model)[0],
                           [random_ids(2, 12, seed=s) for s in range(3)])
    return model, attn, batches


def test_collect_o_stats(llama):
    """The Gram of o_proj's input over all batches, the last one's alone as held-out; the
    layer's forward stops at o_proj (its MLP never runs)."""
    model, attn, batches = llama
    layer = attn.layers(model)[0]
    x, _ = o_io(attn, layer, batches)
    mlp_calls = []
    hook = layer.mlp.register_forward_pre_hook(lambda *_: mlp_calls.append(1))
    try:
        stats = collect_o_stats(attn, layer, batches, heldout_batches=1)
    finally:
        hook.remove()
    assert mlp_calls == []
    # (per-batch products in float32, as StatsAccumulator makes them)
    torch.testing.assert_close(stats.gram, x.T @ x, rtol=1e-5, atol=1e-5)
    last = x[-batches[-1][0].shape[0] * batches[-1][0].shape[1]:]  # the last batch's tokens
    torch.testing.assert_close(stats.gram_heldout, last.T @ last, rtol=1e-5, atol=1e-5)
    assert stats.count == x.shape[0]


@pytest.mark.parametrize("solver,kpg,kv", [
    (HeadSolver(), 1, None), (HeadSolver(), None, 1), (HeadSolver(refit="ridge"), 1, None),
    (HeadSolver(method="wanda-sp"), 1, None), (HeadSolver(method="magnitude"), None, 1),
])
def test_the_record_is_the_measured_error(llama, solver, kpg, kv):
    """After the cut, o_proj's output on the same batches is off the dense one by exactly the
    record's relative error (heads are independent up to o_proj); the record is JSON."""
    model, attn, batches = llama
    layer = attn.layers(model)[0]
    _, y_dense = o_io(attn, layer, batches)
    rec = prune_layer_heads(attn, layer, batches, model.config, keep_per_group=kpg,
                            kv_keep=kv, solver=solver, heldout_batches=1, index=0)
    json.dumps(rec)
    _, y = o_io(attn, layer, batches)
    measured = float(((y - y_dense) ** 2).sum() / (y_dense ** 2).sum())
    # (the layer holds its new weights in float32)
    assert rec["rel_error"] == pytest.approx(measured, rel=1e-3, abs=1e-7) and measured > 0
    assert len(rec["kept_heads"]) == 2
    assert len(rec["kept_kv_heads"]) == (2 if kv is None else 1)
    assert attn.layer_layout(layer, model.config)[:2] == (len(rec["kept_heads"]),
                                                         len(rec["kept_kv_heads"]))
    assert set(rec["seconds"]) == {"collect", "solve", "cut"}


def test_keeping_every_head_runs_nothing(llama):
    model, attn, batches = llama
    layer = attn.layers(model)[0]
    before = copy.deepcopy(layer.state_dict())
    calls = []
    hook = layer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        rec = prune_layer_heads(attn, layer, batches, model.config)
    finally:
        hook.remove()
    assert calls == [] and rec["rel_error"] == 0.0 and rec["kept_heads"] == [0, 1, 2, 3]
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family,solver", [
    ("qwen2", HeadSolver()), ("phi3", HeadSolver(method="flap", bias=False)),
    ("llama", HeadSolver(method="flap")),  # its compensation bias, through attention_bias
])
def test_a_model_pruned_layer_by_layer_reloads(family, solver, tmp_path):
    """Heads of every layer pruned in turn on its own (pruned) inputs, counts committed,
    biases made saveable: the folder reloads with stock transformers to the same logits."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    attn = get_attention_adapter(model.config)
    layers = attn.layers(model)
    batches = layer_inputs(model, layers[0], [random_ids(2, 12, seed=s) for s in range(3)])
    lay = HeadLayout(*attn.head_layout(model.config))
    kpg, kvk = keep_counts(lay, heads=0.5)
    for i, layer in enumerate(layers):
        prune_layer_heads(attn, layer, batches, model.config, keep_per_group=kpg, kv_keep=kvk,
                          solver=solver, heldout_batches=1, index=i)
        outs = run(layer, batches)
        batches = [(out, a, k) for out, (_, a, k) in zip(outs, batches)]
    add_missing_attention_biases(model, attn)
    commit_head_counts(model, attn)
    ids = random_ids(2, 12, seed=9)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids, use_cache=False).logits, expected)
    assert attn.head_layout(back.config) == (lay.n_kv * kpg, lay.n_kv, lay.head_dim)
    if solver.adds_o_bias:
        assert back.config.attention_bias is True
        assert all(attn.o_linear(la).bias is not None for la in attn.layers(back))


def test_a_compensation_bias_the_family_cannot_save_is_refused():
    """Qwen2's o_proj never has a bias and no flag adds one."""
    model = tiny_model("qwen2")
    attn = get_attention_adapter(model.config)
    layer = attn.layers(model)[0]
    batches = layer_inputs(model, layer, [random_ids(1, 8)])
    with pytest.raises(SpapError, match="bias=False"):
        prune_layer_heads(attn, layer, batches, model.config, keep_per_group=1,
                          solver=HeadSolver(method="flap"))


def test_kv_cache_bytes_from_the_config_and_the_cache():
    """layers x 2 x KV heads x head_dim x bytes x tokens x batch, equal to the cache object
    after the prefill; pruning KV groups shrinks both by the kept share."""
    base = tiny_model("llama")  # 2 layers, 2 KV heads of 16
    attn = get_attention_adapter(base.config)
    assert kv_cache_bytes(base.config, 3, 10, 4) == 2 * 2 * 2 * 16 * 4 * 10 * 3
    pruned = copy.deepcopy(base)
    for layer in attn.layers(pruned):
        attn.keep_heads(layer, pruned.config, torch.tensor([2, 3]), torch.tensor([1]))
    commit_head_counts(pruned, attn)
    fb, fp = count_flops(base, 3, 10, 2), count_flops(pruned, 3, 10, 2)
    for f, m in ((fb, base), (fp, pruned)):
        kv = f["kv_cache_prefill"]
        assert kv["measured"] == kv["config"] == kv_cache_bytes(m.config, 3, 10, 4)
    assert fp["kv_cache_prefill"]["measured"] * 2 == fb["kv_cache_prefill"]["measured"]
    assert kv_cache_bytes(tiny_model("opt").config, 1, 4, 4) is None  # layout not known


def test_bench_reports_the_kv_cache():
    from spap.eval.speed import bench, format_table

    base = tiny_model("llama")
    attn = get_attention_adapter(base.config)
    pruned = copy.deepcopy(base)
    for layer in attn.layers(pruned):
        attn.keep_heads(layer, pruned.config, torch.tensor([2, 3]), torch.tensor([1]))
    commit_head_counts(pruned, attn)
    res = bench(pruned, base, batch_sizes=(1,), prompt_lens=(6,), gen_tokens=1, warmup=0,
                reps=1, cpu_memory=False)
    (s,) = res["settings"]
    kv = s["kv_cache"]
    assert kv["tokens"] == 6 and kv["ratio"] == kv["ideal_ratio"] == 0.5
    assert kv["base_bytes"] == kv["config_base_bytes"] == 2 * 2 * 2 * 16 * 4 * 6
    assert "kv cache after prefill (batch 1, 6 tokens)" in format_table(res)
    assert "ratio 0.500, ideal 0.500" in format_table(res)
