"""Large-model paths on tiny models: streamed activations, lazy layers with a sharded output,
resume after a kill, and the memory the report accounts for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import spap
from conftest import (
    ALL_FAMILIES,
    TEXT,
    byte_tokenizer,
    gemma3_multimodal_config,
    random_ids,
    run_cli,
    tiny_config,
    tiny_model,
)
from spap.api import prune_to_disk
from spap.driver import pipeline
from spap.driver.activations import ActivationStore, choose_offload
from spap.errors import SpapError
from spap.modelio.runfolder import partial_dir

SETTINGS = dict(nsamples=6, seqlen=32, device="cpu", round_to=8, batch_size=2)


def deep_model(family: str, layers: int = 4, seed: int = 0):
    """tiny_model with more layers, so a run can stop in the middle."""
    from transformers import AutoModelForCausalLM

    if family == "gemma3":  # (image-text: the depth is its text model's)
        full = gemma3_multimodal_config()
        text = full.text_config.to_dict()
        text.pop("layer_types", None)
        cfg = type(full).from_dict({**full.to_dict(),
                                    "text_config": {**text, "num_hidden_layers": layers}})
    else:
        base = tiny_config(family).to_dict()
        base.pop("layer_types", None)  # per-layer lists (Qwen2) are rebuilt for the new depth
        cfg = type(tiny_config(family)).from_dict({**base, "num_hidden_layers": layers})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model.eval()


@pytest.fixture
def calib_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("\n\n".join(f"{i}. {TEXT * 4}" for i in range(40)))  # splits 36 / 4
    return p


def saved(tmp_path: Path, family: str, layers: int = 4, **save_kw) -> Path:
    d = tmp_path / f"{family}-{layers}"
    deep_model(family, layers).save_pretrained(d, **save_kw)
    byte_tokenizer().save_pretrained(d)
    return d


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- streamed activations -------------------------------------------------------------------
@pytest.mark.parametrize("family,method,effort", [
    ("llama", "spap", None), ("opt", "obs", None), ("qwen2", "fasp", None),
    # recovery with the drift target: its rows live in host memory beside the activations
    ("llama", "spap", "fast")])
def test_streamed_equals_in_memory(family, method, effort):
    calib = random_ids(8, 32, seed=1)
    probe = random_ids(3, 24, seed=7)
    runs = {}
    for offload in ("device", "cpu"):
        model = tiny_model(family)
        res = spap.prune(model, calib_ids=calib, sparsity=0.4, method=method, batch_size=3,
                         probe_ids=probe, offload=offload, effort=effort)
        runs[offload] = (model, res)
    if effort is not None:
        assert all(r.info.get("recovery_epochs") is not None for r in runs["cpu"][1].layers)
    (dm, dr), (cm, cr) = runs["device"], runs["cpu"]
    assert [r.keep for r in dr.layers] == [r.keep for r in cr.layers]
    assert [r.rel_error_heldout for r in dr.layers] == [r.rel_error_heldout for r in cr.layers]
    assert same_state(dm, cm)  # float32 on the CPU: bit for bit
    assert dr.report["memory"]["activations"]["where"] == "cpu"
    assert cr.report["memory"]["activations"]["where"] == "host"
    assert cr.report["memory"]["activations"]["calibration_bytes"] >= 8 * 32 * 64 * 4


def test_store_writes_in_place_and_streams_copies():
    store = ActivationStore("cpu", offload=True)
    h = torch.randn(2, 5, 4)
    store.append(h, (), {"pos": (torch.ones(3), torch.zeros(3)), "mask": None})
    got, args, kwargs = store[0]
    assert torch.equal(got, h) and got.data_ptr() != store._batches[0][0].data_ptr()
    assert kwargs["mask"] is None and torch.equal(kwargs["pos"][0], torch.ones(3))
    buf = store._batches[0][0]
    store.put(0, h + 1)
    assert store._batches[0][0] is buf and torch.equal(buf, h + 1)  # same buffer, new values
    assert store.nbytes == h.numel() * 4 + 6 * 4
    twin = store.clone()  # a second stream (e.g. dense) must not share the written buffers
    twin.put(0, h)
    assert torch.equal(store[0][0], h + 1) and torch.equal(twin[0][0], h)


def test_offload_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_offload("cpu", cpu, 1) and not choose_offload("device", cuda, 10**15)
    assert not choose_offload("auto", cpu, 10**15)  # host memory is the CPU's memory
    assert not choose_offload("auto", cuda, 40, free_bytes=100)
    assert choose_offload("auto", cuda, 60, free_bytes=100)
    with pytest.raises(SpapError, match="offload must be one of"):
        choose_offload("disk", cpu, 1)


# ---- lazy layers, sharded output ------------------------------------------------------------
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_low_memory_reads_and_writes_every_family(family, tmp_path, calib_file):
    """Every supported family: the low-memory output is the in-memory output, name for name
    and bit for bit, and stock loading gives the same logits (transformers renames some
    families' checkpoint names on loading and back on saving: GPT-NeoX, Gemma 3)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    src = tmp_path / family
    tiny_model(family).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    kw = dict(SETTINGS, calib=str(calib_file), method="wanda-sp")
    mem = prune_to_disk(str(src), tmp_path / "mem", 0.5, **kw)
    low = prune_to_disk(str(src), tmp_path / "low", 0.5, low_memory=True, **kw)
    index = json.loads((low.out / "model.safetensors.index.json").read_text())
    with safe_open(mem.out / "model.safetensors", "pt") as f:
        assert set(index["weight_map"]) == set(f.keys())
    a = AutoModelForCausalLM.from_pretrained(mem.out).eval()
    b = AutoModelForCausalLM.from_pretrained(low.out).eval()
    ids = random_ids(1, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


# (gpt_neox and gemma3: transformers renames some of their checkpoint names on loading)
@pytest.mark.parametrize("family", ["llama", "opt", "qwen2", "gpt_neox", "gemma3"])
def test_low_memory_equals_in_memory_and_reloads(family, tmp_path, calib_file):
    from transformers import AutoModelForCausalLM

    src = saved(tmp_path, family)
    kw = dict(SETTINGS, calib=str(calib_file), method="spap")
    mem = prune_to_disk(str(src), tmp_path / "mem", 0.3, **kw)
    low = prune_to_disk(str(src), tmp_path / "low", 0.3, low_memory=True, **kw)
    files = sorted(p.name for p in low.out.iterdir())
    assert "model.safetensors.index.json" in files
    assert [f for f in files if f.endswith(".safetensors")] == [
        f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)]
    a = AutoModelForCausalLM.from_pretrained(mem.out).eval()
    b = AutoModelForCausalLM.from_pretrained(low.out).eval()  # stock loading, no warnings
    assert same_state(a, b)
    assert [r["keep"] for r in mem.report["layers"]] == [r["keep"] for r in low.report["layers"]]
    ids = random_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)
    # the same names save_pretrained writes (a tied head left out), the same config
    index = json.loads((low.out / "model.safetensors.index.json").read_text())
    from safetensors import safe_open

    with safe_open(mem.out / "model.safetensors", "pt") as f:
        assert set(index["weight_map"]) == set(f.keys())
    assert (json.loads((mem.out / "config.json").read_text())
            == json.loads((low.out / "config.json").read_text()))
    assert low.report["low_memory"]
    assert not list(tmp_path.glob(".*spap*"))
    # spap.json's timings include the save itself, on both paths
    for job in (mem, low):
        t = json.loads((job.out / "spap.json").read_text())["timings"]
        assert 0 < t["save_s"] < t["total_s"]
        assert t["total_s"] >= t["load_s"] + t["save_s"]


