"""Speed and memory of a pruned model against its dense base, measured side by side.

Pruning MLP channels shrinks only the MLP, and pruning attention heads only the q, k, v, o
projections and the KV cache; embeddings and the LM head stay as they are. A report therefore
needs two numbers per setting: the speedup actually measured, and the speedup the arithmetic
allows (the "ideal"). Their ratio says how much of the theoretical gain the hardware and
kernels deliver; the FLOP breakdown says where the part that pruning cannot touch goes.

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

Measurement protocol (`bench`): both models stay in memory in one process and are timed
alternately, pruned then base, after `warmup` untimed rounds; every number is the median of
`reps` repetitions with min, max and IQR beside it. Prefill is one forward over random prompt
tokens with use_cache=False (and logits_to_keep=1) under inference_mode. Decode uses
`model.generate` (greedy, min_new_tokens = max_new_tokens, so the length is fixed) because that
is how an HF model is run and it needs no private cache kwargs: the decode time of one
repetition is t(generate G+1 tokens) - t(generate 1 token); both calls share the same prefill
and set-up, so the difference is exactly G cached one-token steps, including generate's own
per-step work. tokens/s = B*G / that time. Every FLOP count is made before the first timing,
so a model that cannot be benched fails at once, not after minutes of measurement.

Default settings are sized to the device (`default_grid`). CUDA: batch 1 and 8, prompts of 128
and 512 tokens, 64 generated tokens, 5 repetitions. Anywhere else: batch 1, a 128-token prompt,
32 generated tokens, 3 repetitions, the fewest whose median drops one outlier. Measured with
SmolLM2-135M (30% pruned against dense) on one thread of a shared 2-core CPU: 5-6 s per model
per round, and the whole `spap bench` run, loading and the two memory subprocesses included,
in 1.5-2 minutes; the CUDA grid took 26 minutes there. Pass the settings explicitly for more.

On a shared CPU, fewer threads are often faster and far steadier: OpenMP workers wait for each
other at every op, so one busy core stalls them all. Set torch.set_num_threads before calling;
the count is recorded in the result.

Memory: on CUDA, `torch.cuda.max_memory_allocated` around one untimed prefill + decode of each
model, reset in between. On CPU the process peak RSS is process-wide and never goes down, so it
cannot be split between two models living in one process, and the allocator keeps freed pages
from earlier runs. Each model is therefore saved to a temporary folder and run once (the largest
setting) in a fresh Python subprocess, which reports its RSS (psutil) after imports, after
loading, and the peak during the run. The peak is the kernel's RSS high-water mark (VmHWM, the
figure getrusage's ru_maxrss is built from; psutil does not expose it), reset after loading
through /proc/self/clear_refs where Linux allows it, so a loading spike does not hide the run's
peak; elsewhere ru_maxrss (`spap.memory.process_max_rss_bytes`) is used and the run's peak is
reported only when it exceeds the loading peak. The parent's own process-wide ru_maxrss is
reported too, labelled as such.

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
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm.auto import tqdm

from ..errors import SpapError
from ..memory import process_max_rss_bytes
from ..models import get_adapter, get_attention_adapter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grid:
    """The settings `bench` times: every batch size with every prompt length."""

    batch_sizes: tuple[int, ...]
    prompt_lens: tuple[int, ...]
    gen_tokens: int
    reps: int


#: defaults on CUDA: the fuller grid (seconds per setting there)
CUDA_GRID = Grid(batch_sizes=(1, 8), prompt_lens=(128, 512), gen_tokens=64, reps=5)
#: defaults anywhere else: one setting, which a ~135M model benches in 1.5-2 minutes on one
#: shared CPU thread (the CUDA grid took 26 minutes there)
CPU_GRID = Grid(batch_sizes=(1,), prompt_lens=(128,), gen_tokens=32, reps=3)


def default_grid(device: str | torch.device) -> Grid:
    """The default settings for `device` (module docstring: why these)."""
    return CUDA_GRID if torch.device(device).type == "cuda" else CPU_GRID


# ---- FLOP counting --------------------------------------------------------------------------
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
    keep = {"logits_to_keep": logits_to_keep} if _supports_logits_to_keep(model) else {}
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
        "params": _params(model),
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


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _supports_logits_to_keep(model: torch.nn.Module) -> bool:
    # The same test generate() uses to decide whether to pass it.
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _pad_token_id(model: Any) -> int:
    """A pad id for generate (which otherwise warns and guesses); greedy decoding of a fixed
    length never uses it."""
    gen = getattr(model, "generation_config", None)
    for key in ("pad_token_id", "eos_token_id"):
        value = getattr(gen, key, None) if gen is not None else None
        if value is None:
            value = getattr(model.config, key, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _prefill(model: Any, ids: torch.Tensor, keep: bool) -> None:
    extra = {"logits_to_keep": 1} if keep else {}
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False, **extra)


def _generate(model: Any, ids: torch.Tensor, new_tokens: int) -> None:
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=_pad_token_id(model),
        )
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise SpapError(
            f"generate returned {out.shape[1] - ids.shape[1]} new tokens instead of "
            f"{new_tokens}; check the model's generation_config (max_length, stop strings)"
        )


def _spread(times: Sequence[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"min": min(times), "max": max(times), "iqr": q[2] - q[0]}


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 and num > 0 else None


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cuda_peak(
    model: Any, ids: torch.Tensor, gen_tokens: int, keep: bool, device: torch.device
) -> dict[str, int]:
    """Peak allocated memory of one untimed prefill + decode; both models are resident, so
    the peak above the start is what this model's run adds on top of all weights."""
    _sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    _prefill(model, ids, keep)
    _generate(model, ids, gen_tokens + 1)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {
        "peak_bytes": peak,
        "peak_above_start": peak - start,
        "peak_own": weight_bytes(model) + peak - start,
    }


