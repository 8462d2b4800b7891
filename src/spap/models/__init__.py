"""Model-family adapters, looked up by `config.model_type`."""

from __future__ import annotations

from ..errors import SpapError
from .base import MLPAdapter
from .llama import GatedMLPAdapter
from .opt import OPTAdapter

_ADAPTERS: dict[str, type[MLPAdapter]] = {
    t: cls for cls in (OPTAdapter, GatedMLPAdapter) for t in cls.model_types
}

SUPPORTED: tuple[str, ...] = tuple(sorted(_ADAPTERS))


def get_adapter(config) -> MLPAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise SpapError(
            f"model_type '{model_type}' is not supported; supported: {', '.join(SUPPORTED)}"
        )
    return _ADAPTERS[model_type]()


__all__ = ["MLPAdapter", "SUPPORTED", "get_adapter"]
