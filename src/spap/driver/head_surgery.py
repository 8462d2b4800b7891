"""Physical removal of attention heads, its dense-shaped reference, and the config and bias
bookkeeping that lets stock transformers reload the result."""

from __future__ import annotations

import torch
from torch import nn

from ..models.attention import AttentionAdapter
from ..solvers.heads import HeadDecision


@torch.no_grad()
def cut_heads(attn: AttentionAdapter, layer: nn.Module, config, decision: HeadDecision) -> None:
    """Keep the decision's query and KV heads in `layer` and write its o_proj weights (and
    bias, where the decision has one)."""
    attn.keep_heads(layer, config, decision.keep_heads, decision.keep_kv, decision.w_o,
                    decision.b_o)


@torch.no_grad()
def zero_heads(attn: AttentionAdapter, layer: nn.Module, config,
               keep_heads: torch.Tensor) -> None:
    """Dense-shaped reference: zero the o_proj columns of every head not in `keep_heads`.
    A layer cut to `keep_heads` with its o_proj columns unchanged computes exactly this
    (tests rely on it); the KV heads whose query heads are all gone then feed nothing."""
    o = attn.o_linear(layer)
    head_dim = attn.head_layout(config)[2]
    n_heads = o.in_features // head_dim
    gone = torch.ones(n_heads, dtype=torch.bool)
    gone[torch.as_tensor(keep_heads, dtype=torch.long)] = False
    cols = torch.nonzero(gone.repeat_interleave(head_dim)).flatten().to(o.weight.device)
    o.weight[:, cols] = 0


def commit_head_counts(model: nn.Module, attn: AttentionAdapter) -> tuple[int, int, int]:
    """Write the layers' head counts into the model's config (with head_dim explicit), after
    every layer is cut; a stock config holds one count, so the layers must agree. Returns
    (n_heads, n_kv, head_dim)."""
    layouts = {attn.layer_layout(layer, model.config) for layer in attn.layers(model)}
    if len(layouts) != 1:
        raise ValueError(f"layers differ in their head counts {sorted(layouts)}: a stock "
                         "config holds one count for every layer")
    (n_heads, n_kv, head_dim), = layouts
    attn.set_head_counts(model.config, n_heads, n_kv)
    return n_heads, n_kv, head_dim


@torch.no_grad()
def add_missing_attention_biases(model: nn.Module, attn: AttentionAdapter) -> None:
    """Make a model whose o_proj gained a bias (FLAP's compensation) loadable by stock
    transformers: turn on the family's flag and give every projection the flag covers a zero
    bias where it lacks one. Nothing to do when no o_proj gained a bias."""
    layers = attn.layers(model)
    spec = attn.attn.o_bias
    lins = [attn.linears(layer) for layer in layers]
    if all(ls["o"].bias is None for ls in lins):
        return
    if spec is None:
        if all(ls["o"].bias is not None for ls in lins):  # the family's o_proj has a bias
            return
        raise ValueError(f"{attn.model_type} cannot store an o_proj bias")
    setattr(attn.text_config(model.config), spec.flag, True)
    for ls in lins:
        for role in spec.roles:
            lin = ls[role]
            if lin.bias is None:
                w = lin.weight
                lin.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                        requires_grad=False)