def test_the_low_memory_output_check_refuses_a_shard_its_config_does_not_describe(
        tmp_path, calib_file, monkeypatch):
    """A planted defect: layer 1's down projection is written one column short. The output
    check (the low-memory stand-in for the reload check) must refuse it, name the tensor, and
    leave no output folder behind."""
    import safetensors.torch

    src = saved(tmp_path, "llama")
    bad = "model.layers.1.mlp.down_proj.weight"
    real = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if bad in tensors:
            tensors = {**tensors, bad: tensors[bad][:, :-1].contiguous()}
        return real(tensors, filename, *args, **kwargs)

    kw = dict(SETTINGS, calib=str(calib_file), method="obs", low_memory=True)
    ok = prune_to_disk(str(src), tmp_path / "ok", 0.3, **kw)  # the same run, not planted
    assert ok.out.exists()
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises((RuntimeError, SpapError), match=bad.replace(".", r"\.")):
        prune_to_disk(str(src), tmp_path / "o", 0.3, **kw)
    assert not (tmp_path / "o").exists()


def test_low_memory_reads_a_sharded_checkpoint(tmp_path, calib_file):
    single = saved(tmp_path, "llama")
    sharded = tmp_path / "sharded"
    deep_model("llama").save_pretrained(sharded, max_shard_size="40KB")
    byte_tokenizer().save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").exists()
    kw = dict(SETTINGS, calib=str(calib_file), method="obs", low_memory=True)
    a = prune_to_disk(str(single), tmp_path / "a", 0.5, **kw)
    b = prune_to_disk(str(sharded), tmp_path / "b", 0.5, **kw)
    for f in sorted(a.out.glob("model-*.safetensors")):
        assert f.read_bytes() == (b.out / f.name).read_bytes()


