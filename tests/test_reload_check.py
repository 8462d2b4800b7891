"""The reload check of a saved model (modelio.export) and the dtype a model loads in
(modelio.loading): a planted defect in the saved folder is caught in float32 and in bfloat16,
an honest save is not, and `load_model` keeps the checkpoint's own dtype."""

from __future__ import annotations

import json

import pytest
import torch

import spap
from conftest import byte_tokenizer, random_ids, tiny_model
from spap.modelio import export
from spap.modelio.loading import load_model, resolve_dtype

DTYPES = [torch.float32, torch.bfloat16]


def pruned(family: str, dtype: torch.dtype):
    """A tiny model of `family` in `dtype`, pruned by wanda-sp (fast, no recovery)."""
    model = tiny_model(family).to(dtype)
    res = spap.prune(model, sparsity=0.25, method="wanda-sp", calib_ids=random_ids(4, 16),
                     device="cpu", batch_size=2)
    return res.model, res.report


def plant(monkeypatch, defect):
    """Make `save_pretrained` write the folder and then let `defect(folder)` alter it, as a
    faulty writer would, before the reload check reads it."""
    from transformers import PreTrainedModel

    honest = PreTrainedModel.save_pretrained

    def faulty(self, folder, *a, **kw):
        honest(self, folder, *a, **kw)
        defect(folder)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", faulty)


def nudge_one_weight(folder, ulps: int = 1) -> str:
    """Move one element of the first layer's down projection by `ulps` units in its last
    place: the smallest change a weight can have."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    sd = load_file(str(path))
    name = next(n for n in sorted(sd) if "layers.0." in n and "down_proj.weight" in n)
    w = sd[name].clone()
    x = w[0, 0].float()
    for _ in range(ulps):
        x = torch.nextafter(x.to(w.dtype), torch.tensor(float("inf"), dtype=w.dtype)).float()
    w[0, 0] = x.to(w.dtype)
    sd[name] = w
    save_file(sd, str(path), metadata={"format": "pt"})
    return name


def break_config(folder) -> None:
    """A config the model's code reads differently from the pruned model: a final-norm epsilon
    far above the hidden states' scale (the weights stay the same)."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rms_norm_eps"] = 1.0
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_weight_changed_after_save_is_caught(dtype, tmp_path, monkeypatch):
    model, report = pruned("llama", dtype)
    plant(monkeypatch, nudge_one_weight)
    with pytest.raises(RuntimeError, match=r"saved tensor .*down_proj.weight differs"):
        spap.save_pruned(model, byte_tokenizer(), tmp_path / "out", report,
                         check_ids=random_ids(1, 16, seed=5))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*spap-tmp*"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_config_that_changes_the_logits_is_caught(dtype, tmp_path, monkeypatch):
    model, report = pruned("llama", dtype)
    plant(monkeypatch, break_config)
    with pytest.raises(RuntimeError, match="logits differ .* saved config does not describe"):
        spap.save_pruned(model, byte_tokenizer(), tmp_path / "out", report,
                         check_ids=random_ids(1, 16, seed=5))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", ["llama", "opt", "qwen2", "gemma3_text"])
def test_an_honest_save_passes_in_its_own_dtype(family, dtype, tmp_path):
    model, report = pruned(family, dtype)
    out = spap.save_pruned(model, byte_tokenizer(), tmp_path / "out", report,
                           check_ids=random_ids(1, 16, seed=5))
    check = json.loads((out / "spap.json").read_text())["reload_check"]
    assert check["dtype"] == str(dtype).replace("torch.", "") and check["device"] == "cpu"
    assert check["max_abs_logit_diff"] <= check["tolerance"]
    assert check["tolerance"] == export.logit_tolerance(dtype, check["logit_scale"])
    assert json.loads((out / "config.json").read_text())["dtype"] == check["dtype"]


def test_tolerance_follows_the_dtype():
    # a bfloat16 comparison allows 2**16 times float32's difference at the same scale
    assert export.logit_tolerance(torch.bfloat16, 10.0) == pytest.approx(
        2**16 * export.logit_tolerance(torch.float32, 10.0))
    assert export.logit_tolerance(torch.float32, 10.0) == pytest.approx(
        10 * export.logit_tolerance(torch.float32, 0.5))


