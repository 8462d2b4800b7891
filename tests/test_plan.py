"""spap plan: a run's memory, disk, FLOPs and time from the model's config alone (spap/plan.py),
and its memory model held against a measured run (bench/plan_check.py's small case)."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from transformers import AutoConfig

from conftest import bench_script, tiny_config, tiny_model
from spap.config import PruneConfig
from spap.plan import HARDWARE, fixes, plan, shapes_of

# the published configs' shapes and dtypes (no weights)
REAL = {
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         dtype="bfloat16"),
    "llama-3.1-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672,
                          num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                          head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                          dtype="bfloat16"),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         vocab_size=151936, tie_word_embeddings=True, dtype="bfloat16"),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, tie_word_embeddings=False, dtype="bfloat16"),
    "opt-125m": dict(model_type="opt", hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                     num_attention_heads=12, vocab_size=50272, word_embed_proj_dim=768,
                     dtype="float16"),
}
#: the recipe with the drift target and recovery's Adam steps (its dense stream, drift rows
#: and cross terms are in the plan only with it)
DRIFT = {"refit_target": "drift", "recovery_steps": 64, "recovery_epochs": 16}


def real(name: str):
    spec = dict(REAL[name])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


@pytest.fixture(scope="module")
def shapes():
    out = {name: shapes_of(real(name)) for name in REAL}
    out.update({f"tiny-{f}": shapes_of(tiny_config(f)) for f in ("llama", "qwen2", "opt")})
    return out


def test_shapes_of_published_configs(shapes):
    s = shapes["llama-3.1-8b"]
    assert 8.0e9 < s.params < 8.1e9 and (s.hidden, s.width, s.out, s.in_roles) == (
        4096, 14336, 4096, 2)
    assert 70.0e9 < shapes["llama-3.1-70b"].params < 71.0e9
    assert 0.49e9 < shapes["qwen2.5-0.5b"].params < 0.50e9  # embeddings tied: counted once
    opt = shapes["opt-125m"]
    assert opt.in_roles == 1 and opt.width == 3072 and 0.12e9 < opt.params < 0.13e9


@pytest.mark.parametrize("hw", ["h100", "l4", "cpu-fp32"])
@pytest.mark.parametrize("options", [{}, DRIFT, {"recovery": "none"}])
def test_steps_add_up_to_the_totals(shapes, hw, options):
    for name, s in shapes.items():
        # effort "none": the options alone are the recipe (the default level is planned below)
        cfg = PruneConfig(method_options=options, nsamples=16, effort="none",
                          seqlen=64 if "tiny" in name else 2048)
        p = plan(s, cfg, hw)
        steps = p.steps
        assert p.device_peak == max(st.device_bytes for st in steps) > 0
        assert p.host_peak == max(st.host_bytes for st in steps) > 0
        assert p.disk_peak == max(st.disk_bytes for st in steps) > 0
        assert p.flops == pytest.approx(sum(st.count * sum(st.flops.values()) for st in steps))
        assert p.seconds == pytest.approx(sum(st.seconds(p.hardware) for st in steps))
        for st in steps:
            assert st.device_bytes == sum(st.device.values())
            assert all(v > 0 for v in (*st.device.values(), *st.host.values()))
        names = [st.name for st in steps]
        per_layer = {st.name: st.count for st in steps if st.count > 1}
        assert set(per_layer.values()) == {s.layers}
        assert ("recovery" in names) == (options.get("recovery") != "none")
        assert ("dense stream" in names) == (options == DRIFT)
        if HARDWARE[hw].kind == "cpu":  # the CPU's memory is the host's
            assert p.device_peak == p.host_peak


@pytest.mark.default_level
def test_the_default_level_is_what_is_planned(shapes):
    """Without a level, spap runs its default one (the drift target, up to 16 epochs): the
    plan carries the dense stream and prices the level's epochs."""
    s = shapes["llama-3.1-8b"]
    default = plan(s, PruneConfig(nsamples=16, seqlen=2048), "h100")
    none = plan(s, PruneConfig(nsamples=16, seqlen=2048, effort="none"), "h100")
    assert "dense stream" in [st.name for st in default.steps]
    assert "dense stream" not in [st.name for st in none.steps]
    assert default.flops > none.flops


def test_drift_and_recovery_terms_scale_with_the_tokens(shapes):
    """Recovery's rows and the activations grow with the calibration tokens; the Grams do
    not."""
    s = shapes["llama-3.1-8b"]
    few = plan(s, PruneConfig(method_options=DRIFT, nsamples=32), "h100")
    many = plan(s, PruneConfig(method_options=DRIFT, nsamples=128), "h100")
    f, g = ({st.name: st for st in p.steps} for p in (few, many))
    rows = "recovery's inputs/targets/drift"
    assert g["recovery"].device[rows] == 4 * f["recovery"].device[rows]
    # inputs and targets in bf16, the drift rows in float32
    assert g["recovery"].device[rows] == 128 * 2048 * (2 * 4096 * 2 + 4096 * 4)
    gram = "Gram (float64)"
    assert g["decision"].device[gram] == f["decision"].device[gram] == 8 * 14336**2


