"""Data parallelism for one prune: which windows a process owns, and the sums it shares.

Every statistic spap decides from is a sum over calibration tokens (Gram matrices, cross
terms, squared norms, the layer errors), and recovery is minibatch gradient descent plus
closed forms built from the same sums. So a run on N processes (`torchrun --nproc-per-node
N -m spap prune ...`, or `spap.prune` inside an initialized process group) gives each rank a
disjoint share of the calibration, held-out and probe windows, and all-reduces every sum
before it is used: all ranks then take the same decision and compute the same weights, and
these equal one process's up to the order of floating-point additions.

The fixed rule (`Shard.share`): the windows of each kind are cut into the batches one
process would run (`--batch-size` windows each), and the batches into N contiguous runs, in
order, the first ones taking one batch more. Whole batches make every rank's layer forwards
the same bits as one process's; contiguous shares keep every rank's tokens a contiguous
range of one process's token order, which is what lets recovery draw the same global
minibatches as one process (`Shard.offset`) and split each one's Adam step between the
ranks (`Shard.sum_all_` of the gradients). A rank may hold no held-out or probe window
(it then adds zeros to those sums); every rank needs one fit batch.

`LOCAL` is the one-process shard: every collective is a no-op, so code written against a
`Shard` runs unchanged without torch.distributed. Nothing here is home-made beyond the calls
to `torch.distributed`; the backend is the one torch picks for the device (NCCL on CUDA,
gloo on the CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import SpapError


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel run: `rank` of `world_size`."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """The rank that writes the output, the report and the resume folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def bounds(self, count: int, rank: int | None = None) -> tuple[int, int]:
        """[lo, hi) of `count` items owned by `rank` (default: this one)."""
        r = self.rank if rank is None else rank
        base, extra = divmod(count, self.world_size)
        lo = r * base + min(r, extra)
        return lo, lo + base + (1 if r < extra else 0)

    def share(self, count: int, batch: int = 1) -> slice:
        """The slice of `count` windows this rank owns: whole batches of `batch` windows
        (the last one may be short), so every rank runs exactly the batches one process runs
        and a layer's outputs are the same bits."""
        lo, hi = self.bounds(-(-count // batch))
        return slice(min(lo * batch, count), min(hi * batch, count))

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce `t` in place (a sum over ranks); returns it."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def sum_all_(self, tensors: list[torch.Tensor]) -> None:
        """All-reduce every tensor of `tensors` in place (e.g. the gradients of one Adam
        step): one collective each, on the tensors themselves, so no copy of them is made."""
        for t in tensors:
            self.sum_(t)

    def sum_float(self, x: float, device: torch.device | str = "cpu") -> float:
        """A Python float summed over ranks (in float64)."""
        if not self.distributed:
            return x
        return float(self.sum_(torch.tensor([x], dtype=torch.float64, device=device)))

    def counts(self, n: int, device: torch.device | str = "cpu") -> list[int]:
        """Every rank's value of the integer `n`, in rank order."""
        if not self.distributed:
            return [n]
        t = torch.zeros(self.world_size, dtype=torch.int64, device=device)
        t[self.rank] = n
        return [int(v) for v in self.sum_(t).tolist()]

    def offset(self, n: int, device: torch.device | str = "cpu") -> tuple[int, int]:
        """(this rank's first index, the total) of items of which every rank holds `n`,
        concatenated in rank order."""
        c = self.counts(n, device)
        return sum(c[: self.rank]), sum(c)

    def broadcast_(self, *tensors: torch.Tensor | None) -> None:
        """Rank 0's values of `tensors` on every rank, in place (None entries skipped)."""
        if self.distributed:
            import torch.distributed as dist

            for t in tensors:
                if t is not None:
                    dist.broadcast(t, src=0)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


LOCAL = Shard()


def current() -> Shard:
    """The shard of this process: from the initialized default process group, else LOCAL."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return LOCAL


def launched_world_size() -> int:
    """The world size a launcher such as torchrun set in the environment (1 if none)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(device: str) -> tuple[Shard, str]:
    """Join the process group that torchrun describes in the environment, on the backend torch
    picks for `device`; returns the shard and this rank's device (cuda:LOCAL_RANK for a
    CUDA device given without an index). Without a launcher: (LOCAL, device)."""
    import torch.distributed as dist

    if launched_world_size() <= 1 and not (dist.is_available() and dist.is_initialized()):
        return LOCAL, device
    if not dist.is_available():
        raise SpapError("this torch build has no torch.distributed; run a single process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if device == "cuda":
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        backend = dist.get_default_backend_for_device(torch.device(device).type)
        dist.init_process_group(backend=backend)
    return current(), device