def _positive(values: Sequence[int], what: str) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    if not out or min(out) < 1:
        raise SpapError(f"{what} must be one or more integers >= 1, got {list(values)}")
    return out


def _vocab_size(model: Any) -> int:
    """The language model's vocabulary (a multimodal wrapper keeps it in its text config)."""
    return get_adapter(model.config).text_config(model.config).vocab_size


def _check_length(model: Any, name: str, longest: int) -> None:
    """SpapError if a setting runs past the model's position limit (where it states one)."""
    config = get_adapter(model.config).text_config(model.config)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and longest > limit:
        raise SpapError(
            f"the longest setting needs {longest} positions (prompt + generated + 1) but the "
            f"{name} model's max_position_embeddings is {limit}; pass shorter --prompt-lens "
            "or --gen-tokens"
        )


def bench(
    model: Any,
    base: Any,
    *,
    batch_sizes: Sequence[int] | None = None,
    prompt_lens: Sequence[int] | None = None,
    gen_tokens: int | None = None,
    warmup: int = 1,
    reps: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    cpu_memory: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Time a pruned `model` against its dense `base` (both in memory) and compare with the
    ideal speedups from `count_flops`. Protocol in the module docstring.

    Settings left None take `default_grid(device)`'s value. `device` None keeps the models
    where they are (they must share a device); otherwise both are moved there. Both are put in
    eval mode. Every check and FLOP count runs before the first timing, so a model that cannot
    be benched raises SpapError at once. `cpu_memory` False skips the per-model subprocess runs
    that measure RSS on CPU (each saves the model to a temporary folder first). `progress`
    shows a tqdm bar over the timed rounds (with an ETA); the call is otherwise quiet apart
    from `logging`. Returns a JSON-serialisable dict; `format_table` renders it.
    """
    if device is not None:
        device = torch.device(device)
        model.to(device)
        base.to(device)
    else:
        device = _model_device(model)
        if _model_device(base) != device:
            raise SpapError(
                f"the pruned model is on {device} and the base on {_model_device(base)}; "
                "pass device= to move both"
            )
    grid = default_grid(device)
    batch_sizes = _positive(grid.batch_sizes if batch_sizes is None else batch_sizes, "batch sizes")
    prompt_lens = _positive(
        grid.prompt_lens if prompt_lens is None else prompt_lens, "prompt lengths"
    )
    gen_tokens = grid.gen_tokens if gen_tokens is None else int(gen_tokens)
    reps = grid.reps if reps is None else int(reps)
    if reps < 1 or warmup < 0 or gen_tokens < 1:
        raise SpapError(
            f"reps and gen_tokens must be >= 1 and warmup >= 0, got reps={reps}, "
            f"gen_tokens={gen_tokens}, warmup={warmup}"
        )
    vocab, base_vocab = _vocab_size(model), _vocab_size(base)
    if base_vocab != vocab:
        raise SpapError(
            f"vocab sizes differ (pruned {vocab}, base {base_vocab}); "
            "compare a pruned model with the base it was pruned from"
        )
    models = {"pruned": model, "base": base}
    for name, m in models.items():
        m.eval()
        _check_length(m, name, max(prompt_lens) + gen_tokens + 1)
    keep = _supports_logits_to_keep(model) and _supports_logits_to_keep(base)
    dtypes = {name: _model_dtype(m) for name, m in models.items()}
    if dtypes["pruned"] != dtypes["base"]:
        logger.warning("dtypes differ: pruned %s, base %s", dtypes["pruned"], dtypes["base"])
    wbytes = {name: weight_bytes(m) for name, m in models.items()}
    grid_points = [(b, p) for b in batch_sizes for p in prompt_lens]
    rss_runs = device.type == "cpu" and cpu_memory
    # One step per FLOP count (both models of a setting), per round, per RSS subprocess.
    steps = len(grid_points) * (1 + warmup + reps) + (len(models) if rss_runs else 0)
    bar = tqdm(total=steps, desc="bench", unit="step", disable=not progress)
    generator = torch.Generator().manual_seed(seed)
    settings = []
    with bar:
        # Counted first: a family whose forward cannot be counted fails before any timing.
        flops = {}
        for point in grid_points:
            bar.set_postfix_str(f"FLOPs of batch {point[0]} prompt {point[1]}")
            flops[point] = {
                name: count_flops(m, *point, gen_tokens, logits_to_keep=1 if keep else 0)
                for name, m in models.items()
            }
            bar.update()
        for batch, prompt_len in grid_points:
            ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(device)
            ops: dict[str, Callable[[Any], None]] = {
                "prefill": lambda m, ids=ids: _prefill(m, ids, keep),
                "gen_1": lambda m, ids=ids: _generate(m, ids, 1),
                "gen_long": lambda m, ids=ids: _generate(m, ids, gen_tokens + 1),
            }
            logger.info("bench batch=%d prompt_len=%d gen_tokens=%d", batch, prompt_len, gen_tokens)
            bar.set_postfix_str(f"batch {batch} prompt {prompt_len}")
            for _ in range(warmup):
                for op in ops.values():
                    for m in models.values():
                        op(m)
                bar.update()
            times = {op: {name: [] for name in models} for op in ops}
            for _ in range(reps):
                for op_name, op in ops.items():
                    for name, m in models.items():  # A B A B ...: drift hits both alike
                        times[op_name][name].append(_timed(lambda m=m, op=op: op(m), device))
                bar.update()
            decode_times = {
                name: [
                    long - short
                    for long, short in zip(times["gen_long"][name], times["gen_1"][name])
                ]
                for name in models
            }
            settings.append(
                _summarise(
                    batch,
                    prompt_len,
                    gen_tokens,
                    times["prefill"],
                    decode_times,
                    flops[(batch, prompt_len)],
                )
            )
            logger.info(
                "prefill %.4fs vs %.4fs (speedup %s, ideal %.3f); decode speedup %s, ideal %.3f",
                settings[-1]["prefill"]["pruned_s"],
                settings[-1]["prefill"]["base_s"],
                settings[-1]["prefill"]["speedup"],
                settings[-1]["ideal_speedup"],
                settings[-1]["decode"]["speedup"],
                settings[-1]["decode"]["ideal_speedup"],
            )
            if device.type == "cuda":
                settings[-1]["memory"] = {
                    name: _cuda_peak(m, ids, gen_tokens, keep, device) for name, m in models.items()
                }

        if device.type == "cuda":
            memory: dict[str, Any] = {
                "method": "cuda_max_memory_allocated, one untimed prefill+decode per model",
                **{
                    name: max((s["memory"][name] for s in settings), key=lambda x: x["peak_bytes"])
                    for name in models
                },
            }
        elif rss_runs:
            big = (max(batch_sizes), max(prompt_lens))
            memory = {
                "method": "peak RSS of a fresh subprocess per model (largest setting)",
                "batch": big[0],
                "prompt_len": big[1],
            }
            for name, m in models.items():
                bar.set_postfix_str(f"memory of the {name} model")
                memory[name] = _rss_in_subprocess(m, big[0], big[1], gen_tokens, keep, seed)
                bar.update()
        else:
            why = "cpu_memory=False" if device.type == "cpu" else f"not measured on {device.type}"
            memory = {"method": f"skipped ({why})"}
    memory["weight_bytes"] = wbytes
    memory["process_peak_rss_bytes"] = process_max_rss_bytes()  # whole process: all runs

    dtype = str(dtypes["pruned"]).removeprefix("torch.")
    if dtypes["base"] != dtypes["pruned"]:
        dtype += "/" + str(dtypes["base"]).removeprefix("torch.")
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "protocol": {
            "warmup": warmup,
            "reps": reps,
            "seed": seed,
            "order": "interleaved pruned, base per repetition",
            "prefill": "forward, use_cache=False" + (", logits_to_keep=1" if keep else ""),
            "decode": f"greedy generate: t({gen_tokens + 1} new) - t(1 new) = {gen_tokens} steps",
            "flops": "torch.utils.flop_counter.FlopCounterMode on fake tensors; attention "
            "counted as the full query x key rectangle",
        },
        "params": {name: _params(m) for name, m in models.items()},
        "weight_bytes": {**wbytes, "ratio": wbytes["pruned"] / wbytes["base"]},
        "settings": settings,
        "memory": memory,
    }


def _summarise(
    batch: int,
    prompt_len: int,
    gen_tokens: int,
    prefill_times: dict[str, list[float]],
    decode_times: dict[str, list[float]],
    flops: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Medians, spreads, measured and ideal speedups of one setting."""
    pm = {name: statistics.median(t) for name, t in prefill_times.items()}
    dm = {name: statistics.median(t) for name, t in decode_times.items()}
    fp, fb = flops["pruned"], flops["base"]
    prefill_speedup = _ratio(pm["base"], pm["pruned"])
    prefill_ideal = fb["prefill"]["total"] / fp["prefill"]["total"]
    decode_speedup = _ratio(dm["base"], dm["pruned"])
    decode_ideal = fb["decode_bytes_per_token"]["weights"] / fp["decode_bytes_per_token"]["weights"]
    tokens = batch * gen_tokens
    prefill_ratio = prefill_speedup / prefill_ideal if prefill_speedup else None
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "gen_tokens": gen_tokens,
        "speedup": prefill_speedup,
        "ideal_speedup": prefill_ideal,
        "ratio": prefill_ratio,
        "prefill": {
            "pruned_s": pm["pruned"],
            "base_s": pm["base"],
            "spread": {name: _spread(t) for name, t in prefill_times.items()},
            "times": prefill_times,
            "speedup": prefill_speedup,
            "ideal_speedup": prefill_ideal,
            "ratio": prefill_ratio,
        },
        "decode": {
            "pruned_s": dm["pruned"],
            "base_s": dm["base"],
            "spread": {name: _spread(t) for name, t in decode_times.items()},
            "times": decode_times,
            # None when noise made the difference non-positive (tiny models)
            "tokens_per_s": {name: _ratio(tokens, t) for name, t in dm.items()},
            "speedup": decode_speedup,
            "ideal_speedup": decode_ideal,
            "ideal_speedup_flops": fb["decode_per_token"]["total"]
            / fp["decode_per_token"]["total"],
            "ideal_speedup_with_kv": (
                None
                if fp["decode_bytes_per_token"]["total"] is None
                or fb["decode_bytes_per_token"]["total"] is None
                else fb["decode_bytes_per_token"]["total"] / fp["decode_bytes_per_token"]["total"]
            ),
            "ratio": decode_speedup / decode_ideal if decode_speedup else None,
        },
        "kv_cache": _kv_summary(prompt_len, fp["kv_cache_prefill"], fb["kv_cache_prefill"]),
        "flops": {"pruned": fp, "base": fb},
    }


