"""Speed and memory of a pruned model against its dense base, measured side by side.

Pruning MLP channels shrinks only the MLP; attention, embeddings and the LM head stay as they
are. A report therefore needs two numbers per setting: the speedup actually measured, and the
speedup the arithmetic allows (the "ideal"). Their ratio says how much of the theoretical gain
the hardware and kernels deliver; the FLOP breakdown says where the part that pruning cannot
touch goes.

FLOP count (`count_flops`, pure arithmetic from the config; FLOPs = 2 x multiply-adds; bias
adds, norms, activations, rotary embeddings and softmax are elementwise and not counted).
Per layer and per token, with d = hidden_size, h = num_attention_heads, k = num_key_value_heads,
e = head_dim, m = MLP width (intermediate_size, or ffn_dim for OPT):

    attention linear  2 * (d*h*e + 2*d*k*e + h*e*d)         q, k, v, o projections
    MLP               2 * 3*d*m  (gated: gate, up, down)   or 2 * 2*d*m (OPT: fc1, fc2)
    attention matmul  2 * 2*h*e*c                          QK^T and AV for a query seeing c keys

Prefill of B sequences of L tokens: linear terms times B*L; the causal attention matmul sums
c = 1..L, giving 2 * 2*h*e * B * L(L+1)/2 per layer (the kernel may compute the full square;
the count is the useful work). The LM head costs 2*d*V per position whose logits are computed:
the timed prefill passes `logits_to_keep=1` when the model supports it, as `generate` does, so
by default one position per sequence is counted; pass `logits_to_keep=0` to count all L.
Decode step j = 1..G feeds one token per sequence that sees c = L + j keys (the prompt, the
tokens generated so far and itself); the per-token figures are averaged over the G steps, so
the attention matmul uses the mean c = L + (G+1)/2. OPT's project_in / project_out (present
when word_embed_proj_dim != hidden_size) are counted under "other". Sliding-window attention is
not modelled (it changes nothing below the window length).

Bytes per decoded token: every parameter is read once per decode step and shared by the batch,
except the embedding tables, of which only the rows used are read (one row per sequence; one
position row for OPT); the LM head is read in full. The KV cache read per step is reported
beside it, since at large batch x context it rivals the weights and pruning the MLP does not
shrink it.

Measurement protocol (`bench`): both models stay in memory in one process and are timed
alternately, pruned then base, after `warmup` untimed rounds; every number is the median of
`reps` repetitions with min, max and IQR beside it. Prefill is one forward over random prompt
tokens with use_cache=False (and logits_to_keep=1) under inference_mode. Decode uses
`model.generate` (greedy, min_new_tokens = max_new_tokens, so the length is fixed) because that
is how an HF model is run and it needs no private cache kwargs: the decode time of one
repetition is t(generate G+1 tokens) - t(generate 1 token); both calls share the same prefill
and set-up, so the difference is exactly G cached one-token steps, including generate's own
per-step work. tokens/s = B*G / that time.

On a shared CPU, fewer threads are often faster and far steadier: OpenMP workers wait for each
other at every op, so one busy core stalls them all. Set torch.set_num_threads before calling;
the count is recorded in the result.

Memory: on CUDA, `torch.cuda.max_memory_allocated` around one untimed prefill + decode of each
model, reset in between. On CPU the process peak RSS is process-wide and never goes down, so it
cannot be split between two models living in one process, and the allocator keeps freed pages
from earlier runs. Each model is therefore saved to a temporary folder and run once (the largest
setting) in a fresh Python subprocess, which reports its RSS after imports, after loading, and
the peak during the run. The peak is the kernel's RSS high-water mark (VmHWM, the figure
getrusage's ru_maxrss is built from), reset after loading through /proc/self/clear_refs where
Linux allows it, so a loading spike does not hide the run's peak; elsewhere ru_maxrss is used
and the run's peak is reported only when it exceeds the loading peak. The parent's own
process-wide ru_maxrss is reported too, labelled as such.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SpapError

logger = logging.getLogger(__name__)

_GATED = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = (*_GATED, "opt")
# OPTLearnedPositionalEmbedding allocates max_position_embeddings + offset rows (offset = 2).
_OPT_POSITION_OFFSET = 2
COMPONENTS = ("attn_linear", "attn_matmul", "mlp", "lm_head", "other")


@dataclass(frozen=True)
class _Shape:
    """Everything the counts need, read once from a config so the formulas never branch."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    mlp_width: int
    mlp_matrices: int  # 3 for gated (gate, up, down), 2 for OPT (fc1, fc2)
    embed_dim: int  # width of the token embedding and the LM head input
    proj_macs: int  # OPT project_in + project_out per token, 0 when absent
    pos_rows: int  # rows of a learned position table (OPT), 0 for rotary models
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    layer_norm_params: int  # norm parameters per decoder layer
    final_norm_params: int
    tied: bool

    @property
    def q_out(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_out(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def attn_linear_macs(self) -> int:
        """q, k, v, o projections for one token in one layer."""
        d = self.hidden
        return d * self.q_out + 2 * d * self.kv_out + self.q_out * d

    @property
    def mlp_macs(self) -> int:
        return self.mlp_matrices * self.hidden * self.mlp_width

    @property
    def lm_head_macs(self) -> int:
        return self.embed_dim * self.vocab

    def layer_params(self) -> int:
        attn = self.attn_linear_macs  # a linear layer's MACs per token equal its weight count
        if self.qkv_bias:
            attn += self.q_out + 2 * self.kv_out
        if self.o_bias:
            attn += self.hidden
        mlp = self.mlp_macs
        if self.mlp_bias:
            mlp += (self.mlp_matrices - 1) * self.mlp_width + self.hidden
        return attn + mlp + self.layer_norm_params

    def non_embedding_params(self) -> int:
        """Parameters outside the token/position tables and the LM head."""
        return self.layers * self.layer_params() + self.final_norm_params + self.proj_macs

    def params(self) -> int:
        embed = self.vocab * self.embed_dim
        lm_head = 0 if self.tied else self.vocab * self.embed_dim
        pos = self.pos_rows * self.hidden
        return self.non_embedding_params() + embed + lm_head + pos


def _shape(config: Any) -> _Shape:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SpapError(
            f"model_type {model_type!r} is not supported for speed accounting; "
            f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    hidden = config.hidden_size
    heads = config.num_attention_heads
    if model_type == "opt":
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        norm = 2 * hidden if affine else 0  # LayerNorm: weight and bias
        has_final = config.do_layer_norm_before and not getattr(
            config, "_remove_final_layer_norm", False
        )
        embed_dim = config.word_embed_proj_dim
        bias = getattr(config, "enable_bias", True)
        return _Shape(
            model_type=model_type,
            hidden=hidden,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=heads,
            head_dim=hidden // heads,
            vocab=config.vocab_size,
            mlp_width=config.ffn_dim,
            mlp_matrices=2,
            embed_dim=embed_dim,
            proj_macs=0 if embed_dim == hidden else 2 * embed_dim * hidden,
            pos_rows=config.max_position_embeddings + _OPT_POSITION_OFFSET,
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=bias,
            layer_norm_params=2 * norm,
            final_norm_params=norm if has_final else 0,
            tied=getattr(config, "tie_word_embeddings", True),
        )
    attention_bias = bool(getattr(config, "attention_bias", False))
    return _Shape(
        model_type=model_type,
        hidden=hidden,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads,
        vocab=config.vocab_size,
        mlp_width=config.intermediate_size,
        mlp_matrices=3,
        embed_dim=hidden,
        proj_macs=0,
        pos_rows=0,
        # Qwen2 always has q/k/v biases; Llama follows attention_bias; Mistral has none.
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type == "llama" and attention_bias,
        mlp_bias=model_type == "llama" and bool(getattr(config, "mlp_bias", False)),
        layer_norm_params=2 * hidden,  # two RMSNorm weights
        final_norm_params=hidden,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


def _config_dtype_bytes(config: Any) -> int:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.get_default_dtype()
    return dtype.itemsize


def _with_total(parts: dict[str, float]) -> dict[str, float]:
    return {**parts, "total": sum(parts.values())}


def count_flops(
    config: Any,
    batch: int,
    prompt_len: int,
    gen_tokens: int,
    *,
    logits_to_keep: int = 1,
    dtype_bytes: int | None = None,
) -> dict[str, Any]:
    """Forward FLOPs and decode bytes of a decoder-only model, from its config alone.

    The formulas are in the module docstring. `logits_to_keep` follows HF's meaning: the LM
    head runs on the last `logits_to_keep` positions of the prefill, 0 meaning all of them.
    `dtype_bytes` (bytes per parameter and KV element) defaults to `config.dtype`, else torch's
    default dtype.

    Returns {"model_type", "params", "prefill": {component: FLOPs for the batch, "total"},
    "decode_per_token": {component: FLOPs per generated token, "total"},
    "decode_bytes_per_token": {"weights", "kv_cache", "total"}, ...}, components being
    attn_linear, attn_matmul, mlp, lm_head, other.
    """
    if batch < 1 or prompt_len < 1 or gen_tokens < 1:
        raise SpapError(
            f"batch, prompt_len and gen_tokens must be >= 1, got {batch}, {prompt_len}, "
            f"{gen_tokens}"
        )
    s = _shape(config)
    n = s.layers
    tokens = batch * prompt_len
    logit_positions = prompt_len if logits_to_keep <= 0 else min(logits_to_keep, prompt_len)
    # Causal prefill: query i sees i keys, sum_{i=1..L} i = L(L+1)/2; QK^T and AV each h*e*i.
    prefill = {
        "attn_linear": 2 * tokens * n * s.attn_linear_macs,
        "attn_matmul": 2 * batch * n * 2 * s.q_out * (prompt_len * (prompt_len + 1) // 2),
        "mlp": 2 * tokens * n * s.mlp_macs,
        "lm_head": 2 * batch * logit_positions * s.lm_head_macs,
        "other": 2 * tokens * s.proj_macs,
    }
    # Decode step j sees L + j keys; mean over j = 1..G is L + (G+1)/2, so 2 * 2*h*e * mean
    # = 2*h*e*(2L + G + 1), an integer.
    keys_x2 = 2 * prompt_len + gen_tokens + 1
    decode = {
        "attn_linear": 2 * n * s.attn_linear_macs,
        "attn_matmul": 2 * n * s.q_out * keys_x2,
        "mlp": 2 * n * s.mlp_macs,
        "lm_head": 2 * s.lm_head_macs,
        "other": 2 * s.proj_macs,
    }
    nbytes = dtype_bytes if dtype_bytes is not None else _config_dtype_bytes(config)
    # Per step: all non-embedding weights, one embedding row per sequence, one position row
    # (all sequences sit at the same position), and the full LM head (tied or not).
    weights_per_step = (
        s.non_embedding_params()
        + batch * s.embed_dim
        + (s.hidden if s.pos_rows else 0)
        + s.vocab * s.embed_dim
    )
    kv_per_token = n * s.kv_out * keys_x2  # K and V, mean keys L + (G+1)/2: 2 * kv_out * mean
    decode_bytes = {
        "weights": weights_per_step * nbytes / batch,
        "kv_cache": kv_per_token * nbytes,
    }
    return {
        "model_type": s.model_type,
        "batch": batch,
        "prompt_len": prompt_len,
        "gen_tokens": gen_tokens,
        "logits_to_keep": logits_to_keep,
        "dtype_bytes": nbytes,
        "params": s.params(),
        "mlp_width": s.mlp_width,
        "prefill": _with_total(prefill),
        "decode_per_token": _with_total(decode),
        "decode_bytes_per_token": _with_total(decode_bytes),
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


def bench(
    model: Any,
    base: Any,
    *,
    batch_sizes: Sequence[int] = (1, 8),
    prompt_lens: Sequence[int] = (128, 512),
    gen_tokens: int = 64,
    warmup: int = 1,
    reps: int = 5,
    device: str | torch.device | None = None,
    seed: int = 0,
    cpu_memory: bool = True,
) -> dict[str, Any]:
    """Time a pruned `model` against its dense `base` (both in memory) and compare with the
    ideal speedups from `count_flops`. Protocol in the module docstring.

    `device` None keeps the models where they are (they must share a device); otherwise both
    are moved there. Both are put in eval mode. `cpu_memory` False skips the per-model
    subprocess runs that measure RSS on CPU (each saves the model to a temporary folder first).
    Returns a JSON-serialisable dict; `format_table` renders it.
    """
    if reps < 1 or warmup < 0:
        raise SpapError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
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
    vocab = model.config.vocab_size
    if base.config.vocab_size != vocab:
        raise SpapError(
            f"vocab sizes differ (pruned {vocab}, base {base.config.vocab_size}); "
            "compare a pruned model with the base it was pruned from"
        )
    models = {"pruned": model, "base": base}
    for m in models.values():
        m.eval()
    keep = _supports_logits_to_keep(model) and _supports_logits_to_keep(base)
    dtypes = {name: _model_dtype(m) for name, m in models.items()}
    nbytes = {name: dt.itemsize for name, dt in dtypes.items()}
    if dtypes["pruned"] != dtypes["base"]:
        logger.warning("dtypes differ: pruned %s, base %s", dtypes["pruned"], dtypes["base"])
    wbytes = {name: weight_bytes(m) for name, m in models.items()}
    generator = torch.Generator().manual_seed(seed)

    settings = []
    for batch in batch_sizes:
        for prompt_len in prompt_lens:
            ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(device)
            ops: dict[str, Callable[[Any], None]] = {
                "prefill": lambda m, ids=ids: _prefill(m, ids, keep),
                "gen_1": lambda m, ids=ids: _generate(m, ids, 1),
                "gen_long": lambda m, ids=ids: _generate(m, ids, gen_tokens + 1),
            }
            logger.info("bench batch=%d prompt_len=%d gen_tokens=%d", batch, prompt_len, gen_tokens)
            for _ in range(warmup):
                for op in ops.values():
                    for m in models.values():
                        op(m)
            times = {op: {name: [] for name in models} for op in ops}
            for _ in range(reps):
                for op_name, op in ops.items():
                    for name, m in models.items():  # A B A B ...: drift hits both alike
                        times[op_name][name].append(_timed(lambda m=m, op=op: op(m), device))
            decode_times = {
                name: [
                    long - short
                    for long, short in zip(times["gen_long"][name], times["gen_1"][name])
                ]
                for name in models
            }
            flops = {
                name: count_flops(
                    m.config,
                    batch,
                    prompt_len,
                    gen_tokens,
                    logits_to_keep=1 if keep else 0,
                    dtype_bytes=nbytes[name],
                )
                for name, m in models.items()
            }
            settings.append(
                _summarise(batch, prompt_len, gen_tokens, times["prefill"], decode_times, flops)
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
    elif cpu_memory:
        big = (max(batch_sizes), max(prompt_lens))
        memory = {
            "method": "peak RSS of a fresh subprocess per model (largest setting)",
            "batch": big[0],
            "prompt_len": big[1],
            **{
                name: _rss_in_subprocess(m, big[0], big[1], gen_tokens, keep, seed)
                for name, m in models.items()
            },
        }
    else:
        memory = {"method": "skipped (cpu_memory=False)"}
    memory["weight_bytes"] = wbytes
    memory["process_peak_rss_bytes"] = _maxrss_bytes()  # whole process: both models, all runs

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
            "ideal_speedup_with_kv": fb["decode_bytes_per_token"]["total"]
            / fp["decode_bytes_per_token"]["total"],
            "ratio": decode_speedup / decode_ideal if decode_speedup else None,
        },
        "flops": {"pruned": fp, "base": fb},
    }


def _maxrss_bytes() -> int:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


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
    return _maxrss_bytes()


def _current_rss_bytes() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


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
        0, model.config.vocab_size, (job["batch"], job["prompt_len"]), generator=generator
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
        "run_peak_above_loaded": (
            run_peak - after_load
            if after_load is not None and (reset or run_peak > load_peak)
            else None
        ),
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