def test_low_memory_refuses_eval_and_non_safetensors(tmp_path, calib_file):
    src = saved(tmp_path, "llama")
    with pytest.raises(SpapError, match="--eval needs the whole model"):
        prune_to_disk(str(src), tmp_path / "o", 0.3, low_memory=True, evaluate=True)
    for f in src.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(SpapError, match="neither model.safetensors"):
        prune_to_disk(str(src), tmp_path / "o", 0.3, low_memory=True,
                      **dict(SETTINGS, calib=str(calib_file)))


# ---- resume ---------------------------------------------------------------------------------
def interrupt_at(monkeypatch, layer: int, exc: type[BaseException] = KeyboardInterrupt):
    """Make the run die when it starts pruning `layer` (layers before it are finished)."""
    real = pipeline._prune_one

    def dying(adapter, lay, index, *args, **kwargs):
        if index == layer:
            raise exc("injected fault")
        return real(adapter, lay, index, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_prune_one", dying)


def interrupted_then_resumed(monkeypatch, src: Path, out: Path, layer: int, **kw):
    """prune_to_disk of `src` to `out` killed (Ctrl-C) as it starts `layer`: the output
    is not there, only its resume folder; then run again with the same settings."""
    with monkeypatch.context() as m:
        interrupt_at(m, layer)
        with pytest.raises(KeyboardInterrupt):
            prune_to_disk(str(src), out, 0.3, **kw)
    assert partial_dir(out).exists() and not out.exists()
    return prune_to_disk(str(src), out, 0.3, **kw)


def outputs_equal(a: Path, b: Path) -> None:
    """Every file byte for byte; spap.json equal but for what a resumed run cannot share."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        if n != "spap.json":
            assert (a / n).read_bytes() == (b / n).read_bytes(), n
    ra, rb = (json.loads((d / "spap.json").read_text()) for d in (a, b))
    for r in (ra, rb):
        for key in ("timings", "memory", "resumed_from_layer"):
            r.pop(key)
        for layer in r["layers"]:
            layer.pop("seconds")
            if layer.get("heads"):
                layer["heads"].pop("seconds")
    assert ra == rb


@pytest.mark.parametrize("low_memory,options", [
    (False, {}), (True, {}),
    # targets from the dense model's own hidden states: the resumed layers must carry that
    # stream too (the dense layer runs on it before the pruned one is restored)
    (False, {"refit": "ridge", "refit_target": "drift"}),
    (True, {"refit": "ridge", "refit_target": "drift"}),
    (False, {"recovery_target": "model"}),
], ids=["memory", "low-memory", "drift", "drift-low-memory", "model-target"])
def test_resume_is_bit_identical(low_memory, options, tmp_path, calib_file, monkeypatch):
    src = saved(tmp_path, "llama")
    kw = dict(SETTINGS, calib=str(calib_file), method="spap", low_memory=low_memory,
              method_options=options)
    whole = prune_to_disk(str(src), tmp_path / "whole", 0.3, **kw)
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            prune_to_disk(str(src), out, 0.3, **kw)
    run = partial_dir(out)
    state = json.loads((run / "state.json").read_text())
    assert [r["index"] for r in state["layers"]] == [0, 1] and not out.exists()
    again = prune_to_disk(str(src), out, 0.3, resume=True, **kw)
    assert again.report["resumed_from_layer"] == 2
    assert whole.report["resumed_from_layer"] == 0
    outputs_equal(whole.out, again.out)
    assert not run.exists()


def test_an_error_of_the_settings_keeps_the_layers_an_earlier_call_finished(
        tmp_path, calib_file, monkeypatch):
    """A SpapError keeps a run folder that held an earlier call's layers (and what the failing
    call added to it); a fresh call's folder is removed."""
    from spap.errors import SpapError

    src = saved(tmp_path, "llama")
    kw = dict(SETTINGS, calib=str(calib_file), method="obs")
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            prune_to_disk(str(src), out, 0.3, **kw)
    with monkeypatch.context() as m:
        interrupt_at(m, 3, SpapError)
        with pytest.raises(SpapError):
            prune_to_disk(str(src), out, 0.3, **kw)
    state = json.loads((partial_dir(out) / "state.json").read_text())
    assert [r["index"] for r in state["layers"]] == [0, 1, 2]
    # a fresh call that fails leaves nothing behind
    fresh = tmp_path / "f"
    with monkeypatch.context() as m:
        interrupt_at(m, 1, SpapError)
        with pytest.raises(SpapError):
            prune_to_disk(str(src), fresh, 0.3, **kw)
    assert not partial_dir(fresh).exists() and not fresh.exists()