def _kv_summary(tokens: int, pruned: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The KV cache after the prefill of both models, and the pruned / base ratios: measured,
    and from the config (the ideal)."""

    def frac(key: str) -> float | None:
        p, b = pruned.get(key), base.get(key)
        return p / b if p is not None and b else None

    return {
        "tokens": tokens,
        "pruned_bytes": pruned.get("measured"),
        "base_bytes": base.get("measured"),
        "ratio": frac("measured"),
        "config_pruned_bytes": pruned.get("config"),
        "config_base_bytes": base.get("config"),
        "ideal_ratio": frac("config"),
    }


def _peak_rss_bytes() -> int:
    """The RSS high-water mark. VmHWM is read first because it is the mm's own counter, the
    one /proc/self/clear_refs resets; getrusage also folds in the peak recorded when any thread
    exits (loader threads do), so after a reset it can still report the loading peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, IndexError, ValueError):
        pass
    return process_max_rss_bytes()


def _current_rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0), so VmHWM counts only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _rss_in_subprocess(
    model: Any, batch: int, prompt_len: int, gen_tokens: int, keep: bool, seed: int
) -> dict[str, Any]:
    """Run one prefill + decode of `model` in a fresh interpreter and return its RSS figures.

    The weights go through safetensors' `save_model` and the config through JSON rather than
    `save_pretrained`, which refuses models loaded from GGUF (their quantizer is marked not
    serialisable even though the weights are plain dequantised tensors). A failure here is
    logged and recorded, never raised: it must not throw away a finished timing run.
    """
    from safetensors.torch import save_model

    src_root = str(Path(__file__).resolve().parents[2])  # the folder holding the spap package
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src_root, os.environ.get("PYTHONPATH", "")]),
    }
    try:
        with tempfile.TemporaryDirectory(prefix="spap-rss-") as tmp:
            config = model.config.to_dict()
            config.pop("quantization_config", None)  # the weights saved are dequantised
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            save_model(model, str(Path(tmp) / "model.safetensors"))
            job = {
                "path": tmp,
                "dtype": str(_model_dtype(model)).removeprefix("torch."),
                "batch": batch,
                "prompt_len": prompt_len,
                "gen_tokens": gen_tokens,
                "keep": keep,
                "seed": seed,
                "threads": torch.get_num_threads(),
                "out": str(Path(tmp) / "rss.json"),
            }
            cmd = [sys.executable, "-c", "from spap.eval.speed import _rss_child; _rss_child()"]
            proc = subprocess.run(
                [*cmd, json.dumps(job)], env=env, capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or [
                    "exit status " + str(proc.returncode)
                ]
                raise RuntimeError(f"RSS subprocess failed: {tail[0]}")
            return json.loads(Path(job["out"]).read_text())
    except Exception as exc:  # memory is optional; the timings must survive
        logger.warning("CPU memory measurement skipped: %s", exc)
        return {"error": str(exc)}


def _rss_child() -> None:
    """Entry point of the RSS subprocess: load, reset the peak, run, write the figures."""
    job = json.loads(sys.argv[1])
    torch.set_num_threads(job["threads"])
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    after_import = _current_rss_bytes()
    dtype = getattr(torch, job["dtype"])
    config = AutoConfig.from_pretrained(job["path"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    load_model(model, str(Path(job["path"]) / "model.safetensors"))
    model.eval()
    load_peak = _peak_rss_bytes()
    after_load = _current_rss_bytes()
    reset = _reset_peak_rss()
    generator = torch.Generator().manual_seed(job["seed"])
    ids = torch.randint(
        0, _vocab_size(model), (job["batch"], job["prompt_len"]), generator=generator
    )
    _prefill(model, ids, job["keep"])
    _generate(model, ids, job["gen_tokens"] + 1)
    run_peak = _peak_rss_bytes()
    result = {
        "rss_after_import": after_import,
        "rss_after_load": after_load,
        "load_peak_rss": load_peak,
        "run_peak_rss": run_peak,
        # Without the reset the run's peak is only visible when it exceeds the loading peak.
        "peak_reset": reset,
        "run_peak_above_loaded": (run_peak - after_load if reset or run_peak > load_peak else None),
        "weight_bytes": weight_bytes(model),
    }
    Path(job["out"]).write_text(json.dumps(result))


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of a `bench` result, one row per setting."""
    mib = 2**20
    wb = result["weight_bytes"]
    lines = [
        f"device {result['device']}  torch {result['torch_version']}  "
        f"threads {result['threads']}  dtype {result['dtype']}",
        f"params pruned {result['params']['pruned']:,}  base {result['params']['base']:,}  "
        f"weights {wb['pruned'] / mib:.1f} / {wb['base'] / mib:.1f} MiB "
        f"(ratio {wb['ratio']:.3f})",
        "",
        f"{'batch':>5} {'prompt':>6} {'gen':>4} | {'prefill ms':>17} {'speedup':>7} "
        f"{'ideal':>6} {'ratio':>5} | {'decode tok/s':>17} {'speedup':>7} {'ideal':>6} "
        f"{'ratio':>5} | {'mlp%':>5}",
        f"{'':>17} | {'pruned':>8} {'base':>8} {'':>21} | {'pruned':>8} {'base':>8} "
        f"{'(bytes)':>14} {'':>5} | {'base':>5}",
    ]
    for s in result["settings"]:
        p, d = s["prefill"], s["decode"]
        tps = d["tokens_per_s"]
        base_prefill = s["flops"]["base"]["prefill"]
        lines.append(
            f"{s['batch']:>5} {s['prompt_len']:>6} {s['gen_tokens']:>4} | "
            f"{p['pruned_s'] * 1e3:>8.2f} {p['base_s'] * 1e3:>8.2f} "
            f"{_fmt(p['speedup'], '7.3f')} {p['ideal_speedup']:>6.3f} {_fmt(p['ratio'], '5.2f')} | "
            f"{_fmt(tps['pruned'], '8.1f')} {_fmt(tps['base'], '8.1f')} "
            f"{_fmt(d['speedup'], '7.3f')} {d['ideal_speedup']:>6.3f} {_fmt(d['ratio'], '5.2f')} | "
            f"{100 * base_prefill['mlp'] / base_prefill['total']:>5.1f}"
        )
    lines += [""]
    for s in result["settings"]:
        kv = s.get("kv_cache")
        if not kv or kv["pruned_bytes"] is None or kv["base_bytes"] is None:
            continue
        ideal = "" if kv["ideal_ratio"] is None else f", ideal {kv['ideal_ratio']:.3f}"
        lines.append(
            f"kv cache after prefill (batch {s['batch']}, {kv['tokens']} tokens): pruned "
            f"{kv['pruned_bytes'] / mib:.2f} MiB, base {kv['base_bytes'] / mib:.2f} MiB, "
            f"ratio {_fmt(kv['ratio'], '.3f')}{ideal}"
        )
    mem = result["memory"]
    lines += ["", f"memory: {mem['method']}"]
    for name in ("pruned", "base"):
        entry = mem.get(name)
        if not isinstance(entry, dict):
            continue
        figures = ", ".join(
            f"{k} {v / mib:.1f} MiB"
            for k, v in entry.items()
            if isinstance(v, int) and not isinstance(v, bool)
        )
        lines.append(f"  {name}: {figures}")
    return "\n".join(lines)
