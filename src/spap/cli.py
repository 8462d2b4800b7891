"""Command line: `spap prune`, `spap plan`, `spap eval`, `spap compare`, `spap bench`,
`spap options`.

Every user error is a `SpapError`, printed as one line with exit status 2; the output folder
is only created by the final rename, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import SpapError

log = logging.getLogger("spap")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--dtype", default="auto",
                   help="auto (the checkpoint's own dtype; float32 for GGUF files), float32, "
                        "bfloat16, float16")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    """What is run and how: the method, its options, the effort level, the precision (one
    definition for `prune` and `plan`, which must accept the same recipe)."""
    p.add_argument("--method", default="spap",
                   help="spap (default), obs, fasp, flap, wanda-sp, magnitude")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. --option recovery=none); "
                        "`spap options METHOD` lists them with their defaults and meaning")
    p.add_argument("--effort", default=None, choices=("fast", "default", "max", "none"),
                   help="a named set of method options that trades time for quality: "
                        "fast, default (spap's when none is given), max; none: the "
                        "method's own option defaults. --option values override it "
                        "(recorded in spap.json)")
    p.add_argument("--compute", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="precision of the matrix products: auto (bf16 where the device "
                        "multiplies it fast, else float32), float32 (reproduces earlier "
                        "runs), bfloat16; sums and solves keep their precision")


def _add_calib_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="wiki-offline",
                   help="wiki-offline (default), lambada-offline, wikitext2, c4, or a local "
                        ".txt/.jsonl file")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window draw (0)")
    _add_bos_flag(p)


def _add_bos_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bos", default="auto", choices=("auto", "always", "never"),
                   help="a BOS token in front of every window (calibration and perplexity), "
                        "which then holds seqlen - 1 text tokens: auto (default: when the "
                        "tokenizer adds one itself), always, never")


def _add_shape_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--round-to", type=int, default=1,
                   help="round the kept width to a multiple (8, 64, 128) for fast kernels")


def _add_head_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heads", type=float, default=0.0,
                   help="fraction of the query heads removed from every KV group of every "
                        "layer (0: none), before the MLP; the KV cache keeps its size")
    p.add_argument("--kv-groups", type=float, default=0.0,
                   help="fraction of whole KV heads removed with their query heads (0: "
                        "none): shrinks the KV cache; needs more than one KV group")
    p.add_argument("--head-method", default="obs",
                   help="head decision: obs (default: least squares over head blocks, o_proj "
                        "refit with the held-out ridge), wanda-sp, flap, magnitude")
    p.add_argument("--head-option", action="append", metavar="KEY=VALUE",
                   help="head option, repeatable (e.g. --head-option refit=exact); "
                        "`spap options heads` lists them")


def _add_eval_window_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window (2048)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="only the first N perplexity windows (quick CPU runs)")


def _add_offload_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload", default="auto", choices=("auto", "cpu", "device"),
                   help="where calibration activations live: auto (off the device only when "
                        "they would take over half its free memory), cpu (host memory, "
                        "streamed a batch at a time), device")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spap", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="log each layer")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model's MLP channels and save it")
    p.add_argument("model", help="Hub id, local folder, .gguf file, or alias "
                                 "(smollm2-135m, qwen2.5-coder-0.5b)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of MLP channels removed in every layer, in [0, 1) (this or "
                        "--params)")
    p.add_argument("--params", type=float, default=None,
                   help="instead of --sparsity: remove this fraction of the parameters, "
                        "split between MLP channels and attention heads by --params-split")
    p.add_argument("--params-of", default="all", choices=("all", "non-embedding"),
                   help="what --params counts: all parameters (default) or those outside "
                        "the embeddings and the output head")
    p.add_argument("--params-split", default="mlp", choices=("mlp", "heads", "kv", "auto"),
                   help="how --params is spent: mlp (default): MLP channels only; heads: one "
                        "query head per KV group plus the MLP sparsity that meets the budget; "
                        "kv: one KV group plus the rest; auto: prune a copy with each and keep "
                        "the lowest perplexity on the held-out calibration windows (one prune "
                        "per split, plus the final one)")
    p.add_argument("--out", required=True, help="output folder (save_pretrained format)")
    _add_method_flags(p)
    _add_head_flags(p)
    _add_calib_flags(p)
    _add_model_flags(p)
    _add_shape_flags(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--eval", dest="evaluate", action="store_true",
                   help="perplexity of dense and pruned")
    _add_eval_window_flags(p)
    _add_offload_flag(p)
    p.add_argument("--low-memory", action="store_true",
                   help="hold one decoder layer in host memory at a time: read each from the "
                        "checkpoint's safetensors when its turn comes, write it to a shard "
                        "when pruned (for models larger than CPU memory; no --eval)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run of these settings for --out (a run "
                        "folder of the same settings is resumed even without this flag)")
    p.add_argument("--restart", action="store_true",
                   help="discard an interrupted run for --out and start again")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="upload the saved folder (with its model card) to this Hugging Face "
                        "Hub repository, created if needed (needs `hf auth login`)")

    p = sub.add_parser("plan", help="peak memory, disk, FLOPs and time of a prune run, "
                                    "step by step, from the model's config alone")
    p.add_argument("model", help="Hub id (only config.json is fetched), local folder, .gguf "
                                 "file, or alias")
    p.add_argument("--hardware", default=None,
                   help="device to plan for: h100, h200, a100, l4, rtx4090, cpu-amx, cpu-fp32 "
                        "(default: this machine's GPU if known, else cpu-fp32)")
    p.add_argument("--host-memory", type=float, default=None,
                   help="host memory in GB for the fit check (default: this machine's)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--sparsity", type=float, default=0.3)
    _add_method_flags(p)
    _add_calib_flags(p)
    p.add_argument("--dtype", default="auto",
                   help="auto (the checkpoint's own dtype; float32 for GGUF files), float32, "
                        "bfloat16, float16")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    _add_shape_flags(p)
    p.add_argument("--eval", dest="evaluate", action="store_true")
    _add_eval_window_flags(p)
    _add_offload_flag(p)
    p.add_argument("--low-memory", action="store_true")

    p = sub.add_parser("eval", help="perplexity (and zero-shot accuracy) of a model")
    p.add_argument("model", help="folder written by spap prune, or any model spec")
    p.add_argument("--data", default="wiki-offline",
                   help="held-out text: wiki-offline (default), lambada-offline, wikitext2, "
                        "c4, or a local .txt/.jsonl file")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window (2048)")
    p.add_argument("--windows", type=int, default=None, help="only the first N windows")
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    _add_bos_flag(p)
    p.add_argument("--tasks", default=None,
                   help="zero-shot tasks through lm-eval, e.g. piqa,hellaswag,arc_easy")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: items per task")
    p.add_argument("--json", default=None, help="write the result here")
    _add_model_flags(p)

    p = sub.add_parser(
        "compare", help="every method at every sparsity, one protocol, table + JSON + plot",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Load MODEL once, draw the calibration windows once and tokenize the held-out text\n"
            "once; prune a fresh copy of the dense model with every method at every sparsity\n"
            "and report perplexity, gap to dense, size, layer error (in-sample and on held-out\n"
            "probe windows from the end of the evaluation text) and time. The JSON is\n"
            "rewritten after every run. Nothing is saved but the JSON and the plot.\n\n"
            "Methods and variants (--methods, comma-separated):\n"
            "  spap                          a method with its default options\n"
            "  spap-fast=spap:recovery=none\n"
            "                                a named variant: name=method:key=val;key=val\n"
            "                                (quote it in the shell when it contains ';')\n"
            "  --option spap:recovery=none\n"
            "                                an option for every variant of method spap (or for\n"
            "                                the variant of that name); a variant's own options\n"
            "                                take precedence\n"
            "e.g. spap compare smollm2-135m \\\n"
            "       --methods spap,spap-fast=spap:recovery=none,obs \\\n"
            "       --sparsities 0.2,0.4 --json cmp.json --plot cmp.png"),
    )
    p.add_argument("model", help="Hub id, local folder, .gguf file, or alias")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods or name=method:key=val;key=val variants "
                        "(default: all of spap, obs, fasp, flap, wanda-sp, magnitude)")
    p.add_argument("--sparsities", default="0.2,0.3,0.4,0.5",
                   help="comma-separated fractions in [0, 1) (default 0.2,0.3,0.4,0.5)")
    p.add_argument("--option", action="append", metavar="METHOD:KEY=VALUE",
                   help="method option, repeatable (e.g. --option spap:recovery=none); "
                        "`spap options METHOD` lists them")
    _add_calib_flags(p)
    _add_model_flags(p)
    _add_shape_flags(p)
    p.add_argument("--eval-data", default="wiki-offline",
                   help="held-out text: wiki-offline (default), lambada-offline, wikitext2, "
                        "c4, or a local .txt/.jsonl file")
    p.add_argument("--also-eval", default=None, metavar="TEXT[,TEXT]",
                   help="also score the dense and every pruned model on these held-out texts "
                        "(e.g. lambada-offline: fiction, out of domain for a Wikipedia "
                        "calibration), same window size and count")
    _add_eval_window_flags(p)
    p.add_argument("--probe-windows", type=int, default=None,
                   help="windows of --seqlen tokens cut from the end of the evaluation text, "
                        "disjoint from the perplexity windows, on which each layer's error is "
                        "also measured held-out (no statistics see them); default "
                        "max(1, nsamples // 4), 0 disables")
    p.add_argument("--dense-copy", default="auto", choices=("auto", "copy", "reload"),
                   help="each run's fresh dense model: a deep copy kept in memory (copy), the "
                        "checkpoint loaded again (reload: one model in memory, not two), or "
                        "reload only when host memory is short (auto)")
    p.add_argument("--json", required=True, help="results file, rewritten after every run")
    p.add_argument("--resume", action="store_true",
                   help="continuable: every prune keeps its finished layers beside --json, and "
                        "the same command run again keeps --json's records, skips those runs "
                        "and continues the unfinished one from its last finished layer")
    p.add_argument("--plot", default=None, help="perplexity-vs-sparsity image (e.g. cmp.png)")
    p.add_argument("--save-models", default=None, metavar="DIR",
                   help="also save every saveable pruned model as DIR/<method>-<sparsity> "
                        "(for spap eval --tasks on exactly the models compared)")

    p = sub.add_parser("bench", help="speed and memory of a pruned model against its base, "
                                     "timed alternately in one process")
    p.add_argument("model", help="the pruned model (folder, or any model spec)")
    p.add_argument("--vs", required=True, help="the dense base model to compare against")
    # Defaults sized to the device (spap.eval.speed.default_grid): the full grid on CUDA, one
    # setting elsewhere (a ~135M model: under 2 minutes on one CPU thread, not 26).
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated; default 1,8 on cuda, 1 on cpu")
    p.add_argument("--prompt-lens", default=None,
                   help="comma-separated prompt tokens; default 128,512 on cuda, 128 on cpu")
    p.add_argument("--gen-tokens", type=int, default=None,
                   help="decoded tokens; default 64 on cuda, 32 on cpu")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per model (median reported); default 5 on cuda, "
                        "3 on cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write the result here")
    _add_model_flags(p)

    p = sub.add_parser("options", help="every method option and head option: type, default, "
                                       "allowed values and meaning")
    p.add_argument("method", nargs="?", default=None,
                   help="spap, obs, fasp, flap, wanda-sp, magnitude, or heads (default: all)")
    return ap


def _print_table(rows: list[tuple], header: tuple) -> None:
    cells = [tuple(str(c) for c in r) for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                        enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def prune_config(args):
    """`spap prune`'s flags as the run's settings: every flag whose name is a PruneConfig
    field sets that field."""
    import dataclasses

    from .config import PruneConfig, parse_options

    if args.resume and args.restart:
        raise SpapError("--resume and --restart contradict each other; pass one")
    names = {f.name for f in dataclasses.fields(PruneConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    given["method_options"] = parse_options(args.option)
    given["head_options"] = parse_options(getattr(args, "head_option", None))
    if given.get("sparsity", 0) is None:
        if given.get("params") is None:
            raise SpapError("give --sparsity (the fraction of MLP channels removed) or "
                            "--params (the fraction of parameters removed)")
        del given["sparsity"]
    given["resume"] = True if args.resume else (False if args.restart else None)
    return PruneConfig.build(**given, progress=True)


def cmd_prune(args) -> int:
    from .api import prune_to_disk
    from .distributed import current

    cfg = prune_config(args)
    job = prune_to_disk(args.model, args.out, config=cfg)
    if not current().is_main:  # under torchrun: rank 0 reports
        return 0
    report, out, t = job.report, job.out, job.timings
    resumed = report.get("resumed_from_layer")
    if resumed:
        print(f"\nresumed an interrupted run: layers 0-{resumed - 1} were already pruned")
    print(f"\nsaved {out} ({report['model']['width_key']} {report['model']['width_before']} -> "
          f"{report['model']['width_after']}); report in {out / 'spap.json'}")
    if job.hub_url:
        print(f"uploaded to the Hub: {job.hub_url}")
    rows = [("parameters", f"{job.params_dense:,}", f"{report['params_after']:,}",
             f"{report['params_after'] / job.params_dense:.3f}x")]
    heads = report.get("heads")
    if heads:
        rows.append(("attention heads / KV heads per layer",
                     f"{heads['heads_before']} / {heads['kv_heads_before']}",
                     f"{heads['heads_after']} / {heads['kv_heads_after']}", ""))
    target = report.get("params_target")
    if target:
        rows.append((f"--params {target['params']:g} ({target['of']}): split", "",
                     f"{target['chosen']}, MLP {report['sparsity_requested']:.1%}", ""))
    if cfg.evaluate:
        ev = report["eval"]
        d, p = ev["dense"]["ppl"], ev["pruned"]["ppl"]
        proto = ev["dense"]["protocol"]
        rows.append((f"perplexity ({proto['windows']}x{proto['seqlen']} held-out tokens)",
                     f"{d:.2f}", f"{p:.2f}", f"{p / d:.3f}x"))
        rows.append(("perplexity eval time (s)", f"{t['dense_eval_s']:.1f}",
                     f"{t['pruned_eval_s']:.1f}", ""))
    rows.append(("mean layer rel. error", "0", f"{report['layer_error_mean']:.4f}", ""))
    mem = report.get("memory", {})
    if mem.get("device_peak_bytes") is not None:
        rows.append(("peak device memory (GiB)", "", f"{mem['device_peak_bytes'] / 2**30:.2f}",
                     ""))
    rows.append(("peak host RSS while pruning (GiB)", "",
                 f"{mem.get('host_rss_peak_bytes', 0) / 2**30:.2f}", ""))
    rows.append(("time (s): load / prune / save", "",
                 f"{t['load_s']:.0f} / {t['prune_s']:.0f} / {t['save_s']:.0f}", ""))
    _print_table(rows, ("", "dense", f"{cfg.method} {report['sparsity_requested']:.0%}",
                        "ratio"))
    return 0


def cmd_plan(args) -> int:
    import dataclasses

    from .config import PruneConfig, parse_options
    from .plan import GB, HARDWARE, default_hardware, fixes, model_config, plan, shapes_of

    hw_name = args.hardware or default_hardware()
    if hw_name not in HARDWARE:
        raise SpapError(f"unknown hardware '{hw_name}'; use {', '.join(HARDWARE)}")
    hw = HARDWARE[hw_name]
    names = {f.name for f in dataclasses.fields(PruneConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    given["method_options"] = parse_options(args.option)
    cfg = PruneConfig.build(**given, device="cuda" if hw.kind == "cuda" else "cpu")
    cfg.validate()
    shapes = shapes_of(model_config(args.model))
    p = plan(shapes, cfg, hw)
    host = int(args.host_memory * GB) if args.host_memory else None
    fix = fixes(shapes, cfg, hw, host)
    if args.json:
        print(json.dumps({"model": args.model, "settings": cfg.to_json(), **p.to_json(),
                          "fits": not fix, "fixes": fix}, indent=1))
        return 0
    gb = 1e9
    print(f"{args.model}: {shapes.model_type}, {shapes.params / 1e9:.2f}B parameters, "
          f"{shapes.layers} layers, MLP width {shapes.width} -> {p.kept}; "
          f"{cfg.nsamples} x {cfg.seqlen} tokens; on {hw.name}"
          + ("; activations off the device" if p.offload else ""))
    rows = [(s.name, s.count, f"{s.device_bytes / gb:.2f}", f"{s.host_bytes / gb:.2f}",
             f"{s.disk_bytes / gb:.2f}", f"{s.total_flops / 1e12:,.0f}",
             f"{s.seconds(hw):,.0f}") for s in p.steps]
    rows.append(("peak / total", "", f"{p.device_peak / gb:.2f}", f"{p.host_peak / gb:.2f}",
                 f"{p.disk_peak / gb:.2f}", f"{p.flops / 1e12:,.0f}", f"{p.seconds:,.0f}"))
    _print_table(rows, ("step", "x", "device GB", "host GB", "disk GB", "TFLOP", "s"))
    big = p.peak_step("device")
    top = sorted(big.device.items(), key=lambda kv: -kv[1])[:3]
    print(f"\ndevice peak in '{big.name}': " + ", ".join(f"{k} {v / gb:.1f} GB" for k, v in top))
    print(f"time: FLOPs at {hw.efficiency:.0%} of {hw.source}")
    if not fix:
        print("fits")
    else:
        print("does not fit; " + "; ".join(
            f"{f['flags']}: device {f['device_peak_bytes'] / gb:.1f} GB, host "
            f"{f['host_peak_bytes'] / gb:.1f} GB{' (fits)' if f['fits'] else ''}" for f in fix))
    return 0


def cmd_eval(args) -> int:
    from .eval.placement import placed
    from .modelio.loading import load_model, resolve_device

    device = resolve_device(args.device)
    if args.tasks is None and args.no_ppl:
        raise SpapError("nothing to do: drop --no-ppl or give --tasks")
    model, tok, src = load_model(args.model, args.dtype, device)
    with placed(model, device) as where:
        result = _evaluate(args, model, tok, src, device, where)
    if args.json:
        from .files import write_json_atomic

        write_json_atomic(args.json, result, nan="null")
    return 0


def _evaluate(args, model, tok, src, device, where) -> dict:
    """cmd_eval's measurements of a model placed for evaluation (eval/placement.py)."""
    from .data import bos_line
    from .eval.ppl import perplexity

    result: dict = {"model": src.spec, "placement": where}
    if not args.no_ppl:
        r = perplexity(model, tok, data=args.data, seqlen=args.seqlen, windows=args.windows,
                       batch_size=args.batch_size, progress=True, bos=args.bos)
        result.update(r)
        print(f"perplexity {r['ppl']:.3f} on {r['protocol']['windows']} windows of "
              f"{r['protocol']['seqlen']} tokens ({args.data}, held-out; "
              f"{bos_line(r['protocol']['bos'])})")
    if args.tasks:
        from .eval.harness import zero_shot

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        zs = zero_shot(model, tok, tasks, limit=args.limit, batch_size=args.batch_size,
                       device=None if "device_map" in where else device)
        result["zero_shot"] = zs
        for name, t in zs["tasks"].items():
            extra = f"  acc_norm {t['acc_norm']:.4f}" if t.get("acc_norm") is not None else ""
            print(f"{name:14s} acc {t['acc']:.4f}{extra}  (n={t.get('n')}, {t.get('split')})")
    return result


