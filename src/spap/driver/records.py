"""What the driver records of each pruned layer, and how many channels a layer keeps."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerRecord:
    index: int
    width_before: int
    kept: int
    rel_error: float  # ||mlp_pruned(a) - mlp_dense(a)||^2 / ||mlp_dense(a)||^2 on calibration
    seconds: dict[str, float]
    # the solver's own figures (its JSON-able `Decision.info`), and `damping_retries` when a
    # solve was not positive definite and was retried with more damping (surgery.solve_layer)
    info: dict[str, Any] = field(default_factory=dict)
    keep: list[int] = field(default_factory=list)
    # the same ratio on the probe windows (never fitted on); None when no probes were given
    rel_error_heldout: float | None = None
    # the attention heads pruned before the MLP (driver/heads.py's record); None when none
    heads: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def n_keep_for(n: int, sparsity: float, round_to: int = 1) -> int:
    """Channels kept of n: n - round(sparsity * n), then rounded to the nearest multiple of
    `round_to` (ties up), never below `round_to` nor above n."""
    keep = n - round(sparsity * n)
    if round_to > 1:
        keep = int((keep + round_to / 2) // round_to) * round_to
        keep = max(round_to, keep)
    return max(1, min(n, keep))