def test_resume_is_automatic_and_survives_a_crash(tmp_path, calib_file, monkeypatch):
    src = saved(tmp_path, "opt")
    kw = dict(SETTINGS, calib=str(calib_file), method="obs")
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        interrupt_at(m, 1, RuntimeError)  # a crash, not a user error: the folder stays
        with pytest.raises(RuntimeError):
            prune_to_disk(str(src), out, 0.5, **kw)
    res = prune_to_disk(str(src), out, 0.5, **kw)  # no resume flag: continued anyway
    assert res.report["resumed_from_layer"] == 1
    whole = prune_to_disk(str(src), tmp_path / "w", 0.5, **kw)
    outputs_equal(whole.out, res.out)


def test_resume_with_other_settings_is_refused(tmp_path, calib_file, monkeypatch, capsys):
    src = saved(tmp_path, "llama")
    out = tmp_path / "o"
    base = ["prune", src, "--out", out, "--calib", calib_file, "--nsamples", "6",
            "--seqlen", "32", "--device", "cpu", "--batch-size", "2"]
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        code, _, err = run_cli([*base, "--sparsity", "0.3"], capsys)
    assert code == 130 and partial_dir(out).exists()
    for extra in (["--sparsity", "0.4"], ["--sparsity", "0.3", "--method", "obs"],
                  ["--sparsity", "0.3", "--round-to", "8"]):
        code, _, err = run_cli([*base, *extra, "--resume"], capsys)
        errors = [line for line in err.splitlines() if line.startswith("spap: error:")]
        assert code == 2 and len(errors) == 1, err
        assert "other settings" in err and "--restart" in err
        assert partial_dir(out).exists() and not out.exists()  # the run is kept
    # the same settings resume; --restart discards
    code, out_text, err = run_cli([*base, "--sparsity", "0.3", "--resume"], capsys)
    assert code == 0, err
    assert "resumed an interrupted run: layers 0-1" in out_text
    code, _, err = run_cli([*base, "--sparsity", "0.3", "--resume", "--overwrite"], capsys)
    assert code == 2 and "nothing to resume" in err


def test_restart_discards_the_unfinished_run(tmp_path, calib_file, monkeypatch):
    src = saved(tmp_path, "llama")
    out = tmp_path / "o"
    kw = dict(SETTINGS, calib=str(calib_file), method="wanda-sp")
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            prune_to_disk(str(src), out, 0.3, **kw)
    with pytest.raises(SpapError, match="other settings"):
        prune_to_disk(str(src), out, 0.5, **kw)
    res = prune_to_disk(str(src), out, 0.5, resume=False, **kw)
    assert res.report["resumed_from_layer"] == 0 and res.report["sparsity_requested"] == 0.5


# ---- memory accounting ----------------------------------------------------------------------
MIB = 2**20


