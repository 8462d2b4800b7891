"""Physical slicing of an MLP: keep channel rows of the input projections and the matching
columns of the down projection, so the saved model is really smaller.

This is also the boundary where a solver's numbers enter the model, so it is where they are
checked, for every method and its recovery alike: `solve_layer` turns a failed solve into a
one-line error naming the layer and puts the solves' damping retries in the layer's record;
`apply_decision` refuses a decision that is not finite or whose channels are not a sorted set
of the layer's channels, before anything is cut.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import SpapError
from ..models.base import MLPAdapter, set_linear
from ..solvers.base import Decision, LayerProblem, Solver
from ..solvers.refit import NOT_DEFINITE_FIX, NOT_FINITE_FIX, SolveError, damping_log


def solve_layer(solver: Solver, problem: LayerProblem, n_keep: int, index: int) -> Decision:
    """`solver.solve(problem, n_keep)` for layer `index`: a SolveError (NaN or inf in a solve,
    or a Gram no damping repairs) becomes a one-line SpapError naming the layer, and the extra
    damping any solve needed is recorded as the decision's `damping_retries`."""
    with damping_log() as retries:
        try:
            decision = solver.solve(problem, n_keep)
        except SolveError as e:
            raise SpapError(f"layer {index}: {e}") from None
    if retries:
        decision.info["damping_retries"] = retries
    return decision


def check_decision(decision: Decision, n: int, index: int | None = None) -> None:
    """A one-line SpapError unless all the decision's weights are finite (the fix is the
    user's: the model, its dtype, the damping); a RuntimeError, a bug, unless it keeps a
    sorted set of the n channels with one down-projection column each."""
    where = "a layer" if index is None else f"layer {index}"
    keep = decision.keep
    k = keep.numel()
    ok = keep.dim() == 1 and not keep.is_floating_point() and 0 < k <= n
    if ok:
        ok = int(keep[0]) >= 0 and int(keep[-1]) < n and bool((keep.diff() > 0).all())
    if not ok:
        raise RuntimeError(f"{where}: the solver kept {keep.tolist()[:8]} (first 8), not a "
                           f"sorted set of the layer's {n} channels; this is a bug in spap")
    tensors = {"the new down projection": decision.w_down, "its bias": decision.b_down,
               **{f"the new {role} rows": w for role, w in (decision.w_in or {}).items()}}
    for what, t in tensors.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            raise SpapError(f"{where}: {what} holds NaN or inf; {NOT_FINITE_FIX}, or, if they "
                            f"are finite, {NOT_DEFINITE_FIX}")
    if decision.w_down.shape[-1] != k:
        raise RuntimeError(f"{where}: the new down projection has "
                           f"{decision.w_down.shape[-1]} columns for {k} kept channels; this "
                           "is a bug in spap")


@torch.no_grad()
def apply_decision(adapter: MLPAdapter, layer: nn.Module, decision: Decision,
                   index: int | None = None) -> None:
    """Replace the layer's MLP weights with the decision's: rows `keep` of every input
    projection (or the solver's refit rows), and the solver's new down projection. Refused
    (`check_decision`) before anything changes; `index` names the layer in the error."""
    check_decision(decision, adapter.out_linear(layer).in_features, index)
    adapter.set_in_weights(layer, decision.keep, decision.w_in)
    set_linear(adapter.out_linear(layer), decision.w_down, decision.b_down)


@torch.no_grad()
def zero_channels(adapter: MLPAdapter, layer: nn.Module, keep: torch.Tensor) -> None:
    """Dense-shaped reference: zero the removed channels' down-projection columns. The
    physically cut layer must compute exactly this (tests rely on it)."""
    down = adapter.out_linear(layer)
    mask = torch.zeros(down.in_features, dtype=torch.bool, device=down.weight.device)
    mask[keep.to(down.weight.device)] = True
    down.weight[:, ~mask] = 0


@torch.no_grad()
def masked_dense(dense: nn.Module, pruned: nn.Module, adapter: MLPAdapter,
                 keeps: list[list[int]]) -> nn.Module:
    """A copy of `dense` with the pruned model's weights written back at their channels
    (`keeps[i]` for layer i) and the removed channels' down-projection columns zeroed: the
    dense-shaped model the physically cut one must compute exactly (the tests' and the GPU
    check's oracle)."""
    from ..solvers.refit import scatter_columns

    ref = copy.deepcopy(dense)
    for keep_list, lref, lcut in zip(keeps, adapter.layers(ref), adapter.layers(pruned)):
        dref, dcut = adapter.out_linear(lref), adapter.out_linear(lcut)
        keep = torch.tensor(keep_list, device=dref.weight.device)
        w_ref, b_ref = adapter.channel_rows(adapter.in_linears(lref))
        w_cut, b_cut = adapter.channel_rows(adapter.in_linears(lcut))
        w_new = {role: w.clone() for role, w in w_ref.items()}  # (n, d) each
        b_new = {role: b.clone() for role, b in b_ref.items()}
        for role in w_new:
            w_new[role][keep] = w_cut[role]
            if role in b_new:
                b_new[role][keep] = b_cut[role]
        adapter.write_in(lref, w_new, b_new)
        dref.weight.copy_(scatter_columns(dcut.weight, keep, dref.in_features))
        if dcut.bias is not None:
            dref.bias = nn.Parameter(dcut.bias.clone())
    return ref


@torch.no_grad()
def add_missing_biases(model: nn.Module, adapter: MLPAdapter) -> None:
    """Make a model whose down projections gained biases loadable by stock transformers: set
    the family's MLP-bias config flag and give every MLP linear that lacks one a zero bias."""
    layers = adapter.layers(model)
    if all(adapter.out_linear(layer).bias is None for layer in layers):
        return
    mlp = [lin for layer in layers
           for lin in [*adapter.in_linears(layer).values(), adapter.out_linear(layer)]]
    if all(lin.bias is not None for lin in mlp):  # the family's MLPs carry biases already
        return
    flag = adapter.out_bias_attr(model.config)
    if flag is None:  # the solver should have been refused earlier; guard anyway
        raise ValueError(f"{model.config.model_type} cannot store a down-projection bias")
    setattr(adapter.text_config(model.config), flag, True)
    for lin in mlp:
        if lin.bias is None:
            w = lin.weight
            lin.bias = nn.Parameter(
                torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False
            )
