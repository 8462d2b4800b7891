"""bench/recovery_memory.py on a tiny layer: it runs the real recovery, writes one record per
token count with the memory fields the report reads, keeps the held-out-chosen epochs, and
its memory figure sees an allocation of known size made during the solve."""

from __future__ import annotations

import json

import torch

from conftest import bench_script

MIB = 2**20


def _script():
    return bench_script("recovery_memory")


def test_recovery_memory_script_records_each_token_count(tmp_path):
    mod = _script()
    out = tmp_path / "m.json"
    assert mod.main(["--hidden", "32", "--width", "128", "--tokens", "512,1024",
                     "--epochs", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["tokens"] for r in doc["runs"]] == [512, 1024]
    for r in doc["runs"]:
        assert r["kept"] == 64 and r["heldout_tokens"] == r["tokens"] // 8
        # inputs and targets: tokens x hidden, twice, in bfloat16
        assert r["inputs_targets_gib"] * mod.GIB == 2 * r["tokens"] * 32 * 2
        assert r["solve_peak_gib"] == r["host_rss_peak_over_start_gib"]  # on the CPU
        assert len(r["heldout_loss"]) == 3  # epoch 0 (the start), 1 and 2
        losses = r["heldout_loss"]
        assert r["epochs_kept"] == min(range(len(losses)), key=losses.__getitem__)


def test_the_epochs_kept_are_the_heldout_minimum_even_at_the_start(monkeypatch):
    """A planted held-out set that the starting weights already predict: every epoch of
    training on the (unrelated) fit targets makes the held-out loss worse, so the recovery
    must keep epoch 0, not the last epoch it ran."""
    mod = _script()
    real = mod.recover

    def start_predicts_the_heldout(a, y, w_in, w_down, act, linear_key, n_val, **kwargs):
        af = a[-n_val:].float()
        out = (act(af @ w_in["gate"].T) * (af @ w_in["up"].T)) @ w_down.T  # (n_val, d)
        y = y.clone()
        y[-n_val:] = out.to(y.dtype)
        return real(a, y, w_in, w_down, act, linear_key, n_val, **kwargs)

    monkeypatch.setattr(mod, "recover", start_predicts_the_heldout)
    r = mod.measure(512, 32, 128, 64, torch.device("cpu"), 2)
    losses = r["heldout_loss"]
    assert r["epochs_kept"] == 0, losses
    assert losses[0] < min(losses[1:])


def test_solve_peak_sees_a_known_allocation(monkeypatch):
    """The CPU figure is the RSS peak over its start during recover(): a tiny solve (inputs of
    32 KiB) stays far below 16 MiB, and 64 MiB written during the solve (held until the block
    ends, so the closing sample sees it) raise it by those 64 MiB."""
    mod = _script()
    cpu = torch.device("cpu")
    mod.measure(512, 32, 128, 64, cpu, 1)  # warm-up, as main() does
    plain = mod.measure(512, 32, 128, 64, cpu, 1)["solve_peak_gib"] * mod.GIB
    held, real = [], mod.recover

    def recover_and_allocate(*args, **kwargs):
        res = real(*args, **kwargs)
        held.append(torch.ones(64 * MIB // 4))  # float32: 64 MiB of touched pages
        return res

    monkeypatch.setattr(mod, "recover", recover_and_allocate)
    grown = mod.measure(512, 32, 128, 64, cpu, 1)["solve_peak_gib"] * mod.GIB
    held.clear()
    assert 0 <= plain < 16 * MIB
    assert 64 * MIB <= grown < 64 * MIB + 16 * MIB, (plain / MIB, grown / MIB)
