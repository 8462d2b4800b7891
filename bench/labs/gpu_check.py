"""One unattended GPU check of spap: correctness on the device, pruning time, pruned speed.

Run on the GPU machine from the repository root (no internet, no Hub, no asset packages;
the package is used from the working tree):

    PYTHONPATH=src python3 bench/labs/gpu_check.py --out $OUT

and here, on CPU with tiny sizes, to test the script itself (under 2 minutes on 2 cores):

    OMP_NUM_THREADS=1 .venv/bin/python bench/labs/gpu_check.py --device cpu --tiny \
        --out /tmp/gpucheck

Steps (each guarded: a failure is recorded with its traceback and the next step still runs;
`<out>/gpu_check.json` is rewritten after every step and every pruning run):

1. env          torch / transformers / CUDA versions, GPU name and memory, and which heavy
                optional packages (datasets, lm_eval, matplotlib) importing spap pulled in.
2. correctness  tiny random LLaMA, Qwen2 and OPT models (hidden 64, MLP width 176, 2 layers,
                vocab 256, float32, built as tests/conftest.py does) on the device:
                (a) pruned at 0.3 with spap, obs and wanda-sp, the cut model's logits against
                the "masked dense" oracle of tests/test_pipeline.py (dense shapes, removed
                channels zeroed, the new weights put in); config width == weight shapes;
                sparsity 0.0 leaves the logits identical;
                (b) spap.save_pruned into a temporary folder (its own reload check included),
                reloaded with AutoModelForCausalLM.from_pretrained: max abs logit difference.
3. timing       a random-weights model of the real Qwen2.5-0.5B architecture
                (bench/configs/qwen2.5-0.5b.json) in bfloat16, calibration = random token ids
                (128 x 2048 by default), every method variant pruning a fresh deep copy at 0.3
                on the device, wanda-sp first: wall seconds, summed per-layer collect / solve /
                replay seconds, the ratio to wanda-sp, peak device memory. No new run starts
                once --time-budget seconds (counted from the script's start) have passed; the
                skipped variants are recorded.
4. speed        spap.eval.speed.bench: the 0.3-pruned model (the --speed-variant run) against
                the dense one, prefill of (1, 2048) tokens and greedy decode of 128 tokens,
                interleaved, median of --speed-reps after a warm-up; tokens/s, speedups, peak
                memory.

Imports only torch, transformers and the standard library (plus spap from src/).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata as md
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "src") not in sys.path:  # works with or without PYTHONPATH=src
    sys.path.insert(0, str(ROOT / "src"))
if str(ROOT / "bench") not in sys.path:  # also when loaded from a file spec (the tests)
    sys.path.insert(0, str(ROOT / "bench"))
from gpu_results import T_START, Results, fmt, free, log, quiet_hub_bars, sync  # noqa: E402

CONFIG = ROOT / "bench" / "configs" / "qwen2.5-0.5b.json"
DEFAULT_METHODS = ("wanda-sp,spap-fast=spap:starts=obs;recovery=none,"
                   "spap-norec=spap:recovery=none,spap,obs,obs-ridge=obs:refit=ridge,fasp")
TINY_TIMING = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=256, vocab_size=1000,
                   num_attention_heads=4, num_key_value_heads=2)
CORRECTNESS_FAMILIES = ("llama", "qwen2", "opt")
CORRECTNESS_METHODS = ("spap", "obs", "wanda-sp")
HEAVY_OPTIONAL = ("datasets", "lm_eval", "matplotlib", "pandas", "scipy")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network: fail fast


# ---- results file ---------------------------------------------------------------------------


def guarded(record: dict[str, Any], key: str, fn: Callable[[], dict[str, Any]]) -> None:
    """A sub-check: its result, or its error, under record[key]."""
    try:
        record[key] = fn()
    except Exception as exc:
        record[key] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()}
        log(f"  {key} FAILED: {type(exc).__name__}: {exc}")


# ---- device helpers -------------------------------------------------------------------------
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    dev = next(model.parameters()).device
    return model(ids.to(dev), use_cache=False).logits.float()


def random_ids(n: int, seqlen: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


# ---- step 1: environment --------------------------------------------------------------------
def step_env(rec: dict[str, Any], device: torch.device) -> None:
    before = {m for m in HEAVY_OPTIONAL if m in sys.modules}
    import spap  # noqa: F401
    import spap.api  # noqa: F401
    import spap.compare  # noqa: F401
    import spap.eval.speed  # noqa: F401
    import spap.modelio.export  # noqa: F401

    pulled = sorted({m for m in HEAVY_OPTIONAL if m in sys.modules} - before)
    vers = {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda}
    for pkg in ("transformers", "accelerate", "safetensors", "numpy", "tqdm", "tokenizers"):
        try:
            vers[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            vers[pkg] = None
    rec["versions"] = vers
    rec["spap_from"] = str(Path(sys.modules["spap"].__file__).parent)
    rec["heavy_imports_pulled_by_spap"] = pulled
    rec["device"] = str(device)
    rec["cpu_count"] = os.cpu_count()
    rec["torch_threads"] = torch.get_num_threads()
    rec["cuda_available"] = torch.cuda.is_available()
    matmul = torch.backends.cuda.matmul
    rec["matmul_allow_tf32"] = matmul.allow_tf32
    rec["matmul_fp32_precision"] = getattr(matmul, "fp32_precision", None)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free_b, total_b = torch.cuda.mem_get_info(device)
        rec["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                      "total_gib": total_b / 2**30, "free_gib": free_b / 2**30,
                      "multiprocessors": props.multi_processor_count,
                      "device_count": torch.cuda.device_count()}
    rec["gram_half_path"] = check_gram(device)
    log(f"torch {vers['torch']} (cuda {vers['torch_cuda']}), transformers "
        f"{vers['transformers']}, device {device}"
        + (f" = {rec['gpu']['name']}, {rec['gpu']['total_gib']:.0f} GiB" if "gpu" in rec else "")
        + (f"; spap import pulled in {pulled}" if pulled else ""))


def check_gram(device: torch.device) -> dict[str, Any]:
    """spap.solvers.stats.gram_of on bfloat16 activations against a float64 reference: which
    path ran
    (half-precision inputs with float32 output, or the float32 upcast) and its error."""
    from spap.solvers.stats import gram_of

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(8192, 1024, generator=g).to(device, torch.bfloat16)
    ref = x.double().T @ x.double()
    out = gram_of(x)
    fast = True
    if device.type == "cuda":
        try:
            torch.mm(x.T, x, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            fast = False
    else:
        fast = False
    err = float((out.double() - ref).abs().max() / ref.abs().max())
    return {"half_inputs_float32_out": fast, "max_rel_error_vs_float64": err,
            "dtype": str(out.dtype)}


# ---- step 2: correctness --------------------------------------------------------------------
def tiny_config(family: str):
    """tests/conftest.py's tiny configs, MLP width 176."""
    from transformers import LlamaConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    if family == "opt":
        return OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=176,
                         num_attention_heads=4, max_position_embeddings=256,
                         word_embed_proj_dim=64, do_layer_norm_before=True,
                         activation_function="relu", enable_bias=True, pad_token_id=1)
    if family == "llama":
        return LlamaConfig(**common, intermediate_size=176, num_key_value_heads=2,
                           rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                           hidden_act="silu")
    if family == "qwen2":
        return Qwen2Config(**common, intermediate_size=176, num_key_value_heads=2,
                           tie_word_embeddings=True, rms_norm_eps=1e-6, hidden_act="silu")
    raise ValueError(family)


