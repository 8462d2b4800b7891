"""What one of recovery's Adam steps costs against what a data-parallel run sends per step, on
2 gloo ranks on the CPU: the step (forward, backward, fused Adam, bf16 autocast) of a gated
MLP on a full and a half minibatch, the all-reduce of the gate and up gradients
(recovery_parallel=split) and of the minibatch's rows (recovery_parallel=exact). Shapes are
SmolLM2-135M's at r=0.5 (hidden 576, 768 kept channels) by default. Prints milliseconds:

    OMP_NUM_THREADS=1 .venv/bin/python bench/labs/dp_step_cost.py --rows 56
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _ms(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def _worker(rank: int, args: argparse.Namespace, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    d, k, n = args.hidden, args.kept, args.rows
    w = [torch.randn(k, d, requires_grad=True) for _ in range(2)]  # gate, up
    down = torch.randn(d, k)
    opt = torch.optim.Adam(w, fused=True)

    def step(rows: int):
        a = torch.randn(rows, d)

        def run():
            with torch.autocast("cpu", torch.bfloat16):
                out = (torch.nn.functional.silu(a @ w[0].T) * (a @ w[1].T)) @ down.T
            opt.zero_grad()
            out.float().pow(2).sum().backward()
            opt.step()
        return run

    grads = [torch.randn(k, d) for _ in range(2)]
    rows = torch.randn(n, 2 * d)
    res = {f"step on {n} rows": _ms(step(n), args.reps),
           f"step on {n // 2} rows": _ms(step(n // 2), args.reps)}
    dist.barrier()
    res["all-reduce of the gradients"] = _ms(lambda: [dist.all_reduce(g) for g in grads],
                                             args.reps)
    res[f"all-reduce of {n} rows"] = _ms(lambda: dist.all_reduce(rows), args.reps)
    if rank == 0:
        for name, v in res.items():
            print(f"{name}: {v:.2f} ms")
        print(f"load average {os.getloadavg()}")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=56, help="tokens per minibatch")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--kept", type=int, default=768)
    p.add_argument("--reps", type=int, default=100)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args, os.path.join(tmp, "init")), nprocs=2, join=True)


if __name__ == "__main__":
    main()
