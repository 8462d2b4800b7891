"""The 8B figures: pruning time, peak memory and pruned speed at Llama-3.1-8B's real shape.

Random bfloat16 weights of the Llama-3.1-8B architecture (bench/configs/llama-3.1-8b.json:
hidden 4096, MLP width 14336, 32 layers, 32 heads, 8 KV heads, vocab 128256, llama3 rope),
random calibration token ids (128 x 2048 by default). Nothing is downloaded. Run on the GPU
machine from the repository root (`make gpu-8b`), in one call of under 8 minutes on an H200:

    PYTHONPATH=src python3 bench/gpu_8b.py --out $OUT

and here, on CPU with a tiny shape, to test the script itself (seconds):

    OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_8b.py --device cpu --tiny --out /tmp/g8

Steps (`<out>/gpu_8b.json` is rewritten after each; a failed step is recorded and the next
runs):

1. build    the dense model, initialised on the device (fast) and moved to host memory, as
            `spap prune` holds it: every run moves one layer at a time to the device, so the
            peak device memory measured is the one a user's run has.
2. prune    for each variant (wanda-sp, fast SPAP = spap:iters=0, default SPAP; see
            `default_variants`): a deep copy
            of the dense model pruned at --sparsity with --round-to 128 on the device: wall
            seconds, layer-0 capture, summed per-layer collect / solve / replay, peak device
            memory (torch.cuda.max_memory_allocated over the prune call) and peak host RSS,
            where the activations lived. With --layers N (default 8 on a GPU: default SPAP
            at width 14336 is the slow one) only the first N of the 32 layers are pruned and
            the time for all layers is EXTRAPOLATED as capture + (prune - capture) * 32 / N;
            the output says so next to every such figure. The peak memory needs no
            extrapolation: nothing accumulates from layer to layer.
            --offload-check adds one wanda-sp run with the activations in pinned host memory
            (offload="cpu") to show what streaming saves on the device and costs in time.
   Every run records `spap plan`'s prediction (spap.plan, in the report's memory.plan)
            beside its measured peaks: predicted peak device and host memory, their ratios
            measured / predicted, and the plan's time for all layers on this GPU's entry.
3. torchrun the default SPAP variant once more under `python -m torch.distributed.run` on
            every GPU of the machine (--ranks N; on a CPU only when asked, on gloo): each
            rank builds the same random model, prunes --torchrun-layers layers on its share
            of the windows; rank 0 writes <out>/gpu_8b-torchrun.json with the wall seconds,
            every rank's peak memory and the kept width, and the parent records them beside
            the one-process run of the same variant (time ratio, same width). Skipped with
            one device.
4. placement  the dense model's loss on two random windows, whole on the device and spread
            by spap.eval.placement over a third of its size on the GPU and host memory (what
            `spap eval` and `--eval` do with a model larger than the GPU): the same loss, the
            model unchanged afterwards.
5. speed    spap.eval.speed.bench: the dense model against one whose every MLP is cut to the
            width the pruning gives at --round-to (the last variant's model if it pruned all
            layers, otherwise the dense model cut by the magnitude method: speed does not
            depend on which channels are kept), prefill of --prompt-len tokens and greedy
            decode of --gen-tokens at batch 1, 8 and 32, interleaved, median of --reps;
            measured speedups beside the ideal ones (FLOP ratio for prefill, weight-byte ratio
            for decode).

Imports only torch, transformers, psutil and the standard library (plus spap from src/).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # works with or without PYTHONPATH=src
    sys.path.insert(0, str(ROOT / "src"))
if str(ROOT / "bench") not in sys.path:  # also when loaded from a file spec (the tests)
    sys.path.insert(0, str(ROOT / "bench"))
from gpu_results import Results, fmt, free, log, quiet_hub_bars, sync  # noqa: E402

CONFIG = ROOT / "bench" / "configs" / "llama-3.1-8b.json"


def default_variants() -> str:
    """wanda-sp, fast SPAP (no penalty iterations, iters=0; and no recovery where the solver
    has one, so that "fast" stays fast whatever the defaults) and default SPAP."""
    import dataclasses

    from spap.solvers import solver_class

    fields = {f.name: f.default for f in dataclasses.fields(solver_class("spap"))}
    fast = "iters=0" + (";recovery=none" if "recovery" in fields else "")
    return f"wanda-sp,spap-fast=spap:{fast},spap"


TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=256, vocab_size=512,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1,
            eos_token_id=2)
GIB = 2**30

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _gib(x: float | None) -> float | None:
    return None if x is None else x / GIB


def model_config(tiny: bool):
    from transformers import AutoConfig

    spec = json.loads(CONFIG.read_text())
    for key in ("torch_dtype", "dtype", "architectures"):
        spec.pop(key, None)
    model_type = spec.pop("model_type")
    if tiny:
        spec.update(TINY)
    return AutoConfig.for_model(model_type, **spec)


def build(rec: dict[str, Any], state: dict[str, Any], args, device: torch.device) -> None:
    from transformers import AutoModelForCausalLM

    from spap.eval.speed import weight_bytes

    config = model_config(args.tiny)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.device(device):  # random init on the device: seconds, not minutes, for 8B
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sync(device)
    t1 = time.perf_counter()
    model = model.to("cpu").eval()
    free(device)
    rec.update(config=config.to_dict(), dtype=args.dtype,
               params=sum(p.numel() for p in model.parameters()),
               weight_gib=weight_bytes(model) / GIB,
               init_seconds=t1 - t0, to_host_seconds=time.perf_counter() - t1)
    state["dense"], state["config"] = model, config
    log(f"  {rec['params'] / 1e9:.2f}B params, {config.num_hidden_layers} layers, width "
        f"{config.intermediate_size}, {args.dtype}, {rec['weight_gib']:.1f} GiB; init "
        f"{rec['init_seconds']:.1f}s on {device}")


def prune_runs(rec: dict[str, Any], state: dict[str, Any], args, device: torch.device,
               results: Results) -> None:
    import spap
    from spap.compare import parse_variants

    dense, config = state["dense"], state["config"]
    n_layers = config.num_hidden_layers
    todo = n_layers if args.layers is None else min(args.layers, n_layers)
    scale = n_layers / todo
    g = torch.Generator().manual_seed(args.seed + 1)
    calib = torch.randint(0, config.vocab_size, (args.nsamples, args.seqlen), generator=g)
    variants = [(v.name, v.method, v.options, "auto") for v in parse_variants(args.methods)]
    if args.offload_check:
        variants.append(("wanda-sp offload=cpu", "wanda-sp", {}, "cpu"))
    rec.update(layers_total=n_layers, layers_pruned=todo, extrapolated=todo < n_layers,
               calibration={"kind": "random token ids", "nsamples": args.nsamples,
                            "seqlen": args.seqlen, "tokens": calib.numel()},
               sparsity=args.sparsity, round_to=args.round_to, batch_size=args.batch_size,
               runs=[], skipped=[])
    if todo < n_layers:
        log(f"  pruning {todo} of {n_layers} layers; times for all layers are EXTRAPOLATED "
            f"(x{scale:.1f})")
    for name, method, options, offload in variants:
        elapsed = time.perf_counter() - _STARTED[0]
        if elapsed > args.time_budget:
            rec["skipped"].append({"name": name, "reason": f"time budget {args.time_budget}s "
                                   f"exceeded ({elapsed:.0f}s elapsed)"})
            log(f"  {name}: skipped (budget)")
            continue
        run: dict[str, Any] = {"name": name, "method": method, "options": options,
                               "offload": offload}
        rec["runs"].append(run)
        model = None
        try:
            free(device)
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            res = spap.prune(model, calib_ids=calib, sparsity=args.sparsity, method=method,
                             method_options=options, device=device, round_to=args.round_to,
                             batch_size=args.batch_size, layer_limit=todo, offload=offload,
                             allow_unsaveable=True)
            sync(device)
            secs = time.perf_counter() - t0
            rep = res.report
            capture = rep["timings"].get("capture_s") or 0.0
            parts: dict[str, float] = {}
            for layer in rep["layers"]:
                for k, v in layer["seconds"].items():
                    parts[k] = parts.get(k, 0.0) + v
            mem = rep["memory"]
            run["plan"] = _plan_vs_measured(mem, scale)
            run.update(
                ok=True, seconds=secs, capture_seconds=capture, layer_seconds=parts,
                seconds_all_layers=capture + (secs - capture) * scale,
                seconds_all_layers_is_extrapolated=todo < n_layers,
                peak_device_gib=_gib(mem["device_peak_bytes"]),
                peak_device_reserved_gib=_gib(mem["device_peak_reserved_bytes"]),
                peak_host_rss_gib=_gib(mem["host_rss_peak_bytes"]),
                activations=mem["activations"],
                width_after=rep["layers"][0]["kept"] if rep["layers"] else None,
                layer_error_mean=rep["layer_error_mean"], options_full=rep["options"],
            )
            log(f"  {name}: {secs:.1f}s for {todo} layers (collect "
                f"{parts.get('collect', 0):.1f}, solve {parts.get('solve', 0):.1f}, replay "
                f"{parts.get('replay', 0):.1f}); all {n_layers} layers "
                f"{run['seconds_all_layers']:.1f}s"
                f"{' (EXTRAPOLATED)' if todo < n_layers else ''}; peak device "
                f"{fmt(run['peak_device_gib'], '.2f')} GiB, host RSS "
                f"{run['peak_host_rss_gib']:.1f} GiB; activations on "
                f"{mem['activations']['where']}")
            if todo == n_layers:
                state["pruned"], state["pruned_name"] = model, name
                model = None
        except Exception as exc:
            run.update(ok=False, error=f"{type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc())
            log(f"  {name} FAILED: {type(exc).__name__}: {exc}")
        finally:
            del model
            free(device)
        base = next((r for r in rec["runs"] if r.get("ok") and r["name"] == "wanda-sp"), None)
        for r in rec["runs"]:
            if base is not None and r.get("ok"):
                r["ratio_to_wanda_sp"] = r["seconds_all_layers"] / base["seconds_all_layers"]
        results.write()
    state["prune_runs"], state["prune_layers"] = rec["runs"], todo
    if not any(r.get("ok") for r in rec["runs"]):
        raise RuntimeError("no pruning run succeeded")


def _plan_vs_measured(mem: dict[str, Any], scale: float) -> dict[str, Any] | None:
    """`spap plan`'s prediction for the run (the report's memory.plan) beside its measured
    peaks: GiB, and measured / predicted."""
    plan = mem.get("plan")
    if not plan:
        return None
    dev, host = mem.get("device_peak_bytes"), mem.get("host_rss_peak_bytes")
    return {
        "hardware": plan["hardware"], "peak_step": plan["device_peak_step"],
        "device_peak_gib": plan["device_peak_bytes"] / GIB,
        "host_peak_gib": plan["host_peak_bytes"] / GIB,
        "device_ratio": dev / plan["device_peak_bytes"] if dev else None,
        "host_ratio": host / plan["host_peak_bytes"] if host else None,
        "seconds_all_layers": plan["seconds"],
    }


def torchrun(rec: dict[str, Any], state: dict[str, Any], args, device: torch.device) -> None:
    """The default SPAP variant under torchrun on every GPU (step 3 of the docstring)."""
    import subprocess

    n = args.ranks if args.ranks is not None else (
        torch.cuda.device_count() if device.type == "cuda" else 0)
    rec["ranks"] = n
    if n < 2:
        rec["skipped"] = f"{n} device(s): nothing to split"
        log(f"  skipped: {rec['skipped']}")
        return
    from spap.data import heldout_windows

    # every rank needs a batch of fit windows of its own
    fit = args.nsamples - heldout_windows(args.nsamples)
    batch = max(1, min(args.batch_size, fit // n))
    rec["batch_size"] = batch
    out = Path(args.out)
    target = out / "gpu_8b-torchrun.json"
    target.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(n), str(Path(__file__).resolve()), "--worker", "--out", str(out),
            "--device", device.type, "--layers", str(args.torchrun_layers),
            "--sparsity", str(args.sparsity), "--round-to", str(args.round_to),
            "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
            "--batch-size", str(batch), "--dtype", args.dtype, "--seed",
            str(args.seed), *(["--tiny"] if args.tiny else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.torchrun_timeout)
    rec["launcher_seconds"] = time.perf_counter() - t0
    if proc.returncode != 0 or not target.exists():
        errors = [ln for ln in proc.stderr.splitlines() if "Error:" in ln]
        raise RuntimeError(f"torchrun exited {proc.returncode}: "
                           f"{errors[0] if errors else proc.stderr[-2000:]}")
    rec.update(json.loads(target.read_text()))
    peaks = [g for g in rec["peak_device_gib"] if g is not None]
    log(f"  {n} ranks: {rec['seconds']:.1f}s for {rec['layers_pruned']} layers, width "
        f"{rec['width_after']}, peak device {fmt(max(peaks) if peaks else None, '.2f')} GiB")
    one = next((r for r in state.get("prune_runs", []) if r.get("ok") and r["name"] == "spap"),
               None)
    if one is not None and one["layer_seconds"]:
        # the one-process run's time for the same layers: capture + per-layer share
        per_layer = (one["seconds"] - one["capture_seconds"]) / max(state["prune_layers"], 1)
        single = one["capture_seconds"] + per_layer * rec["layers_pruned"]
        rec.update(one_process_seconds=single, ratio_to_one_process=rec["seconds"] / single,
                   same_width=rec["width_after"] == one["width_after"])


def worker(args) -> int:
    """One rank of the torchrun step: build, prune, report (rank 0 writes)."""
    import torch.distributed as dist

    import spap
    from spap.distributed import init_from_env

    shard, dev = init_from_env(args.device)
    device = torch.device(dev)
    config = model_config(args.tiny)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM

    with torch.device(device):  # every rank the same weights: the same seed
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model = model.to("cpu").eval()
    free(device)
    g = torch.Generator().manual_seed(args.seed + 1)
    calib = torch.randint(0, config.vocab_size, (args.nsamples, args.seqlen), generator=g)
    todo = min(args.layers or config.num_hidden_layers, config.num_hidden_layers)
    shard.barrier()
    t0 = time.perf_counter()
    res = spap.prune(model, calib_ids=calib, sparsity=args.sparsity, method="spap",
                     device=device, round_to=args.round_to, batch_size=args.batch_size,
                     layer_limit=todo, allow_unsaveable=True)
    sync(device)
    secs = time.perf_counter() - t0
    mem = res.report["memory"]
    mine = torch.tensor([mem["device_peak_bytes"] or -1, mem["host_rss_peak_bytes"], secs],
                        dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(shard.world_size)]
    dist.all_gather(every, mine)
    if shard.is_main:
        rows = [t.tolist() for t in every]
        out = {"world_size": shard.world_size, "layers_pruned": todo,
               "seconds": max(r[2] for r in rows),
               "peak_device_gib": [_gib(r[0]) if r[0] >= 0 else None for r in rows],
               "peak_host_rss_gib": [_gib(r[1]) for r in rows],
               "width_after": res.report["layers"][0]["kept"],
               "plan": _plan_vs_measured(mem, 1.0)}
        from spap.files import write_json_atomic

        write_json_atomic(Path(args.out) / "gpu_8b-torchrun.json", out)
    return 0


def placement(rec: dict[str, Any], state: dict[str, Any], args, device: torch.device) -> None:
    """The dense model evaluated whole on the device and spread by spap.eval.placement with a
    device budget of a third of its weights (the rest in host memory, accelerate's CPU
    offload), as a model larger than the GPU is: the same loss, the model unchanged after."""
    from spap.eval.placement import model_bytes, placed
    from spap.eval.ppl import nll_of_windows

    model = state["dense"]
    ids = torch.randint(0, model.config.vocab_size, (2, 256),
                        generator=torch.Generator().manual_seed(3))
    def checksum() -> float:
        return sum(float(p.detach().float().sum()) for p in model.parameters())

    check = checksum()
    out = {}
    for name, budget in (("whole", None), ("spread", {
            device.index or 0: model_bytes(model) // 3, "cpu": 4 * model_bytes(model)})):
        t0 = time.perf_counter()
        with placed(model, device, max_memory=budget) as where:
            nll, count = nll_of_windows(model, ids, batch_size=1)
        sync(device)
        out[name] = {"nll_per_token": nll / count, "seconds": time.perf_counter() - t0,
                     "placement": where}
        log(f"  {name}: nll/token {nll / count:.5f}, {out[name]['seconds']:.1f} s, {where}")
    rec.update(out)
    rec["same_loss"] = abs(out["whole"]["nll_per_token"] - out["spread"]["nll_per_token"]) < 1e-2
    rec["model_unchanged"] = (checksum() == check
                              and all(p.device.type == "cpu" for p in model.parameters()))


def speed(rec: dict[str, Any], state: dict[str, Any], args, device: torch.device) -> None:
    import spap
    from spap.eval.speed import bench, format_table

    dense = state["dense"]
    if "pruned" in state:
        pruned, how = state.pop("pruned"), f"the {state['pruned_name']} run's model"
    else:
        # the shapes are what matter for speed: cut every MLP to the pruned width (magnitude
        # needs no statistics worth the name: one short window)
        pruned = copy.deepcopy(dense)
        spap.prune(pruned, calib_ids=torch.zeros(1, 8, dtype=torch.long), sparsity=args.sparsity,
                   method="magnitude", round_to=args.round_to, device=device)
        how = "the dense model's MLPs cut by magnitude to the same width"
    rec["pruned_model"] = how
    rec["width"] = {"dense": dense.config.intermediate_size,
                    "pruned": pruned.config.intermediate_size}
    log(f"  pruned model: {how}, width {rec['width']['pruned']}")
    free(device)
    batches = tuple(int(b) for b in args.speed_batches.split(","))
    result = bench(pruned, dense, batch_sizes=batches, prompt_lens=(args.prompt_len,),
                   gen_tokens=args.gen_tokens, warmup=1, reps=args.reps, device=device,
                   cpu_memory=False)
    rec["bench"] = result
    rec["summary"] = [
        {"batch": s["batch"], "prompt_len": s["prompt_len"], "gen_tokens": s["gen_tokens"],
         "prefill_ms": {"pruned": s["prefill"]["pruned_s"] * 1e3,
                        "dense": s["prefill"]["base_s"] * 1e3},
         "prefill_speedup": s["prefill"]["speedup"],
         "prefill_ideal_flop_ratio": s["prefill"]["ideal_speedup"],
         "decode_tokens_per_s": {"pruned": s["decode"]["tokens_per_s"]["pruned"],
                                 "dense": s["decode"]["tokens_per_s"]["base"]},
         "decode_speedup": s["decode"]["speedup"],
         "decode_ideal_byte_ratio": s["decode"]["ideal_speedup"],
         "decode_ideal_byte_ratio_with_kv": s["decode"]["ideal_speedup_with_kv"],
         "decode_ideal_flop_ratio": s["decode"]["ideal_speedup_flops"]}
        for s in result["settings"]
    ]
    print(format_table(result), flush=True)
    state["dense"] = None
    del pruned


def summary(data: dict[str, Any]) -> str:
    lines = ["", "=" * 78, "gpu_8b summary", "=" * 78]
    for name, st in data["steps"].items():
        lines.append(f"step {name:<7} {'ok' if st['ok'] else 'FAILED':<7} "
                     f"{st.get('seconds', 0):7.1f}s  {st.get('error', '')}")
    b = data.get("build", {})
    if b:
        lines.append(f"model: {b.get('params', 0) / 1e9:.2f}B params, {b.get('dtype')}, random "
                     "weights of the Llama-3.1-8B configuration")
    p = data.get("prune", {})
    if p.get("runs"):
        ext = p.get("extrapolated")
        lines += ["", f"pruning at {p['sparsity']} (round_to {p['round_to']}), "
                  f"{p['calibration']['nsamples']}x{p['calibration']['seqlen']} random ids, "
                  f"{p['layers_pruned']} of {p['layers_total']} layers pruned"
                  + (" -- 'all layers' times are EXTRAPOLATED" if ext else ""),
                  f"{'variant':<20} {'s measured':>10} {'s all layers':>12} {'solve s':>8} "
                  f"{'x wanda':>7} {'peak GPU GiB':>12} {'host GiB':>8} {'acts on':>12}"]
        for r in p["runs"]:
            if not r.get("ok"):
                lines.append(f"{r['name']:<20} FAILED {r.get('error', '')}")
                continue
            lines.append(
                f"{r['name']:<20} {r['seconds']:10.1f} {r['seconds_all_layers']:11.1f}"
                f"{'*' if ext else ' '} {r['layer_seconds'].get('solve', 0):8.1f} "
                f"{fmt(r.get('ratio_to_wanda_sp'), '7.2f')} {fmt(r['peak_device_gib'], '12.2f')} "
                f"{r['peak_host_rss_gib']:8.1f} {r['activations']['where']:>12}")
        for s in p.get("skipped", []):
            lines.append(f"{s['name']:<20} skipped: {s['reason']}")
        lines += ["", "spap plan against the measured peaks (GiB; measured / predicted):",
                  f"{'variant':<20} {'plan GPU':>8} {'ratio':>6} {'plan host':>9} {'ratio':>6} "
                  f"{'plan s all layers':>17}"]
        for r in p["runs"]:
            pl = r.get("plan")
            if r.get("ok") and pl:
                lines.append(f"{r['name']:<20} {pl['device_peak_gib']:8.2f} "
                             f"{fmt(pl['device_ratio'], '6.2f')} {pl['host_peak_gib']:9.2f} "
                             f"{fmt(pl['host_ratio'], '6.2f')} {pl['seconds_all_layers']:17.0f}")
        if ext:
            lines.append("* extrapolated: capture + (measured - capture) x layers_total / "
                         "layers_pruned")
    tr = data.get("torchrun", {})
    if tr.get("seconds") is not None:
        lines += ["", f"torchrun on {tr['world_size']} ranks: {tr['seconds']:.1f}s for "
                  f"{tr['layers_pruned']} layers, width {tr['width_after']}"
                  + (f"; {tr['ratio_to_one_process']:.2f}x the one-process time, same width: "
                     f"{tr['same_width']}" if "ratio_to_one_process" in tr else "")]
    elif tr.get("skipped"):
        lines += ["", f"torchrun: skipped ({tr['skipped']})"]
    sp = data.get("speed", {})
    if sp.get("summary"):
        lines += ["", f"speed, pruned (width {sp['width']['pruned']}, {sp['pruned_model']}) "
                  f"vs dense (width {sp['width']['dense']}):",
                  f"{'batch':>5} {'prompt':>6} | {'prefill x':>9} {'ideal':>6} | "
                  f"{'decode x':>8} {'ideal':>6} | {'decode tok/s pruned':>19} {'dense':>8}"]
        for s in sp["summary"]:
            tps = s["decode_tokens_per_s"]
            lines.append(
                f"{s['batch']:>5} {s['prompt_len']:>6} | {fmt(s['prefill_speedup'], '9.3f')} "
                f"{s['prefill_ideal_flop_ratio']:6.3f} | {fmt(s['decode_speedup'], '8.3f')} "
                f"{s['decode_ideal_byte_ratio']:6.3f} | {fmt(tps['pruned'], '19.1f')} "
                f"{fmt(tps['dense'], '8.1f')}")
        lines.append("ideal: prefill = FLOP ratio, decode = weight-byte ratio "
                     "(spap.eval.speed.count_flops)")
    lines.append(f"\ntotal {data['elapsed_s']:.1f}s")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_8b.json")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--tiny", action="store_true",
                   help="tiny shape and sizes (a CPU test of this script)")
    p.add_argument("--methods", default=None,
                   help="variants as in spap compare (default: wanda-sp, "
                        "spap-fast=spap:iters=0 (and recovery=none where that option exists), "
                        "spap)")
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--round-to", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=None, help="default 128 (tiny: 4)")
    p.add_argument("--seqlen", type=int, default=None, help="default 2048 (tiny: 32)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration windows per forward")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layers", type=int, default=None,
                   help="prune only the first N layers and extrapolate the time to all "
                        "(default 8 on a GPU, all with --tiny); 0 means all")
    p.add_argument("--offload-check", action="store_true",
                   help="also time wanda-sp with the activations in pinned host memory")
    p.add_argument("--prompt-len", type=int, default=None, help="default 1024 (tiny: 16)")
    p.add_argument("--gen-tokens", type=int, default=None, help="default 64 (tiny: 4)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--speed-batches", default=None, help="default 1,8,32 (tiny: 1,2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=240.0,
                   help="seconds from the start after which no new pruning run starts")
    p.add_argument("--skip", default="",
                   help="comma-separated steps to skip: prune,torchrun,speed")
    p.add_argument("--ranks", type=int, default=None,
                   help="processes of the torchrun step (default: every GPU; 0 on a CPU)")
    p.add_argument("--torchrun-layers", type=int, default=None,
                   help="layers the torchrun step prunes (default 2; tiny: all)")
    p.add_argument("--torchrun-timeout", type=float, default=150.0,
                   help="seconds the torchrun step may take (its launch included)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    big = not args.tiny
    args.methods = args.methods or default_variants()
    args.nsamples = args.nsamples or (128 if big else 4)
    args.seqlen = args.seqlen or (2048 if big else 32)
    args.prompt_len = args.prompt_len or (1024 if big else 16)
    args.gen_tokens = args.gen_tokens or (64 if big else 4)
    args.speed_batches = args.speed_batches or ("1,8,32" if big else "1,2")
    if args.torchrun_layers is None:
        args.torchrun_layers = 2 if big else 0
    if args.tiny:
        args.reps = min(args.reps, 2)
        if args.round_to > TINY["intermediate_size"] // 4:
            args.round_to = 16
    return args


#: when this run's main() began (gpu_results.T_START is set when that module is first
#: imported, which in one process running several calls is long before)
_STARTED = [0.0]


def main(argv=None) -> int:
    _STARTED[0] = time.perf_counter()
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.layers is None:
        args.layers = 8 if device.type == "cuda" and not args.tiny else 0
    if args.layers == 0:
        args.layers = None
    quiet_hub_bars()
    results = Results(Path(args.out), "gpu_8b.json", args)
    results.data["device"] = str(device)
    if device.type == "cuda":
        results.data["gpu"] = torch.cuda.get_device_name(device)
    results.data["torch"] = torch.__version__
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    state: dict[str, Any] = {}
    log(f"gpu_8b: device {device}, out {results.path}")
    results.step("build", lambda r: build(r, state, args, device))
    if "dense" in state:
        if "prune" not in skip:
            results.step("prune", lambda r: prune_runs(r, state, args, device, results))
        if "torchrun" not in skip:
            results.step("torchrun", lambda r: torchrun(r, state, args, device))
        if "placement" not in skip:
            results.step("placement", lambda r: placement(r, state, args, device))
        if "speed" not in skip:
            results.step("speed", lambda r: speed(r, state, args, device))
    state.clear()
    return results.finish(summary)


if __name__ == "__main__":
    sys.exit(main())
