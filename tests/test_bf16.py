"""Models held in bfloat16, as most checkpoints are stored: prune (spap and a baseline), save,
reload with stock transformers, compare, on tiny models of several families on the CPU.

What must hold: the pruned model stays bfloat16 and is saved at bfloat16's size; stock
`from_pretrained` gives it back in bfloat16 with the same weights and the same logits; its
layer errors are those of the same run in float32 up to bfloat16's rounding (the statistics
and solves run in float32 or float64 whatever the model's dtype); and the low-memory path
gives the same model as the in-memory one.
"""

from __future__ import annotations

import json

import pytest
import torch

import spap
from conftest import TEXT, byte_tokenizer, random_ids, tiny_model

FAMILIES = ["llama", "qwen2", "opt", "gemma3_text"]
METHODS = ["spap", "wanda-sp"]
CALIB = dict(calib_ids=random_ids(8, 16, seed=1), device="cpu", batch_size=4)


def prune_in(dtype: torch.dtype, family: str, method: str):
    model = tiny_model(family).to(dtype)
    return spap.prune(model, sparsity=0.25, method=method, **CALIB)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_prune_save_reload_compare(family, method, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    res = prune_in(torch.bfloat16, family, method)
    model = res.model
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = random_ids(2, 16, seed=7)
    out = spap.save_pruned(model, byte_tokenizer(), tmp_path / "out", res.report,
                           check_ids=ids[:1])
    # saved at bfloat16's size: every tensor in the file is bfloat16
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}  # noqa: SIM118
    back = AutoModelForCausalLM.from_pretrained(out).eval()  # stock: the config's own dtype
    assert back.dtype == torch.bfloat16
    theirs = back.state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(theirs[name], p), name
    with torch.no_grad():
        a = model(ids, use_cache=False).logits
        b = back(ids, use_cache=False).logits
    assert torch.isfinite(a).all()
    scale = float(a.float().abs().max())
    # the same weights, the same kernels: at most a few of bfloat16's steps at the logit scale
    assert float((a.float() - b.float()).abs().max()) <= 8 * 2**-7 * scale
    rep = json.loads((out / "spap.json").read_text())
    assert rep["model"]["dtype"] == "bfloat16" and rep["reload_check"]["dtype"] == "bfloat16"
    assert rep["model"]["width_after"] < rep["model"]["width_before"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_layer_errors_match_float32(family, method):
    """The bfloat16 run does what the float32 run does: its layer errors are no more than 5%
    above float32's (bfloat16's rounding of the weights and activations is relative 2**-8 per
    element). They may be lower: recovery's held-out choice of epochs can differ by a
    rounding on a tiny random layer, and then either run may fit better."""
    f32 = prune_in(torch.float32, family, method)
    b16 = prune_in(torch.bfloat16, family, method)
    e32 = [r.rel_error for r in f32.layers]
    e16 = [r.rel_error for r in b16.layers]
    assert all(0 < e for e in e16)
    for x, y in zip(e32, e16):
        assert y <= 1.05 * x + 1e-4, (x, y)


def test_bf16_low_memory_equals_in_memory(tmp_path):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"{i}. {TEXT * 4}" for i in range(40)))
    kw = dict(method="spap", calib=str(calib), nsamples=6, seqlen=16, device="cpu")
    mem = spap.prune_to_disk(str(src), tmp_path / "mem", 0.25, **kw)  # dtype auto: bfloat16
    low = spap.prune_to_disk(str(src), tmp_path / "low", 0.25, low_memory=True, **kw)
    assert mem.report["model"]["dtype"] == low.report["model"]["dtype"] == "bfloat16"
    a = AutoModelForCausalLM.from_pretrained(mem.out).eval()
    b = AutoModelForCausalLM.from_pretrained(low.out).eval()
    assert a.dtype == b.dtype == torch.bfloat16
    ids = random_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)
    size = sum(f.stat().st_size for f in mem.out.glob("*.safetensors"))
    assert size < 2.2 * mem.report["params_after"]  # two bytes a parameter, plus headers