# ---- the dtype a model loads in --------------------------------------------------------------
@pytest.mark.parametrize("saved_as", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_load_model_keeps_the_checkpoints_dtype(saved_as, tmp_path):
    d = tmp_path / "m"
    tiny_model("llama").to(saved_as).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    model, _, _ = load_model(str(d))  # the default: the checkpoint's own dtype
    assert model.dtype == saved_as
    assert load_model(str(d), "auto", "cuda")[0].dtype == saved_as  # on any device
    assert load_model(str(d), "float32")[0].dtype == torch.float32  # forced
    assert load_model(str(d), "bfloat16")[0].dtype == torch.bfloat16


def test_auto_without_a_recorded_dtype_is_float32():
    from transformers import LlamaConfig

    assert LlamaConfig().dtype is None  # as a GGUF file's config comes
    assert resolve_dtype("auto", config=LlamaConfig()) == torch.float32
    assert resolve_dtype("auto", config=LlamaConfig(dtype="bfloat16")) == torch.bfloat16
    with pytest.raises(spap.SpapError, match="unknown dtype 'int8'; use auto"):
        resolve_dtype("int8", config=LlamaConfig())


# ---- the structural check of a low-memory output ---------------------------------------------
@pytest.fixture(scope="module")
def low_memory_out(tmp_path_factory):
    """A finished low-memory output of a tiny LLaMA (tied head) in bfloat16."""
    from conftest import TEXT

    tmp = tmp_path_factory.mktemp("low")
    src = tmp / "src"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    calib = tmp / "calib.txt"
    calib.write_text("\n\n".join(f"{i}. {TEXT * 4}" for i in range(40)))
    job = spap.prune_to_disk(str(src), tmp / "out", 0.25, method="wanda-sp", calib=str(calib),
                             nsamples=4, seqlen=16, device="cpu", low_memory=True)
    assert job.report["reload_check"]["dtype"] == "bfloat16"
    return job.out


def _alter_shard(folder, change) -> None:
    """Apply `change(tensors) -> tensors` to the shard holding layer 0, and re-index."""
    from safetensors.torch import load_file, save_file

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["model.layers.0.mlp.down_proj.weight"]
    tensors = change(load_file(str(folder / shard)))
    save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != shard}
    index["weight_map"].update(dict.fromkeys(tensors, shard))
    index_path.write_text(json.dumps(index))


DOWN = "model.layers.0.mlp.down_proj.weight"


def _renamed(t):
    t["model.layers.0.mlp.down_projection.weight"] = t.pop(DOWN)
    return t


def _reshaped(t):
    t[DOWN] = t[DOWN][:, :-1].contiguous()
    return t


def _recast(t):
    t[DOWN] = t[DOWN].to(torch.float16)
    return t


@pytest.mark.parametrize("change,needle", [
    (_renamed, "down_proj.weight missing; model.layers.0.mlp.down_projection.weight not in"),
    (_reshaped, "down_proj.weight shape"),
    (_recast, "down_proj.weight dtype F16, config BF16"),
], ids=["name", "shape", "dtype"])
def test_structure_check_catches_each_mismatch(low_memory_out, change, needle, tmp_path):
    import shutil

    from spap.modelio.shards import check_structure

    folder = tmp_path / "copy"
    shutil.copytree(low_memory_out, folder)
    assert check_structure(folder, torch.bfloat16)["tensors"] > 0  # as written: no mismatch
    _alter_shard(folder, change)
    with pytest.raises(RuntimeError, match=needle.replace("[", r"\[")):
        check_structure(folder, torch.bfloat16)


@pytest.mark.real
def test_an_offline_alias_from_gguf_loads_in_float32():
    try:
        model, _, src = load_model("smollm2-135m")  # a Q4_1 GGUF, dequantized once
    except spap.SpapError as e:
        pytest.skip(str(e))
    assert src.kind == "alias" and model.dtype == torch.float32
