"""How much the model's loss cares about each output direction of every layer's MLP.

`output_fisher` runs the dense model forward and backward on calibration windows and sums,
per decoder layer, G = sum_t g_t g_t^T, with g_t the gradient of the summed next-token loss
with respect to that layer's down-projection output at token t: the empirical Fisher of the
output (solvers/weighting.py says how a decision uses it). The weights need no gradient: the
graph is built from the embeddings' output. Each decoder layer's forward is checkpointed
(torch.utils.checkpoint): the pass keeps only every layer's input and recomputes one layer
at a time in the backward pass, so its memory is the model, the layer inputs of a batch and
its logits, not every layer's activations (11 GB more on Llama-3.1-8B at 2048 tokens).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..models.base import MLPAdapter


def output_fisher(model: nn.Module, adapter: MLPAdapter, ids: torch.Tensor, *,
                  batch_size: int = 4, device=None, progress: bool = False,
                  checkpointed: bool = True) -> list[torch.Tensor]:
    """[G_l] (m, m) float64 on the CPU, one per decoder layer, summed over the windows `ids`
    (n, L), each window's first token only context; `progress` shows a bar over the batches;
    `checkpointed`: the layers' forwards recomputed in the backward pass (module
    docstring)."""
    layers = adapter.layers(model)
    device = device or next(model.parameters()).device
    sums = [torch.zeros(adapter.out_linear(layer).out_features,
                        adapter.out_linear(layer).out_features, dtype=torch.float64)
            for layer in layers]  # (a rank of a data-parallel run may hold no window: zeros)
    seen = [False] * len(layers)

    def keep_grad(i):
        def hook(_m, _a, out):
            def on_grad(g):
                g = g.detach().reshape(-1, g.shape[-1]).to(torch.float64)
                sums[i] += (g.T @ g).cpu()
                seen[i] = True
            out.register_hook(on_grad)
        return hook

    emb = model.get_input_embeddings()
    handles = [emb.register_forward_hook(lambda _m, _a, out: out.requires_grad_())]
    handles += [adapter.out_linear(layer).register_forward_hook(keep_grad(i))
                for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    own = [(layer, layer.__dict__.get("forward")) for layer in layers] if checkpointed else []
    for layer, _ in own:
        layer.forward = functools.partial(_recomputed, layer.forward)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            batches = ids.split(batch_size)
            if progress:
                from tqdm.auto import tqdm

                batches = tqdm(batches, desc="loss sensitivity", unit="batch")
            for batch in batches:
                batch = batch.to(device)
                logits = model(batch, use_cache=False).logits[:, :-1].float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       batch[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
    finally:
        for layer, fwd in own:  # (the layer's own forward back, or the one it had)
            if fwd is None:
                del layer.forward
            else:
                layer.forward = fwd
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    missing = [i for i, s in enumerate(seen) if not s]
    if missing and ids.shape[0]:
        raise RuntimeError(f"no gradient reached the MLP output of layers {missing}")
    return sums


def _recomputed(forward, *args, **kwargs):
    """A decoder layer's forward that keeps only its inputs for the backward pass, where it
    runs again (the non-reentrant checkpoint: the hooks inside see the first run's outputs,
    whose gradients the backward pass computes)."""
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
