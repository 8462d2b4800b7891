"""How long recovery's closed-form sums (`LayerTokens.down_sums`, bf16 products) take with one
float32 product per calibration window against one per group of windows (at most
`recovery.PRODUCT_TOKENS` tokens, the default), in one process, on one thread, with random
data at a model's MLP shapes at r=0.5; and how far apart the two Grams are (float32
round-off). Writes a JSON file:

    OMP_NUM_THREADS=1 .venv/bin/python bench/labs/product_groups.py \
        --out bench/labs/results/product-groups-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from spap.solvers import recovery
from spap.solvers.recovery import LayerTokens, down_input

#: (hidden, kept channels at r=0.5) of the MLPs measured
SHAPES = {"smollm2-135m": (576, 768), "qwen2.5-0.5b": (896, 2432),
          "llama-3.2-1b": (2048, 4096)}


def _time(data: LayerTokens, x_of, reps: int) -> tuple[float, torch.Tensor]:
    gram, _ = data.down_sums(x_of)  # (a warm-up run)
    t = time.perf_counter()
    for _ in range(reps):
        data.down_sums(x_of)
    return (time.perf_counter() - t) / reps, gram


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = args.windows * args.seqlen
    out = {"script": "bench/labs/product_groups.py", "windows": args.windows,
           "seqlen": args.seqlen, "product_tokens": recovery.PRODUCT_TOKENS,
           "torch": torch.__version__, "platform": platform.processor() or platform.machine(),
           "threads": 1, "shapes": {}}
    for name, (d, k) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        a, y = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        w = {"gate": torch.randn(k, d, generator=g) / d**0.5,
             "up": torch.randn(k, d, generator=g) / d**0.5}

        def x_of(aa, w=w):
            return down_input(aa, w, F.silu, "up")

        row = {}
        for label, product_tokens in (("per_window", args.seqlen),
                                      ("grouped", recovery.PRODUCT_TOKENS)):
            recovery.PRODUCT_TOKENS, before = product_tokens, recovery.PRODUCT_TOKENS
            try:
                data = LayerTokens(a, y, args.seqlen, torch.device("cpu"), 8192,
                                   compute=torch.bfloat16, window=args.seqlen)
                row[label], row[f"gram_{label}"] = _time(data, x_of, args.reps)
            finally:
                recovery.PRODUCT_TOKENS = before
        one, grouped = row.pop("gram_per_window"), row.pop("gram_grouped")
        row["speedup"] = row["per_window"] / row["grouped"]
        row["gram_rel_diff"] = float((one - grouped).norm() / one.norm())
        row["hidden"], row["kept"] = d, k
        out["shapes"][name] = row
        print(name, {k_: float(f"{v:.3g}") if isinstance(v, float) else v
                     for k_, v in row.items()}, flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
