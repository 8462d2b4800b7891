"""The inputs of the current decoder layer, for every calibration (or probe) batch.

The sequential driver keeps, per batch, what decoder layer i is called with: the hidden states
and the other arguments captured at layer 0 (position embeddings, masks). For an 8B model at
128 x 2048 tokens the hidden states alone are 2 GiB in bfloat16 (8 GiB in float32), so where
they live is a choice:

- on the compute device, when they fit (fastest: nothing moves);
- off the device ("offloaded"): in host memory, pinned when the device is CUDA so the copies
  are asynchronous DMA, and streamed to the device one batch at a time as the layer runs.

Either way the next layer's inputs are written in place of this layer's, batch by batch
(`put`), so two full copies never exist at once: the peak is one copy plus a batch or two.
On CUDA the host-to-device copy of a batch is issued non-blocking from pinned memory; the
write-back is a blocking copy into the batch's own pinned buffer, so a buffer is never read
while being overwritten.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from ..config import OFFLOAD_MODES
from ..errors import SpapError

log = logging.getLogger(__name__)

# "auto" keeps the activations on the device while they take at most this share of the free
# device memory: the rest is for the current layer, its statistics (an n x n Gram in float64),
# the solver's work and the MLP inputs some solvers collect.
DEVICE_SHARE = 0.5
# ... and also while they, with what a layer's step holds on the device beside them whatever
# the choice (`resident_bytes`: the Grams and drift cross terms), fit in this
# share of it (the rest: the layer, its forward's temporaries, the solver's n x n work and
# recovery's weights and closed form; spap plan: at 0.75, Llama-3.1-70B with the drift target
# kept its activations on an 80 GB device and needed 82 GB, at 0.6 it offloads them: 73 GB)
DEVICE_FIT = 0.6

Batch = tuple[torch.Tensor, tuple, dict]


class StopForward(Exception):
    """Raised by a capture hook to end a forward once it has what it needs (the layer-0
    capture, a head step's o_proj statistics)."""


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nest of tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    return 0


def _map_tensors(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def choose_offload(mode: str, device: torch.device, nbytes: int,
                   free_bytes: int | None = None, resident: int = 0) -> bool:
    """Whether `nbytes` of activations (every copy that follows the choice: the calibration
    inputs, the dense stream's beside them, recovery's rows) go off `device`: always for
    "cpu", never for "device"; for "auto", only on CUDA and only when they exceed
    DEVICE_SHARE of the free device memory (`free_bytes`, read from the driver when None),
    or when with `resident` bytes (what stays on the device anyway, `resident_bytes`) they
    exceed DEVICE_FIT of it."""
    if mode not in OFFLOAD_MODES:
        raise SpapError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got '{mode}'")
    if mode != "auto":
        return mode == "cpu"
    if device.type != "cuda":
        return False  # host memory is the device's memory: nothing to gain
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return nbytes > DEVICE_SHARE * free_bytes or nbytes + resident > DEVICE_FIT * free_bytes


def resident_bytes(width: int, out: int, *, gram: bool, drift: bool) -> int:
    """Bytes a layer's step holds on the compute device beside the activations, wherever
    those live: the float64 Grams of all and of the held-out windows with one window's
    float32 product (`gram`), and the float64 drift cross terms (m x n, all and held-out)."""
    total = (2 * 8 + 4) * width * width if gram else 0
    if drift:
        total += 2 * 8 * out * width
    return total


def row_bytes(tokens: int, hidden: int, out: int, elem: int, *, drift: bool) -> int:
    """Bytes of recovery's rows of every token, which live where the activations do (and
    follow them off the device): inputs and targets in the activations' dtype (`elem`
    bytes), with `drift` the drift rows in float32 at least."""
    return tokens * ((hidden + out) * elem + (out * max(elem, 4) if drift else 0))


class ActivationStore:
    """Per-batch (hidden, args, kwargs) of one decoder layer's inputs.

    Iterating yields every batch on the compute device; `put(j, hidden)` replaces batch j's
    hidden states by the next layer's (same shape and dtype). With `offload`, batches are kept
    in host memory and every yielded batch is a fresh device copy (also on a CPU device, where
    that exercises the same code path as on CUDA).
    """

    def __init__(self, device: str | torch.device, offload: bool):
        self.device = torch.device(device)
        self.offload = offload
        self.pinned = offload and self.device.type == "cuda"
        self._batches: list[list] = []  # [hidden, args, kwargs]

    # -- filling ---------------------------------------------------------------------------
    def _store(self, t: torch.Tensor) -> torch.Tensor:
        if not self.offload:
            return t
        if self.pinned:
            try:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            except RuntimeError as exc:  # pinning refused (limits): pageable memory still works
                log.warning("pinned host memory refused (%s); using pageable memory", exc)
                self.pinned = False
                buf = torch.empty(t.shape, dtype=t.dtype)
        else:
            buf = torch.empty(t.shape, dtype=t.dtype)
        buf.copy_(t)
        return buf

    def append(self, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
        self._batches.append([self._store(hidden), _map_tensors(args, self._store),
                              _map_tensors(kwargs, self._store)])

    # -- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._batches)

    def _load(self, t: torch.Tensor) -> torch.Tensor:
        # pinned source: asynchronous on the current stream, ordered before the layer's kernels
        return t.to(self.device, non_blocking=self.pinned, copy=True)

    def __getitem__(self, j: int) -> Batch:
        hidden, args, kwargs = self._batches[j]
        if not self.offload:
            return hidden, args, kwargs
        return self._load(hidden), _map_tensors(args, self._load), _map_tensors(kwargs, self._load)

    def __iter__(self) -> Iterator[Batch]:
        for j in range(len(self._batches)):
            yield self[j]

    # -- writing ---------------------------------------------------------------------------
    def put(self, j: int, hidden: torch.Tensor) -> None:
        """Batch j's hidden states become `hidden` (the next layer's inputs)."""
        slot = self._batches[j]
        if not self.offload:
            slot[0] = hidden  # the old tensor is freed once the caller drops it
            return
        if slot[0].shape != hidden.shape or slot[0].dtype != hidden.dtype:
            slot[0] = self._store(hidden)
        else:
            slot[0].copy_(hidden)  # blocking: the buffer is whole before anyone reads it

    def clone(self) -> ActivationStore:
        """A second store of the same batches (e.g. a dense stream advanced apart from the
        pruned one): offloaded buffers are copied, since `put` writes into them; device
        tensors are shared, since `put` replaces them."""
        other = ActivationStore(self.device, self.offload)
        other.pinned = self.pinned
        copy = other._store if self.offload else (lambda t: t)
        other._batches = [[copy(h), _map_tensors(a, copy), _map_tensors(k, copy)]
                          for h, a, k in self._batches]
        return other

    # -- accounting ------------------------------------------------------------------------
    @property
    def tokens(self) -> int:
        """The tokens of every batch (no batch is moved to read it)."""
        return sum(h.shape[:-1].numel() for h, _, _ in self._batches)

    @property
    def nbytes(self) -> int:
        return sum(tensor_bytes(b) for b in self._batches)

    @property
    def where(self) -> str:
        if not self.offload:
            return str(self.device)
        return "host (pinned)" if self.pinned else "host"
