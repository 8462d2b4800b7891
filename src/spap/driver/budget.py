"""`--params F`: which MLP sparsity and head removal take a fraction F of the parameters.

Every layer of a stock config has the same shapes, so the parameters one removed MLP channel,
one removed query head and one removed KV head (with its query heads) take are the same in
every layer and are read off the model's own modules (weights and biases, fused projections
included). A split is then a head setting (query heads per KV group, KV groups, from the
grid each count allows) and the MLP sparsity that removes the rest of the budget; the driver
keeps every layer uniform, so these counts are exact up to rounding one channel per layer.

The candidate splits are MLP channels only, the smallest step of query heads (one per KV
group) and the smallest step of whole KV groups; `auto` tries each that fits the budget and
keeps the one with the lowest held-out perplexity (api.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import SpapError
from ..models import get_attention_adapter
from ..models.base import MLPAdapter

#: the largest MLP sparsity a split may ask for (beyond it a model is of no use)
MAX_SPARSITY = 0.9


@dataclass(frozen=True)
class Split:
    """One way to remove the budget: run settings, and the fraction it removes."""

    name: str
    sparsity: float
    heads: float = 0.0
    kv_groups: float = 0.0
    removed_frac: float = 0.0  # of the parameters the budget counts

    def settings(self) -> dict[str, float]:
        return {"sparsity": self.sparsity, "heads": self.heads, "kv_groups": self.kv_groups}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def count_params(model) -> int:
    # Tied embeddings are one Parameter, counted once by parameters().
    return sum(p.numel() for p in model.parameters())


def count_non_embedding(model) -> int:
    """Parameters outside the token embeddings and the output head (counted once when tied)."""
    skip = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings())
            if m is not None for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def _numel(mod) -> int:
    return sum(p.numel() for p in mod.parameters(recurse=False))


def _per_unit(model, adapter: MLPAdapter) -> dict[str, float]:
    """Parameters of one MLP channel, one query head and one KV head (k and v only), in
    layer 0."""
    layer = adapter.layers(model)[0]
    n = adapter.width(model.config)
    ins = adapter.in_linears(layer)
    down = adapter.out_linear(layer)
    channel = (sum(_numel(lin) for lin in ins.values())
               + down.weight.numel()) / n  # (the down bias is not per channel)
    out = {"channel": channel, "q_head": 0.0, "kv_head": 0.0}
    try:
        attn = get_attention_adapter(model.config)
    except SpapError:
        return out
    h, g, hd = attn.head_layout(model.config)
    q_w, q_b = attn.qkv_rows(layer, model.config)
    d = q_w["q"].shape[1]
    m = attn.o_linear(layer).out_features
    bias = {r: 1 if r in q_b else 0 for r in "qkv"}
    out["q_head"] = hd * (d + bias["q"]) + hd * m
    out["kv_head"] = 2 * hd * d + hd * (bias["k"] + bias["v"])
    out["layout"] = (h, g, hd)
    return out


def candidate_splits(model, adapter: MLPAdapter, params: float, of: str = "all",
                     split: str = "auto") -> list[Split]:
    """The splits of `split` (validated with the run's settings, `config.PARAMS_SPLITS`) that
    remove a fraction `params` of the model's parameters (`of` "all", or "non-embedding":
    without the token embeddings and the output head); SpapError where none fits."""
    base = count_params(model) if of == "all" else count_non_embedding(model)
    unit = _per_unit(model, adapter)
    n_layers = len(adapter.layers(model))
    n = adapter.width(model.config)
    # (name, heads, kv_groups, parameters the head step removes per layer)
    wanted: list[tuple[str, float, float, float]] = []
    if split in ("auto", "mlp"):
        wanted.append(("mlp", 0.0, 0.0, 0.0))
    if "layout" in unit:
        h, g, _ = unit["layout"]
        r = h // g
        if split in ("auto", "heads") and r > 1:  # one query head of every KV group
            wanted.append(("heads", 1 / r, 0.0, g * unit["q_head"]))
        if split in ("auto", "kv") and g > 1:  # one whole KV group and its query heads
            wanted.append(("kv", 0.0, 1 / g, r * unit["q_head"] + unit["kv_head"]))
    elif split in ("heads", "kv"):
        get_attention_adapter(model.config)  # raises the family's reason
    if split in ("heads", "kv") and not wanted:
        raise SpapError(f"--params-split {split}: this model has "
                        + ("one query head per KV group" if split == "heads" else
                           "a single KV group") + "; use another split")
    out = []
    for name, heads, kv_groups, head_params in wanted:
        channels = round((params * base - n_layers * head_params)
                         / (n_layers * unit["channel"]))
        if channels < 0 or channels > MAX_SPARSITY * n:
            continue
        removed = n_layers * (head_params + channels * unit["channel"])
        out.append(Split(name, channels / n, heads, kv_groups, removed / base))
    if not out:
        raise SpapError(f"--params {params} cannot be removed by the split '{split}' (at most "
                        f"{MAX_SPARSITY:.0%} of the MLP channels with the head steps); choose "
                        "a smaller --params or another --params-split")
    return out
