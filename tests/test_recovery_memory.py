"""bench/recovery_memory.py on a tiny layer: it runs the real recovery, writes one record per
token count with the memory fields the report reads, and keeps the held-out-chosen epochs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "recovery_memory.py"


def test_recovery_memory_script_records_each_token_count(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_recovery_memory", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "m.json"
    assert mod.main(["--hidden", "32", "--width", "128", "--tokens", "512,1024",
                     "--epochs", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["tokens"] for r in doc["runs"]] == [512, 1024]
    for r in doc["runs"]:
        assert r["kept"] == 64 and r["heldout_tokens"] == r["tokens"] // 8
        assert r["solve_peak_gib"] >= 0 and r["inputs_targets_gib"] > 0
        assert len(r["heldout_loss"]) == 3  # epoch 0 (the start), 1 and 2
        assert 0 <= r["epochs_kept"] <= 2
        best = r["heldout_loss"][r["epochs_kept"]]
        assert best == min(r["heldout_loss"])
