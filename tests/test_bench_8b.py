"""bench/gpu_8b.py on CPU with its tiny shape: every step runs and the JSON has the figures
the GPU run reports (no test asserts a time)."""

from __future__ import annotations

import json

import pytest

from conftest import bench_script


def load_script():
    return bench_script("gpu_8b")


def test_the_real_config_is_llama_3_1_8b():
    cfg = load_script().model_config(tiny=False)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (4096, 14336, 32)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (32, 8, 128256)
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.tie_word_embeddings is False
    from spap.eval.speed import count_flops

    assert 8.0e9 < count_flops(cfg, 1, 16, 1)["params"] < 8.1e9


def test_tiny_cpu_run(tmp_path, capsys):
    """The figures the GPU run reports, against what they must equal: the width the sparsity
    and rounding give, the documented extrapolation, the streamed run's errors equal to the
    in-memory run's, and ideal speedups between 1 and the MLP's own width ratio."""
    from spap.driver.records import n_keep_for

    mod = load_script()
    code = mod.main(["--device", "cpu", "--tiny", "--layers", "1", "--offload-check",
                     "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "gpu_8b.json").read_text())
    assert all(s["ok"] for s in data["steps"].values())
    prune, args = data["prune"], data["args"]
    assert prune["extrapolated"] and prune["layers_pruned"] == 1 and prune["layers_total"] == 2
    runs = {r["name"]: r for r in prune["runs"]}
    assert list(runs) == ["wanda-sp", "spap-fast", "spap", "wanda-sp offload=cpu"]
    dense_width = mod.TINY["intermediate_size"]
    width = n_keep_for(dense_width, args["sparsity"], args["round_to"])
    assert width < dense_width and width % args["round_to"] == 0
    base = runs["wanda-sp"]
    for r in runs.values():
        assert r["ok"] and r["width_after"] == width
        # capture once, then the layers measured, times layers_total / layers_pruned
        assert r["seconds_all_layers"] == pytest.approx(
            r["capture_seconds"] + (r["seconds"] - r["capture_seconds"]) * 2)
        assert r["ratio_to_wanda_sp"] == pytest.approx(
            r["seconds_all_layers"] / base["seconds_all_layers"])
    # streaming the activations through host memory changes where they live, not the result
    streamed = runs["wanda-sp offload=cpu"]
    assert streamed["activations"]["where"] == "host"
    assert base["activations"]["where"] == "cpu"
    assert streamed["layer_error_mean"] == base["layer_error_mean"]
    # the refitting methods beat the score-only one on the same layer
    assert runs["spap"]["layer_error_mean"] < base["layer_error_mean"]
    assert runs["spap-fast"]["layer_error_mean"] < base["layer_error_mean"]
    assert "EXTRAPOLATED" in out
    place = data["placement"]  # spread over a device budget, then back: the same model
    assert place["spread"]["placement"]["where"] == "device map"
    assert place["same_loss"] and place["model_unchanged"]
    speed = data["speed"]
    assert speed["width"] == {"dense": dense_width, "pruned": width}
    assert [s["batch"] for s in speed["summary"]] == [1, 2]
    for s in speed["summary"]:
        # cutting only the MLP: the whole model gains, but less than the MLP alone would
        for ratio in (s["prefill_ideal_flop_ratio"], s["decode_ideal_byte_ratio"]):
            assert 1 < ratio < dense_width / width
