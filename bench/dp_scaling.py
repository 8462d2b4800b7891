"""Data-parallel pruning time against world size: one model, one set of tokens, N = 1, 2, 4, 8.

`spap prune` under `torch.distributed.run` gives every rank 1/N of the calibration windows and
sums the statistics (src/spap/distributed.py), so the layers' collect and replay time should
fall as 1/N, and so should recovery's Adam steps (split between the ranks by default,
`recovery_parallel=split`), while the decisions and closed-form solves (the same on every
rank) do not. This measures how close it gets, and checks whether every world size keeps the
same channels as one process (the promise of the exact paths: methods without recovery, or
`--option recovery_parallel=exact --option solve_dtype=float64`; the split steps follow one
process only up to rounding, so give --keep-may-differ for them). On an 8-GPU machine, from
the repository root:

    python bench/dp_scaling.py llama-3.1-8b-model-folder --world-sizes 1,2,4,8 \
        --nsamples 128 --seqlen 2048 --device cuda

(add --check-logits to also reload every output on GPU 0 and compare its logits with N=1's;
--low-memory if the host cannot hold N copies of the model: every rank loads its own). Here,
on the CPU, a smoke run of the script itself on a tiny random LLaMA (well under two minutes):

    OMP_NUM_THREADS=1 .venv/bin/python bench/dp_scaling.py --tiny --world-sizes 1,2 \
        --device cpu --check-logits --out /tmp/dp-scaling-tiny.json

Each N is its own command, printed and recorded (N=1 a plain `python -m spap prune`, the
others under `python -m torch.distributed.run --standalone --nproc-per-node N`): world sizes
above the visible CUDA device count are skipped; on the CPU any N runs (one thread per rank
unless OMP_NUM_THREADS says otherwise). From each run's spap.json (rank 0's): timings.prune_s
(the layers, without loading or saving), total_s, rank 0's peak memory, and every rank's
calibration activation bytes, and the layers' seconds per solve step summed over layers
(`seconds_by_step`: solve_recovery_adam, ...) and the recovery epochs each layer kept. The
JSON (`--out`, default
bench/results/dp-scaling-<model>.json) is rewritten after every run; the exit status is 1 if
a run failed or (without --keep-may-differ) kept other channels than N=1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # works with or without PYTHONPATH=src
    sys.path.insert(0, str(ROOT / "src"))

from spap.files import write_json_atomic  # noqa: E402
from spap.versions import versions  # noqa: E402

#: `spap`'s command line as a module (what the `spap` script runs)
SPAP = ("-m", "spap")
LAUNCH = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node")


def tiny_folder(work: Path) -> tuple[Path, Path]:
    """A tiny random LLaMA (tests/conftest.py's shape) with a byte-level tokenizer, and a text
    to calibrate on: the smoke run needs nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                         max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = work / "tiny-llama"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0]).save_pretrained(folder)
    text = work / "calib.txt"
    words = " ".join(f"w{i % 97} x{i % 13}" for i in range(12000))
    text.write_text("\n\n".join(words[i:i + 900] for i in range(0, len(words), 900)))
    return folder, text


def command(args: argparse.Namespace, model: str, n: int, out: Path) -> list[str]:
    launcher = [*LAUNCH, str(n)] if n > 1 else []
    cmd = [sys.executable, *launcher, *SPAP, "prune", model, "--out", str(out),
           "--method", args.method, "--sparsity", str(args.sparsity),
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--batch-size", str(args.batch_size), "--device", args.device,
           "--dtype", args.dtype, "--seed", str(args.seed)]
    for opt in args.option or []:
        cmd += ["--option", opt]
    if args.calib:
        cmd += ["--calib", args.calib]
    if args.low_memory:
        cmd.append("--low-memory")
    return cmd


