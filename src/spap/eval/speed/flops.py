"""FLOPs and bytes of a model's prefill and decode: the ideal speedups `spap bench` sets
beside the measured ones.

FLOP count (`count_flops`): `torch.utils.flop_counter.FlopCounterMode` counts the model's own
forward, so every family transformers runs is counted without a formula per family. The forward
runs under `FakeTensorMode`: tensors carry shapes and no data, so a count costs no arithmetic
and no memory whatever the model's size, only Python time per op (about 1-2 s per forward of a
30-layer model on one CPU thread; a count is three forwards). Meta tensors would not do:
transformers' mask code reads values, and skips those checks only for fake tensors.
FlopCounterMode counts matrix products (2 FLOPs per multiply-add) and attention kernels; bias
adds, norms, activations, rotary embeddings and softmax are elementwise and not counted.
Attention is counted as the kernel's formula does, the full query x key rectangle, so a causal
prefill of L tokens counts L^2 score entries per head, not the L(L+1)/2 a causal kernel needs
(the attention share of a long prefill is an upper bound). CPU's flash-attention kernel has no
formula in torch; it is given the formula of the CUDA ones.

The per-component breakdown comes from FlopCounterMode's module hierarchy and the family's
adapter (`spap.models.get_adapter`), never from names of the family: "mlp" is the adapter's MLP
linears in every decoder layer; "attn_linear" and "attn_matmul" are the rest of the decoder
layers, split into products with a weight (aten.mm / addmm: the q, k, v, o projections) and
all other products (attention scores and values); "lm_head" is the output embedding; "other"
is what runs outside the decoder layers (OPT's project_in / project_out, for example).

Prefill is the timed call itself: B sequences of L tokens, `logits_to_keep=1` when the model
supports it (as `generate` passes it), so the LM head runs on one position per sequence; pass
`logits_to_keep=0` to count all L. Decode step j = 1..G feeds one token per sequence that sees
L + j keys; every step's count is affine in the number of keys, so the mean over the G steps is
exactly f(1) + (f(2) - f(1)) (G - 1) / 2 from the first two steps, which are the ones counted
(a sliding window caps the keys, which makes this an approximation when L < window < L + G).
The decode figures are per generated token: the step's count divided by B.

Bytes per decoded token: every parameter of every module that runs in a decode step is read
once per step and shared by the batch, except embedding tables, of which one row per sequence
is read (a table that is also the LM head is counted once, in full). Modules that do not run
for text (a vision tower) are not counted. The KV cache read per step (the K and V tensors the
cache holds after the step) is reported beside it, since at large batch x context it rivals the
weights and pruning the MLP does not shrink it.

KV-cache memory (`kv_cache_bytes`, and `kv_cache` in every setting): what attention-head
pruning shrinks. From the config, layers x 2 (K and V) x KV heads x head_dim x dtype bytes x
tokens x batch, the cache when every layer keeps every token (only for families whose head
layout spap knows, `spap.models.get_attention_adapter`; None elsewhere); and measured, the
bytes of the K and V tensors the cache object holds after the prefill of the FLOP count
(fake tensors: shapes only, no memory), which is smaller where sliding-window layers keep
only their window. Both are given for the pruned and the dense model, with their ratio (the
config's is the ideal one).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ...errors import SpapError
from ...models import get_adapter, get_attention_adapter
from .runs import supports_logits_to_keep

# Products with a weight matrix: nn.Linear reaches the dispatcher as one of these.
_WEIGHT_OPS = (torch.ops.aten.mm, torch.ops.aten.addmm)


_CACHE_KWARGS = ("cache", "past_key_values")  # the cache argument, new name first


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_flop_formulas() -> dict[Any, Any]:
    """Formulas torch lacks: the CPU flash-attention kernel (SDPA's choice on CPU)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None else {op: _sdpa_flops}


@dataclass(frozen=True)
class _Names:
    """FlopCounterMode's names (root class, then the attribute path) of the modules the
    breakdown needs, found through the adapter."""

    layers: tuple[tuple[str, tuple[str, ...]], ...]  # (layer, its MLP linears)
    lm_head: str | None


def _component_names(model: torch.nn.Module, adapter: Any) -> _Names:
    root = type(model).__name__
    path = {id(m): f"{root}.{name}" if name else root for name, m in model.named_modules()}
    layers = []
    for layer in adapter.layers(model):
        mlp = [*adapter.in_linears(layer).values(), adapter.out_linear(layer)]
        layers.append((path[id(layer)], tuple(path[id(m)] for m in mlp)))
    head = model.get_output_embeddings()
    return _Names(tuple(layers), path.get(id(head)) if head is not None else None)


def _components(counts: dict[str, dict[Any, int]], names: _Names) -> dict[str, int]:
    """Split FlopCounterMode's counts (module name -> op -> FLOPs, parents inclusive) into the
    report's components (module docstring)."""

    def flops(name: str | None) -> int:
        return sum(counts.get(name, {}).values()) if name else 0

    total = flops("Global")
    mlp = attn_linear = attn_matmul = 0
    for layer, mlp_names in names.layers:
        ops = counts.get(layer, {})
        in_mlp = sum(flops(n) for n in mlp_names)
        linear = sum(v for op, v in ops.items() if op in _WEIGHT_OPS)
        mlp += in_mlp
        attn_linear += linear - in_mlp
        attn_matmul += sum(ops.values()) - linear
    lm_head = flops(names.lm_head)
    parts = {"attn_linear": attn_linear, "attn_matmul": attn_matmul, "mlp": mlp, "lm_head": lm_head}
    return {**parts, "other": total - sum(parts.values()), "total": total}


def _cache_kwarg(model: torch.nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    for name in _CACHE_KWARGS:
        if name in params:
            return name
    raise SpapError(
        f"{type(model).__name__}.forward takes no cache argument ({' or '.join(_CACHE_KWARGS)}); "
        "spap bench needs a model that decodes with a KV cache"
    )


def _cache_of(output: Any) -> Any:
    for name in _CACHE_KWARGS:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    raise SpapError("the model returned no KV cache with use_cache=True; spap bench needs one")


def _cache_bytes(cache: Any) -> int | None:
    """Bytes of the K and V tensors a transformers Cache holds (None if it has no layers)."""
    total, found = 0, False
    for layer in getattr(cache, "layers", ()) or ():
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
                found = True
    return total if found else None


@contextmanager
def _modules_called() -> Iterator[list[torch.nn.Module]]:
    """Every module whose forward runs inside the block (a process-wide hook, removed after)."""
    called: list[torch.nn.Module] = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, _args: called.append(module)
    )
    try:
        yield called
    finally:
        handle.remove()


def _bytes_read(modules: Sequence[torch.nn.Module], batch: int) -> int:
    """Parameter bytes one decode step of `batch` sequences reads (module docstring)."""
    full: dict[int, int] = {}
    rows: dict[int, int] = {}
    for module in {id(m): m for m in modules}.values():
        for p in module.parameters(recurse=False):
            if isinstance(module, torch.nn.Embedding):
                n = min(batch, p.shape[0]) * p[0].numel()
                rows[id(p)] = max(rows.get(id(p), 0), n * p.element_size())
            else:
                full[id(p)] = p.numel() * p.element_size()
    return sum(full.values()) + sum(b for i, b in rows.items() if i not in full)


def kv_cache_bytes(config: Any, batch: int, tokens: int, dtype_bytes: int) -> int | None:
    """Bytes of a KV cache holding `tokens` positions of `batch` sequences in every layer:
    layers x 2 x KV heads x head_dim x dtype bytes x tokens x batch, from the config (module
    docstring); None for a family whose head layout spap does not know."""
    try:
        attn = get_attention_adapter(config)
    except SpapError:
        return None
    _, n_kv, head_dim = attn.head_layout(config)
    layers = attn.text_config(config).num_hidden_layers
    return layers * 2 * n_kv * head_dim * dtype_bytes * tokens * batch


def _config_dtype(config: Any) -> torch.dtype:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.get_default_dtype()


def _as_model(model_or_config: Any) -> torch.nn.Module:
    """The model itself, or a weightless (meta) model built from a config."""
    if isinstance(model_or_config, torch.nn.Module):
        return model_or_config
    from transformers import AutoModelForCausalLM

    get_adapter(model_or_config)  # refuse an unsupported family before building anything
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            model_or_config, dtype=_config_dtype(model_or_config)
        )


