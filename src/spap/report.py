"""The record of a pruning run that `spap.json` holds: what was asked, what was done, how well
each layer reproduces the dense one, where the time and memory went, and with which versions."""

from __future__ import annotations

from typing import Any

from .config import PruneConfig
from .driver.budget import count_non_embedding, count_params
from .driver.pipeline import HEAD_DEFAULTS
from .driver.records import LayerRecord
from .versions import versions


def _heads(records: list[LayerRecord], cfg: PruneConfig) -> dict[str, Any] | None:
    """Query and KV heads per layer before and after (uniform), and the head decision."""
    rec = next((r.heads for r in records if r.heads is not None), None)
    if rec is None:
        return None
    return {"heads_requested": cfg.heads, "kv_groups_requested": cfg.kv_groups,
            "method": cfg.head_method, "options": {**HEAD_DEFAULTS, **cfg.head_options},
            "heads_before": rec["heads_before"], "heads_after": len(rec["kept_heads"]),
            "kv_heads_before": rec["kv_heads_before"],
            "kv_heads_after": len(rec["kept_kv_heads"]), "head_dim": rec["head_dim"],
            "layer_error_mean": _mean([r.heads["rel_error"] for r in records
                                       if r.heads is not None]),
            "layer_error_heldout_mean": (
                _mean([r.heads["rel_error_heldout"] for r in records if r.heads is not None])
                if rec.get("rel_error_heldout") is not None else None)}


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def prune_report(cfg: PruneConfig, options: dict[str, Any], model, adapter,
                 records: list[LayerRecord], *, dense: dict[str, Any],
                 run: dict[str, Any]) -> dict[str, Any]:
    """The report of a finished run. `dense`: params, width and dtype before the cut; `run`:
    saveable, device, memory, resumed_from_layer, distributed (world size, every rank's
    share), calibration, probe and timings."""
    params_after = count_params(model)
    non_emb_after = count_non_embedding(model)
    removed = sum(r.width_before - r.kept for r in records)
    total = sum(r.width_before for r in records) or 1
    heldout = [r.rel_error_heldout for r in records if r.rel_error_heldout is not None]
    return {
        "method": cfg.method,
        "options": options,
        "sparsity_requested": cfg.sparsity,
        "sparsity_achieved": removed / total,
        "saveable": run["saveable"],
        "round_to": cfg.round_to,
        "params_before": dense["params"],
        "params_after": params_after,
        "params_removed_frac": 1 - params_after / dense["params"],
        "params_non_embedding_before": dense["params_non_embedding"],
        "params_non_embedding_after": non_emb_after,
        "params_non_embedding_removed_frac":
            1 - non_emb_after / max(dense["params_non_embedding"], 1),
        "heads": _heads(records, cfg),
        "model": {
            "model_type": model.config.model_type,
            "width_key": adapter.width_key,
            "width_before": dense["width"],
            "width_after": adapter.width(model.config),
            "layers": len(adapter.layers(model)),
            "layers_pruned": len(records),
            "dtype": dense["dtype"],
        },
        "device": run["device"],
        "memory": run["memory"],
        "resumed_from_layer": run["resumed_from_layer"],
        "distributed": run["distributed"],
        "calibration": run["calibration"],
        "layer_error_mean": _mean([r.rel_error for r in records]),
        "layer_error_heldout_mean": _mean(heldout) if run["probe"] is not None else None,
        "probe": run["probe"],
        "layers": [r.to_json() for r in records],
        "timings": run["timings"],
        # the precision of the products (precision.py) and the effort level's options
        # (solvers/presets.py), with any fallback of its drift target
        "precision": run.get("precision"),
        "effort": run.get("effort"),
        "versions": versions(),
    }
