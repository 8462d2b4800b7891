"""bench/gpu_8b.py on CPU with its tiny shape: every step runs and the JSON has the figures
the GPU run reports (no test asserts a time)."""

from __future__ import annotations

import json

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
    mod = load_script()
    code = mod.main(["--device", "cpu", "--tiny", "--layers", "1", "--offload-check",
                     "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "gpu_8b.json").read_text())
    assert all(s["ok"] for s in data["steps"].values())
    prune = data["prune"]
    assert prune["extrapolated"] and prune["layers_pruned"] == 1 and prune["layers_total"] == 2
    names = [r["name"] for r in prune["runs"]]
    assert names == ["wanda-sp", "spap-fast", "spap", "wanda-sp offload=cpu"]
    for r in prune["runs"]:
        assert r["ok"] and r["seconds_all_layers"] >= r["capture_seconds"] >= 0
        assert r["peak_device_gib"] is None and r["peak_host_rss_gib"] > 0
        assert r["width_after"] % data["args"]["round_to"] == 0
    assert prune["runs"][-1]["activations"]["where"] == "host"
    assert "EXTRAPOLATED" in out
    speed = data["speed"]
    assert [s["batch"] for s in speed["summary"]] == [1, 2]
    for s in speed["summary"]:
        assert s["prefill_ideal_flop_ratio"] > 1 and s["decode_ideal_byte_ratio"] > 1
    assert speed["width"]["pruned"] < speed["width"]["dense"]