def tiny_model(family: str, device: torch.device, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    with torch.no_grad():  # random init leaves biases at zero; give them real values
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model.to(device).eval()


def widths_consistent(model, adapter) -> dict[str, Any]:
    width = adapter.width(model.config)
    shapes = set()
    for layer in adapter.layers(model):
        shapes.add(adapter.out_linear(layer).in_features)
        shapes.update(w.shape[0] for w in adapter.in_weights(layer).values())  # fused-safe
    return {"config_width": width, "weight_widths": sorted(shapes), "ok": shapes == {width}}


def tol(scale: float) -> float:
    return 1e-4 * max(1.0, scale)


def check_family(family: str, device: torch.device, sparsity: float) -> dict[str, Any]:
    """All correctness checks of one tiny model family, each guarded."""
    import spap
    from spap.driver.surgery import masked_dense
    from spap.models import get_adapter

    fam: dict[str, Any] = {}
    dense = tiny_model(family, device)
    vocab = dense.config.vocab_size
    calib = random_ids(8, 32, vocab, seed=1)
    ids = random_ids(2, 24, vocab, seed=2).to(device)
    ref_dense = logits(dense, ids)
    pruned_spap: dict[str, Any] = {}

    def cut(method: str) -> dict[str, Any]:
        model = copy.deepcopy(dense)
        sync(device)
        t0 = time.perf_counter()
        res = spap.prune(model, calib_ids=calib, sparsity=sparsity, method=method, device=device)
        sync(device)
        secs = time.perf_counter() - t0
        adapter = get_adapter(model.config)
        oracle = masked_dense(dense, model, adapter, [r.keep for r in res.layers])
        got, want = logits(model, ids), logits(oracle, ids)
        scale = float(want.abs().max())
        diff = float((got - want).abs().max())
        widths = widths_consistent(model, adapter)
        changed = float((got - ref_dense).abs().max())
        if method == "spap":
            pruned_spap["model"], pruned_spap["report"] = model, res.report
        return {"ok": diff <= tol(scale) and widths["ok"] and changed > 0,
                "max_abs_diff_vs_masked_dense": diff, "logit_scale": scale,
                "max_abs_change_vs_dense": changed, "widths": widths,
                "width_after": res.report["model"]["width_after"],
                "layer_error_mean": res.report["layer_error_mean"], "seconds": secs}

    def zero() -> dict[str, Any]:
        model = copy.deepcopy(dense)
        res = spap.prune(model, calib_ids=calib, sparsity=0.0, device=device)
        got = logits(model, ids)
        same_params = res.report["params_after"] == res.report["params_before"]
        identical = bool(torch.equal(got, ref_dense))
        return {"ok": identical and same_params, "identical": identical,
                "max_abs_diff": float((got - ref_dense).abs().max()),
                "params_unchanged": same_params}

    def reload() -> dict[str, Any]:
        from transformers import AutoModelForCausalLM

        if "model" not in pruned_spap:
            raise RuntimeError("no spap-pruned model to save (the spap check failed)")
        model, report = pruned_spap["model"], copy.deepcopy(pruned_spap["report"])
        with tempfile.TemporaryDirectory(prefix="spap-gpucheck-") as tmp:
            out = spap.save_pruned(model, None, Path(tmp) / "out", report,
                                   check_ids=random_ids(1, 16, vocab, seed=4))
            again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            again = again.to(device).eval()
            got, want = logits(again, ids), logits(model, ids)
            width = get_adapter(again.config).width(again.config)
        diff = float((got - want).abs().max())
        scale = float(want.abs().max())
        return {"ok": diff <= tol(scale), "max_abs_diff_reloaded": diff, "logit_scale": scale,
                "reloaded_width": width, "export_reload_check": report.get("reload_check")}

    for method in CORRECTNESS_METHODS:
        guarded(fam, f"prune_{method}", lambda method=method: cut(method))
    guarded(fam, "sparsity_0", zero)
    guarded(fam, "save_reload", reload)
    return fam


def step_correctness(rec: dict[str, Any], device: torch.device, sparsity: float) -> None:
    failures = []
    for family in CORRECTNESS_FAMILIES:
        guarded(rec, family, lambda family=family: check_family(family, device, sparsity))
        fam = rec[family]
        if "error" in fam:  # building the family's model failed
            failures.append(family)
            continue
        failures += [f"{family}/{key}" for key, r in fam.items() if not r.get("ok")]
        log(f"  {family}: " + ", ".join(
            f"{k} {'ok' if r.get('ok') else 'FAIL'}"
            + (f" ({r['max_abs_diff_vs_masked_dense']:.1e})"
               if "max_abs_diff_vs_masked_dense" in r else "")
            for k, r in fam.items()))
        free(device)
    rec["failures"] = failures
    rec["all_ok"] = not failures
    if failures:
        raise RuntimeError(f"correctness checks failed: {failures}")


# ---- step 3: timing -------------------------------------------------------------------------
def timing_config(tiny: bool, layers: int | None = None):
    from transformers import AutoConfig

    spec = json.loads(CONFIG.read_text())
    spec.pop("torch_dtype", None)
    spec.pop("dtype", None)
    model_type = spec.pop("model_type")
    if tiny:
        spec.update(TINY_TIMING)
    if layers is not None:
        spec["num_hidden_layers"] = layers
    return AutoConfig.for_model(model_type, **spec)


def build_model(config, dtype: torch.dtype, device: torch.device, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    try:
        with torch.device(device):  # initialise on the device: fast for 0.5B parameters
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:
        log(f"  building on {device} failed ({exc}); building on cpu and moving")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    return model.eval()


def step_timing(rec: dict[str, Any], state: dict[str, Any], args, device: torch.device,
                results: Results) -> None:
    from spap.api import prune
    from spap.compare import parse_variants

    variants = parse_variants(args.methods)
    variants.sort(key=lambda v: 0 if "wanda-sp" in (v.name, v.method) else 1)  # stable
    dtype = getattr(torch, args.dtype)
    config = timing_config(args.tiny, args.layers)
    free(device)
    reset_peak(device)
    t0 = time.perf_counter()
    dense = build_model(config, dtype, device, args.seed)
    sync(device)
    params = sum(p.numel() for p in dense.parameters())
    calib = random_ids(args.nsamples, args.seqlen, config.vocab_size, args.seed + 1)
    rec.update(
        config=config.to_dict(), dtype=args.dtype, params=params,
        build_seconds=time.perf_counter() - t0, sparsity=args.sparsity,
        calibration={"kind": "random token ids", "nsamples": args.nsamples,
                     "seqlen": args.seqlen, "tokens": calib.numel(), "seed": args.seed + 1},
        batch_size=args.batch_size, time_budget_s=args.time_budget,
        variants=[{"name": v.name, "method": v.method, "options": v.options} for v in variants],
        runs=[], skipped=[],
        dense_memory_gib=peak_gib(device),
    )
    log(f"  dense {config.model_type}: {params / 1e6:.1f}M params, {config.num_hidden_layers} "
        f"layers, width {config.intermediate_size}, {args.dtype}; calibration "
        f"{args.nsamples}x{args.seqlen} random ids")
    state["dense"] = dense
    for v in variants:
        elapsed = time.perf_counter() - T_START
        if elapsed > args.time_budget:
            rec["skipped"].append({"name": v.name, "reason": f"time budget {args.time_budget}s "
                                   f"exceeded ({elapsed:.0f}s elapsed)"})
            log(f"  {v.name}: skipped (budget {args.time_budget}s, {elapsed:.0f}s elapsed)")
            results.write()
            continue
        run: dict[str, Any] = {"name": v.name, "method": v.method, "options": v.options}
        rec["runs"].append(run)
        model = None
        try:
            free(device)
            reset_peak(device)
            model = copy.deepcopy(dense)
            sync(device)
            t1 = time.perf_counter()
            res = prune(model, calib_ids=calib, sparsity=args.sparsity, method=v.method,
                        method_options=v.options, device=device, batch_size=args.batch_size,
                        round_to=args.round_to, allow_unsaveable=True)
            sync(device)
            secs = time.perf_counter() - t1
            run.update(ok=True, seconds=secs, peak_memory_gib=peak_gib(device))
            run.update(run_details(res.report, secs))
            ls = run["layer_seconds"]
            log(f"  {v.name}: {secs:.2f}s (collect {ls.get('collect', 0):.2f}, solve "
                f"{ls.get('solve', 0):.2f}, replay {ls.get('replay', 0):.2f}), layer err "
                f"{fmt(run['layer_error_mean'], '.4g')}, width {run['width_after']}")
            if v.name == args.speed_variant or "pruned" not in state:
                state["pruned"], state["pruned_name"] = model, v.name
                model = None
        except Exception as exc:
            run.update(ok=False, error=f"{type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc())
            log(f"  {v.name} FAILED: {type(exc).__name__}: {exc}")
        finally:
            del model
            free(device)
        base = next((r for r in rec["runs"] if r.get("ok") and r["method"] == "wanda-sp"), None)
        for r in rec["runs"]:
            if base is not None and r.get("ok"):
                r["ratio_to_wanda_sp"] = r["seconds"] / base["seconds"]
                solve = base["layer_seconds"].get("solve", 0)
                r["solve_ratio_to_wanda_sp"] = (
                    r["layer_seconds"].get("solve", 0) / solve if solve > 0 else None)
        results.write()
    if not any(r.get("ok") for r in rec["runs"]):
        raise RuntimeError("no pruning run succeeded")


def run_details(report: dict[str, Any], secs: float) -> dict[str, Any]:
    """Per-run figures from a prune report, tolerant of fields that are missing."""
    layers = report.get("layers", [])
    parts: dict[str, float] = {}
    for layer in layers:
        for key, value in layer.get("seconds", {}).items():
            parts[key] = parts.get(key, 0.0) + value
    model = report.get("model", {})
    return {
        "layer_seconds": parts,  # collect / solve / replay summed over layers
        "layer_seconds_total": sum(parts.values()),
        "layer0_capture_seconds": secs - sum(parts.values()),
        "solve_seconds_per_layer": [layer.get("seconds", {}).get("solve") for layer in layers],
        "layer_error_mean": report.get("layer_error_mean"),
        "width_after": model.get("width_after"),
        "sparsity_achieved": report.get("sparsity_achieved"),
        "params_removed_frac": report.get("params_removed_frac"),
        "saveable": report.get("saveable"),
        "options_full": report.get("options"),
    }


# ---- step 4: speed --------------------------------------------------------------------------
def step_speed(rec: dict[str, Any], state: dict[str, Any], args, device: torch.device) -> None:
    from spap.eval.speed import bench, format_table

    if "dense" not in state or "pruned" not in state:
        raise RuntimeError("no dense and pruned model from the timing step")
    pruned, dense = state["pruned"], state["dense"]
    rec["pruned_variant"] = state["pruned_name"]
    prompt, gen = (64, 16) if args.tiny else (args.prompt_len, args.gen_tokens)
    free(device)
    batches = tuple(int(b) for b in str(args.speed_batches).split(","))
    result = bench(pruned, dense, batch_sizes=batches, prompt_lens=(prompt,), gen_tokens=gen,
                   warmup=1, reps=args.speed_reps, device=device, cpu_memory=False)
    rec["bench"] = result
    s = result["settings"][0]
    tps = s["decode"]["tokens_per_s"]
    mem = result["memory"]
    rec["summary"] = {
        "batch": 1, "prompt_len": prompt, "gen_tokens": gen,
        "prefill_ms": {"pruned": s["prefill"]["pruned_s"] * 1e3,
                       "base": s["prefill"]["base_s"] * 1e3},
        "prefill_tokens_per_s": {k: prompt / s["prefill"][f"{k}_s"] for k in ("pruned", "base")},
        "prefill_speedup": s["prefill"]["speedup"],
        "prefill_ideal_speedup": s["prefill"]["ideal_speedup"],
        "decode_tokens_per_s": tps,
        "decode_speedup": s["decode"]["speedup"],
        "decode_ideal_speedup": s["decode"]["ideal_speedup"],
        "weight_bytes_ratio": result["weight_bytes"]["ratio"],
        "peak_memory_gib": {k: mem[k]["peak_bytes"] / 2**30 for k in ("pruned", "base")
                            if isinstance(mem.get(k), dict) and "peak_bytes" in mem[k]},
    }
    print(format_table(result), flush=True)


# ---- summary --------------------------------------------------------------------------------
def summary(data: dict[str, Any]) -> str:
    lines = ["", "=" * 78, "gpu_check summary", "=" * 78]
    for name, st in data["steps"].items():
        lines.append(f"step {name:<12} {'ok' if st['ok'] else 'FAILED':<7} "
                     f"{st.get('seconds', 0):7.1f}s  {st.get('error', '')}")
    env = data.get("env", {})
    if env:
        gpu = env.get("gpu", {})
        lines.append(f"torch {env.get('versions', {}).get('torch')}  transformers "
                     f"{env.get('versions', {}).get('transformers')}  device {env.get('device')}"
                     + (f"  {gpu.get('name')} {gpu.get('total_gib', 0):.0f} GiB" if gpu else ""))
    corr = data.get("correctness", {})
    rows = []
    for fam in CORRECTNESS_FAMILIES:
        checks = corr.get(fam, {})
        if "error" in checks:  # the whole family failed
            rows.append((fam, "(all)", checks))
        else:
            rows += [(fam, key, r) for key, r in checks.items()]
    if rows:
        lines += ["", f"{'family':<7} {'check':<15} {'ok':<5} max abs diff"]
        for fam, key, r in rows:
            diff = next((r[k] for k in ("max_abs_diff_vs_masked_dense", "max_abs_diff_reloaded",
                                        "max_abs_diff") if k in r), None)
            lines.append(f"{fam:<7} {key:<15} {'ok' if r.get('ok') else 'FAIL':<5} "
                         f"{fmt(diff, '.2e')}" + (f"  {r['error']}" if "error" in r else ""))
    tim = data.get("timing", {})
    if tim.get("runs") or tim.get("skipped"):
        lines += ["", f"timing: {tim.get('params', 0) / 1e6:.0f}M params, "
                  f"{tim.get('calibration', {}).get('nsamples')}x"
                  f"{tim.get('calibration', {}).get('seqlen')} calibration, sparsity "
                  f"{tim.get('sparsity')}",
                  f"{'variant':<10} {'total s':>8} {'collect':>8} {'solve':>8} {'replay':>8} "
                  f"{'x wanda':>8} {'layer err':>9} {'peak GiB':>8}"]
        for r in tim.get("runs", []):
            if not r.get("ok"):
                lines.append(f"{r['name']:<10} FAILED {r.get('error', '')}")
                continue
            ls = r["layer_seconds"]
            lines.append(f"{r['name']:<10} {r['seconds']:8.2f} {fmt(ls.get('collect'), '8.2f')} "
                         f"{fmt(ls.get('solve'), '8.2f')} {fmt(ls.get('replay'), '8.2f')} "
                         f"{fmt(r.get('ratio_to_wanda_sp'), '8.2f')} "
                         f"{fmt(r['layer_error_mean'], '9.4f')} "
                         f"{fmt(r['peak_memory_gib'], '8.2f')}")
        for s in tim.get("skipped", []):
            lines.append(f"{s['name']:<10} skipped: {s['reason']}")
    sp = data.get("speed", {}).get("summary")
    if sp:
        lines += ["", f"speed ({data['speed']['pruned_variant']} pruned vs dense, batch 1, "
                  f"prompt {sp['prompt_len']}, {sp['gen_tokens']} new tokens):",
                  f"  prefill ms   pruned {sp['prefill_ms']['pruned']:.2f}  base "
                  f"{sp['prefill_ms']['base']:.2f}  speedup {fmt(sp['prefill_speedup'], '.3f')} "
                  f"(ideal {sp['prefill_ideal_speedup']:.3f})",
                  f"  decode tok/s pruned {fmt(sp['decode_tokens_per_s']['pruned'], '.1f')}  "
                  f"base {fmt(sp['decode_tokens_per_s']['base'], '.1f')}  speedup "
                  f"{fmt(sp['decode_speedup'], '.3f')} (ideal {sp['decode_ideal_speedup']:.3f})"]
        if sp["peak_memory_gib"]:
            lines.append("  peak GiB     " + "  ".join(
                f"{k} {v:.2f}" for k, v in sp["peak_memory_gib"].items()))
    lines.append(f"\ntotal {data['elapsed_s']:.1f}s")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--tiny", action="store_true",
                   help="tiny timing model and short sequences (CPU test of this script)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="variants as in spap compare: method or name=method:key=val;key=val")
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--nsamples", type=int, default=None, help="default 128 (tiny: 4)")
    p.add_argument("--seqlen", type=int, default=None, help="default 2048 (tiny: 64)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration windows per forward")
    p.add_argument("--dtype", default="bfloat16", help="timing model dtype")
    p.add_argument("--layers", type=int, default=None,
                   help="override the timing model's number of layers (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=420.0,
                   help="seconds from the start after which no new pruning run starts")
    p.add_argument("--speed-variant", default="spap", help="whose pruned model step 4 times")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--speed-reps", type=int, default=3)
    p.add_argument("--speed-batches", default="1", help="comma-separated batch sizes (1)")
    p.add_argument("--round-to", type=int, default=1,
                   help="round the kept width to a multiple (GPU kernels like 64 or 128)")
    p.add_argument("--skip", default="", help="comma-separated steps to skip: "
                   "correctness,timing,speed")
    args = p.parse_args(argv)
    if args.nsamples is None:
        args.nsamples = 4 if args.tiny else 128
    if args.seqlen is None:
        args.seqlen = 64 if args.tiny else 2048
    if args.tiny:
        args.speed_reps = min(args.speed_reps, 3)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = Results(Path(args.out), "gpu_check.json", args)
    quiet_hub_bars()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    state: dict[str, Any] = {}
    log(f"gpu_check: device {device}, out {results.path}")
    results.step("env", lambda r: step_env(r, device))
    if "correctness" not in skip:
        results.step("correctness", lambda r: step_correctness(r, device, args.sparsity))
    if "timing" not in skip:
        results.step("timing", lambda r: step_timing(r, state, args, device, results))
    if "speed" not in skip:
        results.step("speed", lambda r: step_speed(r, state, args, device))
    state.clear()
    return results.finish(summary)


if __name__ == "__main__":
    sys.exit(main())