def cmd_compare(args) -> int:
    from .compare import run_cli

    return run_cli(args)


def cmd_bench(args) -> int:
    import torch

    from .eval.speed import bench, format_table
    from .modelio.loading import load_model, resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    def ints(v: str | None, flag: str) -> tuple[int, ...] | None:
        if v is None:
            return None  # bench sizes it to the device
        try:
            out = tuple(int(x) for x in v.split(",") if x.strip())
        except ValueError:
            raise SpapError(f"{flag} takes comma-separated integers, got '{v}'") from None
        if not out or min(out) < 1:
            raise SpapError(f"{flag} takes positive integers, got '{v}'")
        return out

    batches = ints(args.batch_sizes, "--batch-sizes")
    lens = ints(args.prompt_lens, "--prompt-lens")
    pruned, _, _ = load_model(args.model, args.dtype, device)
    base, _, _ = load_model(args.vs, args.dtype, device)
    result = bench(pruned, base, batch_sizes=batches, prompt_lens=lens,
                   gen_tokens=args.gen_tokens, reps=args.reps, device=device, progress=True)
    result["models"] = {"pruned": args.model, "base": args.vs}
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_options(args) -> int:
    from .solvers import list_options
    from .solvers.options import format_options

    print(format_options(list_options(args.method)), end="")
    return 0


COMMANDS = {"prune": cmd_prune, "plan": cmd_plan, "eval": cmd_eval, "compare": cmd_compare,
            "bench": cmd_bench, "options": cmd_options}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars show the long work; theirs is noise
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except SpapError as e:
        from .distributed import current

        if current().is_main:  # under torchrun every rank refuses alike: one says so
            print(f"spap: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spap: interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, `spap prune` joined a process group: leave it cleanly."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
