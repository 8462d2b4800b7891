"""Peak memory of SPAP's recovery (solvers/recovery.py) on one Llama-3.1-8B-shaped MLP layer:
hidden 4096, width 14336, half the channels kept (7168), random bfloat16 inputs and targets as
the pipeline holds them, the default recovery (alternating, 2 epochs, minibatches of 1,024
tokens, held-out share 1/8).

What is reported is the memory of the solve beyond the inputs and targets the caller already
holds: on CUDA torch.cuda.max_memory_allocated during recover() minus what was allocated before
it; on the CPU the peak resident set size during recover() (sampled every 5 ms) minus the
resident set size before it. The inputs and targets themselves are reported apart.

On a GPU, the literature's calibration size (128 x 2048 tokens):

    PYTHONPATH=src python3 bench/recovery_memory.py --device cuda --tokens 262144

On the CPU, where an epoch at 128 x 2048 takes far too long, run it at several smaller token
counts: the solve is chunked over tokens (minibatches of 1,024, chunks of 8,192), so its memory
must not grow with the token count; two counts show whether it does:

    OMP_NUM_THREADS=1 .venv/bin/python bench/recovery_memory.py --tokens 4608,9216

Writes bench/results/recovery-memory-<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from spap.files import write_json_atomic  # noqa: E402
from spap.memory import MemoryMonitor  # noqa: E402
from spap.solvers.recovery import recover  # noqa: E402

GIB = 2**30
RSS_EVERY = 0.005  # seconds between RSS samples during the solve


def measure(tokens: int, d: int, width: int, keep: int, device: torch.device,
            epochs: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n_val = max(1, tokens // 8)
    # weights of the kept channels, scaled like a trained layer's (rows of norm ~1)
    w_in = {"gate": torch.randn(keep, d, generator=g) / d**0.5,
            "up": torch.randn(keep, d, generator=g) / d**0.5}
    w_down = torch.randn(d, keep, generator=g) / keep**0.5
    w_down_dense = w_down + 0.01 * torch.randn(d, keep, generator=g) / keep**0.5
    w_in = {k: v.to(device) for k, v in w_in.items()}
    w_down, w_down_dense = w_down.to(device), w_down_dense.to(device)
    # inputs and targets in bfloat16, filled in slices so that no float32 copy ever exists
    a = torch.empty(tokens, d, dtype=torch.bfloat16, device=device)
    y = torch.empty(tokens, d, dtype=torch.bfloat16, device=device)
    for s in range(0, tokens, 8192):
        e = min(tokens, s + 8192)
        a[s:e] = torch.randn(e - s, d, generator=g).to(device)
        y[s:e] = torch.randn(e - s, d, generator=g).to(device) * 0.1
    held = (a.numel() + y.numel()) * a.element_size()
    act = torch.nn.functional.silu
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    with MemoryMonitor(device, interval=RSS_EVERY) as rss:
        res = recover(a, y, w_in, w_down, act, "up", n_val, w_down_dense=w_down_dense,
                      ridge=0.1, epochs=epochs, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    out = {"tokens": tokens, "heldout_tokens": n_val, "hidden": d, "width": width,
           "kept": keep, "epochs_run": epochs, "epochs_kept": res.epochs,
           "heldout_loss": res.heldout, "seconds": seconds,
           "inputs_targets_gib": held / GIB,
           "host_rss_peak_over_start_gib": (rss.host_peak - rss.host_start) / GIB}
    if device.type == "cuda":
        out["device_peak_over_start_gib"] = (torch.cuda.max_memory_allocated(device)
                                             - before) / GIB
    out["solve_peak_gib"] = out.get("device_peak_over_start_gib",
                                    out["host_rss_peak_over_start_gib"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", default="4608,9216",
                    help="comma-separated token counts (fit + held-out); 262144 = 128 x 2048")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--width", type=int, default=14336)
    ap.add_argument("--keep", type=float, default=0.5, help="share of channels kept")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    keep = int(args.width * args.keep)
    path = Path(args.out or ROOT / "bench" / "results" / f"recovery-memory-{device.type}.json")
    doc = {"script": "bench/recovery_memory.py", "argv": sys.argv[1:], "device": str(device),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": []}
    if device.type == "cuda":
        doc["gpu"] = torch.cuda.get_device_name(device)
    measure(1024, 64, 256, 128, device, 1)  # warm-up: one-time allocations are not the solve's
    for n in [int(x) for x in args.tokens.split(",")]:
        r = measure(n, args.hidden, args.width, keep, device, args.epochs)
        doc["runs"].append(r)
        print(f"tokens {n:>7}: solve peak {r['solve_peak_gib']:.2f} GiB beyond the "
              f"{r['inputs_targets_gib']:.2f} GiB of inputs and targets, "
              f"{r['seconds']:.0f} s, held-out {[round(x, 4) for x in r['heldout_loss']]}",
              flush=True)
        write_json_atomic(path, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