def test_reported_peak_covers_the_live_tensors(monkeypatch):
    """The host peak covers the weights and activations held, and sees a planted allocation
    of known size made during the run (held to its end, so the closing sample sees it)."""
    from spap.solvers.wanda_sp import WandaSpSolver

    def run():
        model = deep_model("llama", layers=2)
        calib = random_ids(32, 128, seed=1)  # 32 x 128 x 64 float32 hidden states: 1 MiB
        res = spap.prune(model, calib_ids=calib, sparsity=0.3, method="wanda-sp",
                         batch_size=8)
        return model, res.report["memory"]

    run()  # warm-up: what the first run allocates once stays out of the figures below
    model, mem = run()
    hidden = 32 * 128 * model.config.hidden_size * 4
    acts = mem["activations"]["calibration_bytes"]
    assert acts >= hidden
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert mem["host_rss_peak_bytes"] >= weights + acts
    plain = mem["host_rss_peak_bytes"] - mem["host_rss_start_bytes"]

    held, real = [], WandaSpSolver.solve

    def solve_and_allocate(self, problem, k):
        if not held:
            held.append(torch.ones(64 * MIB // 4))  # float32: 64 MiB of touched pages
        return real(self, problem, k)

    monkeypatch.setattr(WandaSpSolver, "solve", solve_and_allocate)
    _, grown = run()
    held.clear()
    grown = grown["host_rss_peak_bytes"] - grown["host_rss_start_bytes"]
    assert 0 <= plain < 16 * MIB
    assert 64 * MIB <= grown < 64 * MIB + 16 * MIB, (plain / MIB, grown / MIB)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streaming_bounds_device_memory():
    """Streamed activations keep the device's peak under a budget of the weights plus a
    quarter of the activations (a few batches in flight fit it many times over), which the
    unstreamed run, holding every activation on the device, exceeds."""
    n, seqlen, batch = 512, 128, 4
    calib = random_ids(n, seqlen, seed=1)  # 512 x 128 x 64 float32 hidden states: 16 MiB
    peaks = {}
    for offload in ("device", "cpu"):
        model = deep_model("llama", layers=2)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        res = spap.prune(model, calib_ids=calib, sparsity=0.3, method="wanda-sp",
                         batch_size=batch, device="cuda", offload=offload)
        peaks[offload] = res.report["memory"]
    acts = peaks["device"]["activations"]["calibration_bytes"]
    assert acts >= n * seqlen * model.config.hidden_size * 4
    budget = weights + acts // 4
    assert peaks["cpu"]["device_peak_bytes"] < budget < peaks["device"]["device_peak_bytes"]
    assert peaks["cpu"]["activations"]["where"] == "host (pinned)"


def test_low_memory_adds_zero_biases_as_save_pretrained_would(tmp_path, calib_file):
    """flap gives the down projection a bias; LLaMA then needs mlp_bias and zero gate/up
    biases, which the sharded writer adds to the layer shards."""
    from transformers import AutoModelForCausalLM

    src = saved(tmp_path, "llama", layers=2)
    kw = dict(SETTINGS, calib=str(calib_file), method="flap")
    mem = prune_to_disk(str(src), tmp_path / "mem", 0.5, **kw)
    low = prune_to_disk(str(src), tmp_path / "low", 0.5, low_memory=True, **kw)
    a = AutoModelForCausalLM.from_pretrained(mem.out)
    b = AutoModelForCausalLM.from_pretrained(low.out)
    assert b.config.mlp_bias and same_state(a, b)


def test_compare_reload_equals_copy(tiny_dir, text_file, tmp_path, capsys):
    got = {}
    for mode in ("copy", "reload"):
        js = tmp_path / f"{mode}.json"
        code, _, err = run_cli(["compare", tiny_dir, "--methods", "obs,wanda-sp",
                                "--sparsities", "0.25", "--calib", text_file, "--nsamples", "4",
                                "--seqlen", "32", "--eval-data", text_file, "--eval-seqlen",
                                "32", "--eval-windows", "2", "--device", "cpu", "--json", js,
                                "--dense-copy", mode], capsys)
        assert code == 0, err
        got[mode] = json.loads(js.read_text())
    assert "reloaded" in got["reload"]["protocol"]["copy"]
    for a, b in zip(got["copy"]["records"], got["reload"]["records"], strict=True):
        assert (a["ppl"], a["layer_errors"]) == (b["ppl"], b["layer_errors"])


def test_dense_copy_choice():
    from spap.compare import choose_dense_copy

    assert choose_dense_copy("auto", 100, True, available=120) == "reload"
    assert choose_dense_copy("auto", 100, True, available=1000) == "copy"
    assert choose_dense_copy("auto", 100, False, available=1) == "copy"
    assert choose_dense_copy("copy", 100, True, available=1) == "copy"
    with pytest.raises(SpapError, match="--dense-copy must be one of"):
        choose_dense_copy("disk", 1, True)


def test_api_resume_with_probes(tmp_path, monkeypatch):
    """spap.prune(checkpoint_dir=...) resumes in memory: probes and records as uninterrupted."""
    calib, probe = random_ids(6, 32, seed=1), random_ids(3, 24, seed=7)
    kw = dict(calib_ids=calib, sparsity=0.4, method="obs", batch_size=2, probe_ids=probe)
    whole = deep_model("qwen2")
    ref = spap.prune(whole, **kw)
    model = deep_model("qwen2")
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        with pytest.raises(KeyboardInterrupt):
            spap.prune(model, checkpoint_dir=tmp_path / "run", **kw)
    model = deep_model("qwen2")  # a fresh process would load the dense model again
    res = spap.prune(model, checkpoint_dir=tmp_path / "run", resume=True, **kw)
    assert res.report["resumed_from_layer"] == 3
    for a, b in zip(ref.layers, res.layers, strict=True):
        assert (a.keep, a.rel_error, a.rel_error_heldout) == (b.keep, b.rel_error,
                                                               b.rel_error_heldout)
    assert same_state(whole, model)
