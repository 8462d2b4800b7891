"""What identifies a dense model, so that a resumed run is known to continue the same one.

One rule for a model in memory and for one read from a checkpoint layer by layer: its source,
a hash of its config, and a fingerprint of the bytes of the first and last decoder layers'
down projections (cheap, and different for any two checkpoints that differ in those layers).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def config_hash(config) -> str:
    d = config.to_dict()
    d.pop("_name_or_path", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tensor_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint_names(model, adapter) -> list[str]:
    """State-dict names of the first and last decoder layers' down-projection weights."""
    from .reader import module_name

    layers = adapter.layers(model)
    prefix = module_name(model, layers)
    names = []
    for i in (0, len(layers) - 1):
        down = adapter.out_linear(layers[i])
        names.append(f"{prefix}.{i}.{module_name(layers[i], down)}.weight")
    return names


def model_identity(source: str, config, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """{source, config_sha, fingerprint} of a model whose `fingerprint_names` tensors are
    `tensors` (read from the model in memory, or from its checkpoint)."""
    return {"source": source, "config_sha": config_hash(config),
            "fingerprint": tensor_fingerprint(tensors)}


def identity_in_memory(model, adapter, source: str | None = None) -> dict[str, Any]:
    """`model_identity` of a model held whole in memory."""
    ends = {n: model.get_parameter(n) for n in fingerprint_names(model, adapter)}
    return model_identity(source or getattr(model.config, "_name_or_path", ""), model.config,
                          ends)
