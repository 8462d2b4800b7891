"""One layer's attention-head pruning: collect, solve, cut (no replay).

The pipeline calls `prune_layer_heads` on a decoder layer before pruning its MLP, on the same
calibration batches: the layer is run to o_proj's input only (a hook collects its statistics
and stops the forward there), the head solver decides, the layer is cut in place. The MLP
step that follows then runs the cut layer on the same inputs, so its statistics are those of
the head-pruned attention, and its replay gives the next layer's inputs.

The o_proj input of a kept head does not change when other heads are removed (heads are
independent up to o_proj), so the Gram-based relative error the solver reports is the exact
in-sample error of the attention output, not an estimate.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..distributed import LOCAL, Shard
from ..errors import SpapError
from ..models.attention import AttentionAdapter
from ..solvers.heads import HeadLayout, HeadProblem, HeadSolver, decision_error
from ..solvers.stats import ActStats, StatsAccumulator, reduce_stats
from .activations import Batch, StopForward
from .head_surgery import cut_heads, zero_heads


@torch.no_grad()
def collect_o_stats(attn: AttentionAdapter, layer: nn.Module, batches: Sequence[Batch],
                    heldout_batches: int = 0) -> ActStats:
    """Statistics of o_proj's input over `batches` (hidden, args, kwargs), Gram included; the
    last `heldout_batches` batches also form `gram_heldout`."""
    o = attn.o_linear(layer)
    acc = StatsAccumulator(o.in_features, True, o.weight.device)
    n = len(batches)
    state = {"j": 0}

    def collect(_m, a):
        acc.add(a[0], heldout=state["j"] >= n - heldout_batches)
        raise StopForward  # o_proj's input is all this step needs

    hook = o.register_forward_pre_hook(collect)
    try:
        for j, (hidden, args, kwargs) in enumerate(batches):
            state["j"] = j
            try:
                layer(hidden, *args, **kwargs)
            except StopForward:
                pass
    finally:
        hook.remove()
    return acc.result()


@torch.no_grad()
def prune_layer_heads(
    attn: AttentionAdapter,
    layer: nn.Module,
    batches: Sequence[Batch],
    config,
    *,
    keep_per_group: int | None = None,
    kv_keep: int | None = None,
    solver: HeadSolver | None = None,
    heldout_batches: int = 0,
    index: int | None = None,
    shard: Shard = LOCAL,
    probes: Sequence[Batch] | None = None,
) -> dict[str, Any]:
    """Prune `layer`'s attention heads in place and return its JSON-able record.

    `keep_per_group` query heads are kept in each of `kv_keep` KV groups (None: all, so
    `solvers.heads.keep_counts` turns --heads / --kv-groups fractions into these). `config` is
    the model's config (for head_dim; the layer's counts are read from its weights). Keeping
    everything leaves the layer untouched, bit for bit, and runs nothing. In a data-parallel
    run (`shard`) the statistics are summed over ranks and rank 0's decision is used by all.
    `probes` (held-out windows that enter no statistic of the decision) give the record a
    held-out error, `rel_error_heldout`, of the attention output.
    """
    solver = solver or HeadSolver()
    solver.check()
    t0 = time.perf_counter()
    layout = HeadLayout(*attn.layer_layout(layer, config))
    kpg = layout.group_size if keep_per_group is None else int(keep_per_group)
    kvk = layout.n_kv if kv_keep is None else int(kv_keep)
    o = attn.o_linear(layer)
    record: dict[str, Any] = {
        "index": index, "heads_before": layout.n_heads, "kv_heads_before": layout.n_kv,
        "head_dim": layout.head_dim,
    }
    if kpg == layout.group_size and kvk == layout.n_kv:
        return {**record, "kept_heads": list(range(layout.n_heads)),
                "kept_kv_heads": list(range(layout.n_kv)), "rel_error": 0.0,
                "rel_error_heldout": 0.0 if probes is not None else None,
                "seconds": {"collect": 0.0, "solve": 0.0, "cut": 0.0}, "info": {}}
    if solver.adds_o_bias and o.bias is None and not attn.can_add_o_bias(config):
        raise SpapError(f"flap's bias compensation needs an o_proj bias, which model_type "
                        f"'{attn.model_type}' cannot save; use bias=False")
    stats = reduce_stats(collect_o_stats(attn, layer, batches, heldout_batches), shard)
    held = (reduce_stats(collect_o_stats(attn, layer, probes), shard) if probes is not None
            else None)
    t1 = time.perf_counter()
    problem = HeadProblem(
        w_o=o.weight.to(torch.float64), stats=stats, layout=layout,
        b_o=o.bias.to(torch.float64) if o.bias is not None else None,
    )
    decision = solver.solve(problem, kpg, kvk)
    # every rank cuts the same heads with the same weights
    shard.broadcast_(decision.keep_heads, decision.keep_kv, decision.w_o, decision.b_o)
    heldout_error = decision_error(problem, decision, held) if held is not None else None
    del problem, stats, held
    t2 = time.perf_counter()
    cut_heads(attn, layer, config, decision)
    t3 = time.perf_counter()
    info = {k: v for k, v in decision.info.items() if _jsonable(v)}
    return {
        **record,
        "kept_heads": decision.keep_heads.tolist(),
        "kept_kv_heads": decision.keep_kv.tolist(),
        "rel_error": float(decision.info.get("rel_error", 0.0)),
        "rel_error_heldout": heldout_error,
        "seconds": {"collect": t1 - t0, "solve": t2 - t1, "cut": t3 - t2},
        "info": info,
    }


def _jsonable(v) -> bool:
    return isinstance(v, (int, float, str, bool, list, dict)) or v is None


__all__ = ["collect_o_stats", "prune_layer_heads", "zero_heads"]