def child_env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"),
                                                    env.get("PYTHONPATH")) if p)
    if device == "cpu":  # N ranks on N cores against one rank on one core
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def summary(report: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """What one run's spap.json says about time and memory."""
    t, mem, dist = report["timings"], report["memory"], report["distributed"]
    act = (mem.get("activations") or {}).get("calibration_bytes")
    steps: dict[str, float] = {}
    for layer in report.get("layers", []):
        for k, v in (layer.get("seconds") or {}).items():
            steps[k] = steps.get(k, 0.0) + v
    per_rank = dist.get("ranks", {}).get("calibration_bytes", [act])
    return {"prune_s": t["prune_s"], "capture_s": t.get("capture_s"),
            # (spap.json is written before the save: its total_s ends there)
            "load_s": t.get("load_s"), "total_s": t.get("total_s"),
            "wall_s": wall_s, "calibration_bytes_per_rank": per_rank,
            "device_peak_bytes_rank0": mem.get("device_peak_bytes"),
            "host_rss_peak_bytes_rank0": mem.get("host_rss_peak_bytes"),
            "token_hash": report["calibration"].get("token_hash"),
            "distributed": dist, "layer_error_mean": report["layer_error_mean"],
            "seconds_by_step": steps,
            "recovery_epochs_by_layer": [(layer.get("info") or {}).get("recovery_epochs")
                                         for layer in report.get("layers", [])]}


def keep_diff(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """Layers whose kept channels differ, and how many channels differ in all."""
    layers = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    channels = sum(len(set(x) ^ set(y)) for x, y in zip(a, b))
    return {"equal": a == b, "layers_differing": layers, "channels_differing": channels}


@torch.no_grad()
def output_logits(folder: Path, device: str, seqlen: int) -> torch.Tensor:
    """Logits of a saved output on fixed random token ids, in float32 on the CPU."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").to(device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, min(seqlen, 64)), generator=g)
    logits = model(ids.to(device)).logits.float().cpu()
    del model
    return logits


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def add_ratios(runs: dict[str, dict[str, Any]]) -> None:
    """Speed-up and per-rank activation bytes of every run against N=1's."""
    base = runs.get("1")
    for r in runs.values():
        if base is None or "prune_s" not in base or "prune_s" not in r:
            continue
        r["speedup_prune"] = _ratio(base["prune_s"], r["prune_s"])
        r["speedup_wall"] = _ratio(base["wall_s"], r["wall_s"])
        r["calibration_bytes_per_rank_vs_1"] = _ratio(
            max(r["calibration_bytes_per_rank"]), base["calibration_bytes_per_rank"][0])


def print_table(runs: dict[str, dict[str, Any]]) -> None:
    def f(v, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    header = ("N", "prune s", "speed-up", "wall s", "act/rank vs 1", "same keep",
              "max |dlogit|")
    rows = [header]
    for n, r in runs.items():
        if "prune_s" not in r:
            rows.append((n, f"FAILED (exit {r.get('returncode')})", "", "", "", "", ""))
            continue
        rows.append((n, f(r["prune_s"], ".2f"), f(r.get("speedup_prune"), ".2f") + "x",
                     f(r["wall_s"], ".1f"), f(r.get("calibration_bytes_per_rank_vs_1"), ".3f"),
                     str(r["keep_vs_1"]["equal"]) if "keep_vs_1" in r else "-",
                     f(r.get("max_logit_diff_vs_1"), ".2e")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for j, row in enumerate(rows):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="model spec for spap prune (folder, Hub id, alias)")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny random LLaMA and its own text (a CPU smoke run of this script)")
    p.add_argument("--world-sizes", default="1,2,4,8")
    p.add_argument("--method", default="spap")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="repeatable")
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--nsamples", type=int, default=None,
                   help="default 128 (tiny: 8 x the largest world size)")
    p.add_argument("--seqlen", type=int, default=None, help="default 2048 (tiny: 24)")
    p.add_argument("--batch-size", type=int, default=None, help="default 4 (tiny: 1)")
    p.add_argument("--device", default=None,
                   help="cuda (every rank its own GPU) or cpu (default: cuda if there is one)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window draw")
    p.add_argument("--calib", default=None, help="spap prune --calib (default: its own)")
    p.add_argument("--low-memory", action="store_true", help="spap prune --low-memory")
    p.add_argument("--keep-may-differ", action="store_true",
                   help="record channels that differ from N=1's without failing (recovery's "
                        "split steps, or SPAP's float32 solve, follow one process only up to "
                        "rounding)")
    p.add_argument("--check-logits", action="store_true",
                   help="reload every output (on GPU 0, or the CPU) and compare with N=1")
    p.add_argument("--work-dir", default=None, help="where the outputs go (default: a temp "
                                                    "folder, removed at the end)")
    p.add_argument("--keep-outputs", action="store_true", help="keep every pruned folder")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    p.add_argument("--out", default=None,
                   help="result JSON (default bench/results/dp-scaling-<model>.json)")
    args = p.parse_args(argv)
    if (args.model is None) == (not args.tiny):
        p.error("give a MODEL or --tiny (not both)")
    sizes = sorted({int(x) for x in args.world_sizes.split(",") if x.strip()})
    if not sizes or sizes[0] < 1:
        p.error(f"--world-sizes takes positive integers, got '{args.world_sizes}'")
    args.sizes = sizes
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny
    args.nsamples = args.nsamples or (8 * sizes[-1] if tiny else 128)
    args.seqlen = args.seqlen or (24 if tiny else 2048)
    args.batch_size = args.batch_size or (1 if tiny else 4)
    return args


def runnable(sizes: list[int], device: str) -> tuple[list[int], list[int]]:
    """(world sizes to run, those skipped: more ranks than visible GPUs)."""
    if not device.startswith("cuda"):
        return sizes, []
    visible = torch.cuda.device_count()
    return [n for n in sizes if n <= visible], [n for n in sizes if n > visible]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dp-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        folder, text = tiny_folder(work)
        model, args.calib = str(folder), args.calib or str(text)
    else:
        model = args.model
    name = "tiny" if args.tiny else Path(model.rstrip("/")).name
    out = Path(args.out or ROOT / "bench" / "results" / f"dp-scaling-{name}.json")
    sizes, skipped = runnable(args.sizes, args.device)
    if skipped:
        print(f"skipping world sizes {skipped}: {torch.cuda.device_count()} CUDA devices visible")
    logits_on = "cuda:0" if args.device.startswith("cuda") else "cpu"
    result: dict[str, Any] = {
        "model": model, "device": args.device, "skipped_world_sizes": skipped,
        "settings": {k: getattr(args, k) for k in ("method", "option", "sparsity", "nsamples",
                                                   "seqlen", "batch_size", "dtype", "seed",
                                                   "calib", "low_memory",
                                                   "keep_may_differ")},
        "runs": {}, "versions": versions(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    runs: dict[str, dict[str, Any]] = result["runs"]
    base_keep, base_logits, failed = None, None, False
    for n in sizes:
        dest = work / f"w{n}"
        cmd = command(args, model, n, dest)
        print("$ " + " ".join(cmd), flush=True)
        load_before = os.getloadavg()  # (other jobs on the machine skew the times)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=child_env(args.device), timeout=args.timeout,
                                  capture_output=True, text=True)
            rc, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, err = None, f"timed out after {args.timeout:.0f} s\n{e.stderr or ''}"
        wall = time.perf_counter() - t0
        run: dict[str, Any] = {"command": cmd, "returncode": rc,
                               "load_average_before_after": [list(load_before),
                                                             list(os.getloadavg())],
                               "cpu_count": os.cpu_count()}
        runs[str(n)] = run
        if rc != 0 or not (dest / "spap.json").exists():
            failed = True
            run["stderr_tail"] = str(err)[-4000:]
            print(run["stderr_tail"], file=sys.stderr)
        else:
            report = json.loads((dest / "spap.json").read_text())
            run.update(summary(report, wall))
            keep = [layer["keep"] for layer in report["layers"]]
            base_keep = keep if n == 1 else base_keep
            if base_keep is not None:
                run["keep_vs_1"] = keep_diff(base_keep, keep)
                failed |= not (run["keep_vs_1"]["equal"] or args.keep_may_differ)
            if args.check_logits:
                logits = output_logits(dest, logits_on, args.seqlen)
                base_logits = logits if n == 1 else base_logits
                if base_logits is not None:
                    run["max_logit_diff_vs_1"] = float((logits - base_logits).abs().max())
                    run["max_abs_logit_1"] = float(base_logits.abs().max())
        if not args.keep_outputs:
            shutil.rmtree(dest, ignore_errors=True)
        add_ratios(runs)
        write_json_atomic(out, result)  # after every run: a later failure keeps these
    result["device_name"] = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
                             else "cpu")
    write_json_atomic(out, result)
    if args.work_dir is None and not args.keep_outputs:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(runs)
    print(f"\n{result['device_name']}; results in {out}")
    if failed:
        print("FAILED: a run did not finish, or kept other channels than N=1", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
