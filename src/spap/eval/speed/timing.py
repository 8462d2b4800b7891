"""Speed and memory of a pruned model against its dense base, measured side by side.

Pruning MLP channels shrinks only the MLP, and pruning attention heads only the q, k, v, o
projections and the KV cache; embeddings and the LM head stay as they are. A report therefore
needs two numbers per setting: the speedup actually measured, and the speedup the arithmetic
allows (the "ideal"). Their ratio says how much of the theoretical gain the hardware and
kernels deliver; the FLOP breakdown says where the part that pruning cannot touch goes.

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

Memory: on CUDA, `torch.cuda.max_memory_allocated` around one untimed prefill + decode of
each model, reset in between; on CPU, a fresh subprocess per model (rss.py says why).
FLOPs, bytes and the KV cache: flops.py.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ...errors import SpapError
from ...memory import process_max_rss_bytes
from ...models import get_adapter
from .flops import count_flops, param_count, weight_bytes
from .rss import rss_in_subprocess
from .runs import (
    generate,
    model_device,
    model_dtype,
    prefill,
    supports_logits_to_keep,
    vocab_size,
)

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _spread(times: Sequence[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"min": min(times), "max": max(times), "iqr": q[2] - q[0]}


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 and num > 0 else None


def _cuda_peak(
    model: Any, ids: torch.Tensor, gen_tokens: int, keep: bool, device: torch.device
) -> dict[str, int]:
    """Peak allocated memory of one untimed prefill + decode; both models are resident, so
    the peak above the start is what this model's run adds on top of all weights."""
    _sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    prefill(model, ids, keep)
    generate(model, ids, gen_tokens + 1)
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
        device = model_device(model)
        if model_device(base) != device:
            raise SpapError(
                f"the pruned model is on {device} and the base on {model_device(base)}; "
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
    vocab, base_vocab = vocab_size(model), vocab_size(base)
    if base_vocab != vocab:
        raise SpapError(
            f"vocab sizes differ (pruned {vocab}, base {base_vocab}); "
            "compare a pruned model with the base it was pruned from"
        )
    models = {"pruned": model, "base": base}
    for name, m in models.items():
        m.eval()
        _check_length(m, name, max(prompt_lens) + gen_tokens + 1)
    keep = supports_logits_to_keep(model) and supports_logits_to_keep(base)
    dtypes = {name: model_dtype(m) for name, m in models.items()}
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
            logger.info("bench batch=%d prompt_len=%d gen_tokens=%d", batch, prompt_len, gen_tokens)
            bar.set_postfix_str(f"batch {batch} prompt {prompt_len}")
            times = _rounds(models, ids, keep, gen_tokens, warmup, reps, device, bar)
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

        memory = _memory(models, settings, device, rss_runs, batch_sizes, prompt_lens,
                         gen_tokens, keep, seed, bar)
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
        "params": {name: param_count(m) for name, m in models.items()},
        "weight_bytes": {**wbytes, "ratio": wbytes["pruned"] / wbytes["base"]},
        "settings": settings,
        "memory": memory,
    }


def _rounds(models: dict[str, Any], ids: torch.Tensor, keep: bool, gen_tokens: int,
            warmup: int, reps: int, device: torch.device, bar) -> dict[str, dict[str, list]]:
    """`warmup` untimed rounds, then `reps` timed ones, of every op on every model, the
    models interleaved (A B A B ...: drift hits both alike): op -> model -> seconds."""
    ops: dict[str, Callable[[Any], None]] = {
        "prefill": lambda m: prefill(m, ids, keep),
        "gen_1": lambda m: generate(m, ids, 1),
        "gen_long": lambda m: generate(m, ids, gen_tokens + 1),
    }
    for _ in range(warmup):
        for op in ops.values():
            for m in models.values():
                op(m)
        bar.update()
    times: dict[str, dict[str, list]] = {op: {name: [] for name in models} for op in ops}
    for _ in range(reps):
        for op_name, op in ops.items():
            for name, m in models.items():
                times[op_name][name].append(_timed(lambda m=m, op=op: op(m), device))
        bar.update()
    return times


def _memory(models: dict[str, Any], settings: list[dict[str, Any]], device: torch.device,
            rss_runs: bool, batch_sizes: Sequence[int], prompt_lens: Sequence[int],
            gen_tokens: int, keep: bool, seed: int, bar) -> dict[str, Any]:
    """The memory report: on CUDA the settings' largest peaks, on CPU (`rss_runs`) a fresh
    subprocess per model at the largest setting (rss.py), else why it was skipped."""
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
            memory[name] = rss_in_subprocess(m, big[0], big[1], gen_tokens, keep, seed)
            bar.update()
    else:
        why = "cpu_memory=False" if device.type == "cpu" else f"not measured on {device.type}"
        memory = {"method": f"skipped ({why})"}
    return memory


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