def _step_mean(
    first: dict[str, Any],
    second: dict[str, Any],
    steps: int,
    batch: int,
    keys: Sequence[str] | None = None,
) -> dict[str, float]:
    """Per token, the mean over decode steps j = 1..`steps` of a count that is affine in the
    number of keys L + j, from its values at steps 1 and 2: f(1) + (f(2) - f(1)) (G - 1) / 2."""
    return {k: (first[k] + (second[k] - first[k]) * (steps - 1) / 2) / batch for k in keys or first}


def count_flops(
    model: Any,
    batch: int,
    prompt_len: int,
    gen_tokens: int,
    *,
    logits_to_keep: int = 1,
) -> dict[str, Any]:
    """Forward FLOPs and decode bytes of a causal LM, counted on its real forward.

    `model` is a model (its weights are never touched: the forward runs on fake tensors) or a
    config (a weightless model is built from it). How the counts are made, and what the
    components mean, is in the module docstring. `logits_to_keep` follows HF's meaning: the LM
    head runs on the last `logits_to_keep` positions of the prefill, 0 meaning all of them; it
    is passed only to models that take it (others compute every position, and are counted so).

    Returns {"model_type", "params", "mlp_width", "dtype_bytes", "prefill": {component: FLOPs
    for the batch, "total"}, "decode_per_token": {component: FLOPs per generated token,
    "total"}, "decode_bytes_per_token": {"weights", "kv_cache", "total"}, ...}, components
    being attn_linear, attn_matmul, mlp, lm_head, other. A family spap does not support, or a
    forward that cannot be counted, raises SpapError.
    """
    if batch < 1 or prompt_len < 1 or gen_tokens < 1:
        raise SpapError(
            f"batch, prompt_len and gen_tokens must be >= 1, got {batch}, {prompt_len}, "
            f"{gen_tokens}"
        )
    model = _as_model(model)
    config = model.config
    adapter = get_adapter(config)
    names = _component_names(model, adapter)
    cache_kw = _cache_kwarg(model)
    keep = {"logits_to_keep": logits_to_keep} if supports_logits_to_keep(model) else {}
    first = next(model.parameters())
    formulas = _custom_flop_formulas()

    def counter() -> FlopCounterMode:
        return FlopCounterMode(display=False, depth=None, custom_mapping=formulas)

    def tokens(n: int) -> torch.Tensor:  # fake: only the shape matters
        return torch.zeros((batch, n), dtype=torch.long, device=first.device)

    mode = FakeTensorMode(allow_non_fake_inputs=True)  # allowed: tensors that are attributes
    state: dict[str, torch.Tensor] = {}

    def forward(ids: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        return functional_call(model, state, (), {"input_ids": ids, "use_cache": True, **kwargs})

    def step(cache: Any) -> dict[str, Any]:
        with _modules_called() as called, counter() as c:
            out = forward(tokens(1), {cache_kw: cache, **keep})
        return {
            "flops": _components(c.get_flop_counts(), names),
            "weights": _bytes_read(called, batch),
            "kv_cache": _cache_bytes(_cache_of(out)),
        }

    try:
        # The weights are made fake once: converting them at every op doubles a count's time.
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            state[name] = mode.from_tensor(t)
        with mode, torch.no_grad():
            with counter() as c:  # the cache costs no FLOPs: this is the timed prefill's count
                out = forward(tokens(prompt_len), keep)
            prefill = _components(c.get_flop_counts(), names)
            cache = _cache_of(out)
            kv_prefill = _cache_bytes(cache)  # before the decode steps extend it
            first_step = step(cache)  # sees L + 1 keys
            second_step = step(cache) if gen_tokens > 1 else first_step  # L + 2 keys
    except SpapError:
        raise
    except Exception as exc:
        why = (str(exc).strip().splitlines() or [""])[0]
        raise SpapError(
            f"cannot count the FLOPs of model_type '{config.model_type}' "
            f"({type(model).__name__}): {type(exc).__name__}: {why}"
        ) from exc
    if prefill["mlp"] <= 0:
        raise SpapError(
            f"no FLOPs were counted in the MLP of model_type '{config.model_type}': its "
            "adapter's MLP modules did not run in the forward"
        )
    decode = _step_mean(first_step["flops"], second_step["flops"], gen_tokens, batch)
    weights = first_step["weights"] / batch  # the same weights at every step
    kv = (
        None
        if first_step["kv_cache"] is None
        else _step_mean(first_step, second_step, gen_tokens, batch, ("kv_cache",))["kv_cache"]
    )
    return {
        "model_type": config.model_type,
        "batch": batch,
        "prompt_len": prompt_len,
        "gen_tokens": gen_tokens,
        "logits_to_keep": logits_to_keep if keep else 0,
        "dtype_bytes": first.element_size(),
        "params": param_count(model),
        "mlp_width": adapter.width(config),
        "method": "torch.utils.flop_counter.FlopCounterMode on fake tensors",
        "prefill": prefill,
        "decode_per_token": decode,
        "decode_bytes_per_token": {
            "weights": weights,
            "kv_cache": kv,
            "total": None if kv is None else weights + kv,
        },
        # the cache after the prefill: measured from the cache object, and from the config
        "kv_cache_prefill": {
            "measured": kv_prefill,
            "config": kv_cache_bytes(config, batch, prompt_len, first.element_size()),
        },
    }


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (tied weights once); buffers such as rotary tables are
    not weights and are left out."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
