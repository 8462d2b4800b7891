"""Settings of a pruning run, validated before any model is loaded."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import SpapError


@dataclass
class CalibConfig:
    """Calibration data: `nsamples` random windows of `seqlen` tokens from `source`."""

    source: str = "wiki-offline"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def validate(self) -> None:
        if self.nsamples < 1:
            raise SpapError(f"--nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen < 2:
            raise SpapError(f"--seqlen must be at least 2, got {self.seqlen}")


@dataclass
class PruneConfig:
    sparsity: float = 0.3
    method: str = "spap"
    method_options: dict[str, Any] = field(default_factory=dict)
    round_to: int = 1
    batch_size: int = 4
    layer_limit: int | None = None  # prune only the first N layers (smoke runs)

    def validate(self) -> None:
        s = self.sparsity
        if not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 <= s < 1:
            raise SpapError(f"--sparsity must be in [0, 1), got {s}; e.g. --sparsity 0.3")
        if self.round_to < 1:
            raise SpapError(
                f"--round-to must be a positive multiple such as 8, 64 or 128, got {self.round_to}"
            )
        if self.batch_size < 1:
            raise SpapError(f"--batch-size must be at least 1, got {self.batch_size}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """`key=value` strings into a dict, values parsed as int, float, bool or kept as str."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SpapError(f"--option expects key=value, got '{item}'")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = _parse_value(v.strip())
    return out


def _parse_value(v: str) -> Any:
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v