def test_offload_moves_the_activations_to_pinned_host_memory(shapes):
    s = shapes["llama-3.1-70b"]
    on = plan(s, PruneConfig(method_options=DRIFT, offload="device"), "h100")
    off = plan(s, PruneConfig(method_options=DRIFT, offload="cpu"), "h100")
    assert not on.offload and off.offload
    cap = {st.name: st for st in off.steps}["capture"]
    assert "activations" not in cap.device and "activations" in cap.host
    assert cap.host["activations"] >= 128 * 2048 * 8192 * 2  # (power-of-two pinned buffers)
    assert off.device_peak < on.device_peak - 2 * 128 * 2048 * 8192 * 2 * 0.99
    # recovery's rows and its float32 target go to the host with them: the device holds a
    # minibatch and a chunk of the closed form
    rec = {st.name: st for st in off.steps}["recovery"]
    for term in ("recovery's inputs/targets/drift", "targets plus alpha drift (float32)"):
        assert term in rec.host and term not in rec.device
    assert rec.transfer_bytes > 0
    auto = plan(s, PruneConfig(method_options=DRIFT), "l4")  # 24 GB: auto offloads
    assert auto.offload


def test_fixes_name_the_flags_that_fit(shapes):
    s8, s70 = shapes["llama-3.1-8b"], shapes["llama-3.1-70b"]
    assert fixes(s8, PruneConfig(), "h200", host_bytes=10**12) == []
    rows = fixes(s70, PruneConfig(method_options=DRIFT), "h100", host_bytes=64 * 10**9)
    assert rows and rows[0]["flags"] == "--offload cpu"
    assert any("--low-memory" in r["flags"] for r in rows)  # 141 GB of weights in 64 GB
    # each row is the plan with those flags
    last = rows[-1]
    assert last["fits"] == (last["device_peak_bytes"] <= 80e9
                            and last["host_peak_bytes"] <= 64e9)


