"""Where a whole model runs while it is evaluated (`spap eval`, `spap prune --eval`).

A model whose weights fit a share of the device's free memory (`FIT_SHARE`: the rest is for
a batch's activations and logits) is moved there whole, as before. A larger one (a 70B model
on one 80 GB GPU) is spread by accelerate's device map: its decoder layers fill the GPUs it
may use in order (every visible GPU for one process, the process's own GPU in a torchrun
run), and the ones that do not fit stay in host memory, each moved to the first GPU for its
own forward (accelerate's CPU offload). Evaluation is slower then, but it runs, and the
perplexity is the same model's. Afterwards the hooks are removed and the model is back on
the CPU, unchanged, for what comes next (the save, another evaluation).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import SpapError

#: the share of a GPU's free memory that a model's weights may take to run there whole
FIT_SHARE = 0.85
#: the share of the free host memory that layers waiting in host memory may take
HOST_SHARE = 0.9


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def spread(weights: int, free: dict[int, int], host_free: int) -> dict[Any, int] | None:
    """accelerate's max_memory for a model of `weights` bytes, given the free bytes of the
    GPUs it may use (`free`, by index, the first one the main device) and of the host; None
    when the weights fit the first GPU whole. Refused (SpapError) when GPUs and host
    together cannot hold them."""
    if not free:
        return None
    first = next(iter(free))
    if weights <= FIT_SHARE * free[first]:
        return None
    budget: dict[Any, int] = {i: int(FIT_SHARE * b) for i, b in free.items()}
    budget["cpu"] = int(HOST_SHARE * host_free)
    if sum(budget.values()) < weights:
        raise SpapError(f"the model's {weights / 1e9:.1f} GB of weights do not fit "
                        f"{len(free)} GPU(s) and host memory ({sum(budget.values()) / 1e9:.1f}"
                        " GB usable) for evaluation; evaluate on a machine with more memory")
    return budget


def _free_memory(device: torch.device, own_only: bool) -> tuple[dict[int, int], int]:
    import psutil

    first = device.index or 0
    others = [] if own_only else [i for i in range(torch.cuda.device_count()) if i != first]
    indices = [first, *others]
    return ({i: torch.cuda.mem_get_info(i)[0] for i in indices},
            psutil.virtual_memory().available)


@contextmanager
def placed(model, device, *, own_device_only: bool = False,
           max_memory: dict[Any, int] | None = None) -> Iterator[dict[str, Any]]:
    """Run the body with `model` on `device` (whole) or spread over GPUs and host memory;
    yields a description for the report ({"where": ..., "device_map": counts per place}).
    `max_memory` forces the device map with that budget (accelerate's form: GPU index or
    "cpu" -> bytes), on any device. The model goes back to the CPU afterwards."""
    device = torch.device(device)
    if max_memory is None and device.type == "cuda":
        free, host = _free_memory(device, own_device_only)
        max_memory = spread(model_bytes(model), free, host)
    if max_memory is None:
        model.to(device)
        try:
            yield {"where": str(device)}
        finally:
            model.to("cpu")
        return
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_module

    model.to("cpu")
    dmap = infer_auto_device_map(model, max_memory=max_memory,
                                 no_split_module_classes=list(
                                     getattr(model, "_no_split_modules", None) or []))
    if "disk" in dmap.values():
        raise SpapError("the model does not fit the GPUs and host memory given for evaluation")
    main = (device.index or 0) if device.type == "cuda" else "cpu"  # (accelerate's names)
    dispatch_model(model, dmap, main_device=main, force_hooks=True)
    try:
        yield {"where": "device map", "device_map": {str(k): v for k, v in
                                                      Counter(map(str, dmap.values())).items()}}
    finally:
        remove_hook_from_module(model, recurse=True)
        model.to("cpu")
        if hasattr(model, "hf_device_map"):
            del model.hf_device_map


def input_device(model) -> torch.device:
    """Where a placed model's inputs go: its input embeddings' device."""
    return model.get_input_embeddings().weight.device
