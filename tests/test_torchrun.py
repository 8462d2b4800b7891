"""`spap prune` under the real launcher, `python -m torch.distributed.run -m spap`, on the CPU.

test_distributed.py checks the library's data parallelism on ranks it spawns itself; this
checks what a user types: the launcher's environment reaching `distributed.init_from_env`,
rank 0 alone printing and writing, a user error on every rank ending the job with its one-line
message and nothing on disk. Each launch costs ~20 s of imports, so there are only three: two
ranks and one plain process on the same folder and text, and one refused run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import random_ids

#: 16 windows: 2 held out, so each of 2 ranks fits 7 and holds out 1
NSAMPLES, SEQLEN = 16, 24
LAUNCH = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
          "2")
SPAP = ("-m", "spap")  # the documented entry point (`torchrun ... -m spap prune`)
TIMEOUT_S = 300  # a hung rendezvous or collective fails the test instead of the suite


def _prune(src: Path, calib: Path, out: Path, *, launched: bool,
           nsamples: int = NSAMPLES) -> subprocess.CompletedProcess:
    argv = [*(LAUNCH if launched else (sys.executable,)), *SPAP, "prune", str(src),
            "--out", str(out), "--sparsity", "0.5", "--method", "obs", "--option",
            "refit=ridge", "--nsamples", str(nsamples), "--seqlen", str(SEQLEN),
            "--batch-size", "1", "--device", "cpu", "--calib", str(calib)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
                          cwd=out.parent)


def _explain(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def test_two_launched_ranks_match_one_process(tiny_dir, text_file, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    two = _prune(tiny_dir, text_file, runs / "w2", launched=True)
    assert two.returncode == 0, _explain(two)
    one = _prune(tiny_dir, text_file, runs / "w1", launched=False)
    assert one.returncode == 0, _explain(one)

    r2 = json.loads((runs / "w2" / "spap.json").read_text())
    r1 = json.loads((runs / "w1" / "spap.json").read_text())
    assert r2["distributed"]["world_size"] == 2
    assert r2["distributed"]["ranks"]["fit_windows"] == [7, 7]
    assert r2["distributed"]["ranks"]["heldout_windows"] == [1, 1]
    assert r1["distributed"] == {"world_size": 1}
    assert r2["calibration"]["token_hash"] == r1["calibration"]["token_hash"]
    assert [layer["keep"] for layer in r2["layers"]] == [layer["keep"] for layer in r1["layers"]]
    assert r2["timings"]["prune_s"] > 0

    ids = random_ids(2, SEQLEN, seed=3)
    torch.testing.assert_close(_logits(runs / "w2", ids), _logits(runs / "w1", ids),
                               rtol=1e-4, atol=1e-4)
    # only rank 0 prints the summary; and the run folders beside the outputs are gone
    assert two.stdout.count("mean layer rel. error") == 1, two.stdout
    assert two.stdout.count("\nsaved ") == 1, two.stdout
    assert sorted(p.name for p in runs.iterdir()) == ["w1", "w2"]


def test_too_few_windows_for_two_ranks_is_refused_with_the_fix(tiny_dir, text_file, tmp_path):
    # --nsamples 2 holds out 1 window and fits 1: 2 ranks need a fit batch each
    runs = tmp_path / "runs"
    runs.mkdir()
    p = _prune(tiny_dir, text_file, runs / "out", launched=True, nsamples=2)
    # every rank exits 2 with the message; the launcher then exits 1 (its ChildFailedError)
    # and appends its own failure summary, so the status a user sees is only non-zero
    assert p.returncode != 0, _explain(p)
    errors = {line for line in p.stderr.splitlines() if line.startswith("spap: error:")}
    assert len(errors) == 1, _explain(p)
    (message,) = errors
    assert "use --nsamples 3 or more" in message
    assert "SpapError" not in p.stderr  # caught and printed as one line, not a traceback
    assert list(runs.iterdir()) == []  # no output, no run folder