def _folder(tmp_path, name: str):
    real(name).save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def test_cli_plan_json_and_table(tmp_path, capsys, monkeypatch):
    from spap.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = _folder(tmp_path, "qwen2.5-7b")
    assert main(["plan", folder, "--hardware", "a100", "--json", "--option",
                 "refit_target=drift", "--nsamples", "64"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device_peak_bytes"] == max(s["device_bytes"] for s in data["steps"])
    assert data["flops"] == pytest.approx(sum(s["flops"] for s in data["steps"]))
    assert data["settings"]["nsamples"] == 64 and data["recipe"]["drift"]
    assert data["hardware"]["name"] == "a100" and "datasheet" in data["hardware"]["source"]
    assert main(["plan", folder, "--hardware", "l4", "--host-memory", "16"]) == 0
    out = capsys.readouterr().out
    assert "peak / total" in out and "does not fit" in out and "--offload cpu" in out
    assert main(["plan", folder, "--hardware", "tpu"]) == 2


def test_cli_plan_takes_the_prune_recipe_flags(tmp_path, capsys, monkeypatch):
    """`spap plan` accepts prune's --effort and --compute, and plans what they run."""
    from spap.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = _folder(tmp_path, "qwen2.5-0.5b")
    steps = {}
    for level in ("none", "fast"):
        assert main(["plan", folder, "--hardware", "h100", "--json", "--effort", level,
                     "--compute", "float32", "--nsamples", "16"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["settings"]["effort"] == level and data["settings"]["compute"] == "float32"
        steps[level] = [s["name"] for s in data["steps"]]
    assert "dense stream" in steps["fast"] and "dense stream" not in steps["none"]


def test_prune_records_the_plan_beside_the_measured():
    import spap

    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator()
                        .manual_seed(0))
    rep = spap.prune(model, calib_ids=ids, sparsity=0.25, method="spap",
                     method_options={"recovery": "none"}, device="cpu").report
    pred = rep["memory"]["plan"]
    assert pred["hardware"] == "cpu-fp32" and pred["host_peak_bytes"] > 0
    assert pred["device_peak_bytes"] == max(s["device_bytes"] for s in pred["steps"].values())
    assert rep["memory"]["host_rss_peak_bytes"] > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_model_against_a_measured_run():
    """The tiny case of bench/plan_check.py (one layer, hidden 256, width 2048, the drift
    recipe with one epoch of recovery): every step's measured peak within 20% of the plan,
    for the steps large enough that the allocator's rounding does not decide (32 MiB)."""
    mod = bench_script("plan_check")
    res = mod.run("tiny", "test", True, None, None)
    rows = {k: r for k, r in res["steps"].items() if r["predicted_bytes"] >= 32 * 2**20}
    assert {"collect", "decision", "refit", "recovery", "replay"} <= set(rows)
    bad = {k: round(r["ratio"], 3) for k, r in rows.items() if not 0.8 <= r["ratio"] <= 1.2}
    assert not bad, f"measured / predicted outside [0.8, 1.2]: {bad}"
    assert 0.8 <= res["peak"]["ratio"] <= 1.2


def test_plan_is_a_pure_function_of_shapes_and_settings(shapes):
    s = shapes["qwen2.5-0.5b"]
    cfg = PruneConfig(method_options=DRIFT)
    a, b = plan(s, cfg, "h100"), plan(s, dataclasses.replace(cfg), "h100")
    assert a.to_json() == b.to_json()


def test_gpu_8b_torchrun_step_on_the_cpu(tmp_path):
    """`make gpu-8b`'s script with its tiny shape on 2 gloo ranks: the torchrun step runs the
    default SPAP on both, and each pruning run carries the plan beside its measured peak."""
    mod = bench_script("gpu_8b")
    code = mod.main(["--device", "cpu", "--tiny", "--layers", "1", "--ranks", "2", "--skip",
                     "speed", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "gpu_8b.json").read_text())
    assert code == 0, data["steps"]
    tr = data["torchrun"]
    assert tr["world_size"] == 2 and len(tr["peak_host_rss_gib"]) == 2
    assert tr["same_width"] and tr["ratio_to_one_process"] > 0
    for run in data["prune"]["runs"]:
        plan = run["plan"]
        assert plan["hardware"] == "cpu-fp32" and plan["host_peak_gib"] > 0
        assert plan["host_ratio"] == pytest.approx(
            run["peak_host_rss_gib"] / plan["host_peak_gib"])


def test_auto_offload_counts_what_stays_on_the_device():
    """choose_offload: activations that fit half the free memory still go to the host when
    with the dense stream's copy and what a layer's step keeps on the device (the Grams,
    recovery's rows) they would not fit."""
    from spap.driver.activations import choose_offload, resident_bytes, row_bytes

    cuda = torch.device("cuda")
    assert not choose_offload("auto", cuda, 40, free_bytes=100)
    assert choose_offload("auto", cuda, 40, free_bytes=100, resident=40)
    assert not choose_offload("auto", torch.device("cpu"), 40, free_bytes=100, resident=90)
    # Llama-3.1-8B, 128 x 2048 tokens in bfloat16 with the drift target: the Grams (2 x 1.6
    # GB and a window's product) and the drift cross terms stay on the device; recovery's
    # rows (inputs and targets in bf16, drift in float32) go where the activations go
    n, d, t = 14336, 4096, 128 * 2048
    assert resident_bytes(n, d, gram=True, drift=True) == 20 * n * n + 16 * d * n
    assert resident_bytes(n, d, gram=False, drift=False) == 0
    assert row_bytes(t, d, d, 2, drift=True) == t * (2 * d * 2 + d * 4)
    assert row_bytes(t, d, d, 4, drift=False) == t * 2 * d * 4


@pytest.mark.default_level
def test_llama_8b_fits_a_24_gb_gpu_and_70b_one_80_gb_gpu(shapes):
    """At the default recipe and 128 x 2048 tokens: Llama-3.1-8B on a 24 GB GPU at the
    defaults (auto moves the activations and recovery's rows to the host), Llama-3.1-70B on
    one 80 GB GPU with --low-memory --offload cpu."""
    s8, s70 = shapes["llama-3.1-8b"], shapes["llama-3.1-70b"]
    p8 = plan(s8, PruneConfig(sparsity=0.5), "rtx4090")
    assert p8.recipe["drift"] and p8.recipe["recovery"] and p8.offload
    assert p8.device_peak < 24e9 * 0.7
    on = plan(s8, PruneConfig(sparsity=0.5, offload="device"), "rtx4090")
    assert on.device_peak > 24e9  # (what the rows on the host save)
    p70 = plan(s70, PruneConfig(sparsity=0.5, low_memory=True, offload="cpu"), "h100")
    assert p70.device_peak < 80e9 * 0.7


@pytest.mark.default_level
def test_fixes_name_the_level_without_the_loss_sensitivity_pass(shapes):
    """--effort max's pass holds the whole model on the device: on a GPU too small for it,
    the fix named is --effort default."""
    small = dataclasses.replace(HARDWARE["l4"], memory_gb=17)
    cfg = PruneConfig(sparsity=0.5, effort="max")
    p = plan(shapes["llama-3.1-8b"], cfg, small)
    assert p.recipe["fisher"] and max(p.steps, key=lambda s: s.device_bytes).name == "fisher"
    rows = fixes(shapes["llama-3.1-8b"], cfg, small, host_bytes=10**12)
    assert any(r["flags"].endswith("--effort default") and r["fits"] for r in rows)
