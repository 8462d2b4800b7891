"""Model-family adapters, looked up by `config.model_type` in the table of families.py.

`get_adapter` also refuses, with the reason, what channel pruning cannot handle: mixture-of-
experts models (no single MLP per layer) and configs whose MLP width differs per layer (a
stock config holds one width, and the modeling code builds every layer from it).
"""

from __future__ import annotations

from ..errors import SpapError
from .attention import ATTENTION, REFUSED, AttentionAdapter
from .base import MLPAdapter
from .families import FAMILIES, WRAPPERS
from .layout import Family, FamilyAdapter

SUPPORTED: tuple[str, ...] = tuple(sorted({*FAMILIES, *WRAPPERS}))
#: model_types whose attention heads can be pruned (a wrapper: where its language model's can)
HEADS_SUPPORTED: tuple[str, ...] = tuple(sorted({*ATTENTION, *WRAPPERS}))

# Expert counts of mixture-of-experts configs. Only a count above one refuses a config: some
# dense checkpoints carry the field with value 1 (MoE families whose default is one expert
# have "moe" in their model_type).
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_WIDTH_KEYS = tuple(sorted({f.width_key for f in FAMILIES.values()}))


def _refuse_unprunable(config, model_type) -> None:
    """SpapError if `config` (a model's config or its text_config) is MoE or has per-layer
    MLP widths."""
    moe = [k for k in _EXPERT_KEYS if isinstance(getattr(config, k, None), int)
           and getattr(config, k) > 1]
    if moe or "moe" in str(getattr(config, "model_type", "")):
        why = f" ({moe[0]}={getattr(config, moe[0])})" if moe else ""
        raise SpapError(
            f"model_type '{model_type}' is a mixture-of-experts model{why}; spap prunes the "
            "channels of one dense MLP per layer, so MoE models are not supported"
        )
    per_layer = getattr(config, "per_layer_attributes", None) or set()
    for key in _WIDTH_KEYS:
        if key in per_layer or isinstance(getattr(config, key, None), (list, tuple)):
            raise SpapError(
                f"model_type '{model_type}' has a different MLP width per layer ({key}); "
                "spap needs one width for all layers, as stock configs store it"
            )


def get_adapter(config) -> MLPAdapter:
    """The adapter of `config`'s family; SpapError naming the reason if it is not supported."""
    model_type = getattr(config, "model_type", None)
    text = getattr(config, "text_config", None)
    for c in (config,) if text is None else (config, text):
        _refuse_unprunable(c, model_type)
    if model_type in FAMILIES:
        return FamilyAdapter(model_type, FAMILIES[model_type])
    text_type = getattr(text, "model_type", None)
    if model_type in WRAPPERS and text_type in FAMILIES:
        return FamilyAdapter(model_type, FAMILIES[text_type], WRAPPERS[model_type])
    if text is not None:
        raise SpapError(
            f"multimodal model_type '{model_type}' (language model '{text_type}') is not "
            "supported: spap prunes a multimodal checkpoint only where stock "
            "AutoModelForCausalLM loads it and its language model is a supported family "
            f"({', '.join(sorted(WRAPPERS))}); supported: {', '.join(SUPPORTED)}"
        )
    raise SpapError(
        f"model_type '{model_type}' is not supported; supported: {', '.join(SUPPORTED)}"
    )


def get_attention_adapter(config) -> AttentionAdapter:
    """The attention adapter of `config`'s family, for head pruning; SpapError naming the
    reason (and the supported types) where its heads cannot be pruned and saved."""
    model_type = getattr(config, "model_type", None)
    text = getattr(config, "text_config", None)
    text_type = getattr(text, "model_type", None)
    if model_type in ATTENTION:
        adapter = AttentionAdapter(model_type, ATTENTION[model_type],
                                   FAMILIES[model_type].layers)
    elif model_type in WRAPPERS and text_type in ATTENTION:
        adapter = AttentionAdapter(model_type, ATTENTION[text_type], WRAPPERS[model_type],
                                   wrapped=True)
    else:
        why = REFUSED.get(text_type if model_type in WRAPPERS else model_type)
        raise SpapError(
            f"attention-head pruning does not support model_type '{model_type}'"
            f"{': ' + why if why else ''}; supported: {', '.join(HEADS_SUPPORTED)}"
        )
    c = adapter.text_config(config)
    for flag, why in adapter.attn.refuse_if:
        if getattr(c, flag, False):
            raise SpapError(
                f"attention-head pruning does not support model_type '{model_type}' with "
                f"{flag}=True: {why}; supported: {', '.join(HEADS_SUPPORTED)}"
            )
    return adapter


def markdown() -> str:
    """The README's "Supported families" paragraph, generated from the table."""
    rows: dict[tuple[str, str], list[str]] = {}
    for model_type, fam in sorted(FAMILIES.items()):
        rows.setdefault((fam.formula(), fam.width_key), []).append(model_type)
    ordered = sorted(rows.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    lines = [
        "Supported families (by `config.model_type`; generated from "
        "`src/spap/models/families.py` by `python -m spap.models --markdown`):",
        "",
        "| MLP | width | `model_type` |",
        "|---|---|---|",
    ]
    for (formula, key), types in ordered:
        lines.append(f"| {formula} | `{key}` | {', '.join(f'`{t}`' for t in types)} |")
    wrapped = ", ".join(f"`{w}`" for w in sorted(WRAPPERS))
    lines += [
        "",
        f"Multimodal: {wrapped}, whose checkpoints stock `AutoModelForCausalLM` loads; the "
        "language model's MLPs are pruned, the vision tower and projector are left as they are. "
        "Other multimodal wrappers (Qwen2-VL, LLaVA, Mistral-3: stock `AutoModelForCausalLM` "
        "does not load them, so a pruned copy could not be reloaded), mixture-of-experts models "
        "and configs with a different MLP width per layer are refused with a one-line error.",
    ]
    return "\n".join(lines) + "\n"


__all__ = ["ATTENTION", "FAMILIES", "HEADS_SUPPORTED", "SUPPORTED", "WRAPPERS",
           "AttentionAdapter", "Family", "MLPAdapter", "get_adapter", "get_attention_adapter",
           "markdown"]
