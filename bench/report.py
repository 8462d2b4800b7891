"""Write BENCHMARKS.md and the README's generated tables from bench/results/*.json (never
typed by hand).

    .venv/bin/python bench/report.py

BENCHMARKS.md: bench/HEADER.md (what the tables measure, their protocol), then a section per
kind of result file that exists (compare-<model>.json from spap compare, ablation-, sweep-,
seeds-, zeroshot-, speed-, heads-, params-, dp-scaling-, ood-, fisher-lab-, layer-lab-...),
then where to find the commands (bench/README.md) and one provenance line per file
(bench/provenance.json). README.md: the blocks between `<!-- NAME:begin -->` and
`<!-- NAME:end -->` (README_BLOCKS) are rewritten, the rest of it is left as it is.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "bench") not in sys.path:  # also when loaded from a file spec (the tests)
    sys.path.insert(0, str(ROOT / "bench"))
from merge_compare import same_model, same_tokens  # noqa: E402

RES = ROOT / "bench" / "results"
BASELINES = ("obs", "fasp", "flap", "wanda-sp", "magnitude")
LAYER_GOAL = 0.95  # SPAP's layer error at or below OBS's on at least this fraction of layers


# bench/compare.sh writes a pass to compare-<model>-main.json / -extra.json and merges it
# into compare-<model>.json when the pass ends: a pass still running is not a table of its own
PENDING = ("-main.json", "-extra.json")


def load(pattern: str) -> list[tuple[str, dict]]:
    out = []
    for p in sorted(RES.glob(pattern)):
        if p.name.startswith("compare-") and p.name.endswith(PENDING):
            continue
        out.append((p.stem.split("-", 1)[1], json.loads(p.read_text())))
    return out


def fmt(x, nd=2):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def protocol_line(d: dict) -> str:
    c, e = d["protocol"]["calibration"], d["protocol"]["eval"]
    pr = d["protocol"].get("probe")  # absent from files written before probe windows existed
    probe = (f"held-out layer errors on {pr['windows']} probe windows x {pr['seqlen']} tokens "
             f"from the end of the evaluation text (hash {pr['token_hash'][:12]}); "
             if pr else "")
    return (f"calibration {c['nsamples']} x {c['seqlen']} tokens of {c['source']} "
            f"(seed {c['seed']}, hash {c['token_hash'][:12]}); perplexity on {e['windows']} "
            f"windows x {e['seqlen']} held-out tokens ({e['data']}, {e['split']}); {probe}"
            f"{d['protocol']['device']}, {d['protocol']['dtype']}, torch "
            f"{d['protocol']['versions'].get('torch')}, transformers "
            f"{d['protocol']['versions'].get('transformers')}")


def compare_section(model: str, d: dict, plot: bool = True,
                    goal: float | None = None) -> list[str]:
    recs = d["records"]
    methods = list(dict.fromkeys(r["method"] for r in recs))
    spars = sorted({r["sparsity"] for r in recs})
    by = {(r["method"], r["sparsity"]): r for r in recs}
    lines = [f"### {model}: perplexity (dense {fmt(d['dense_ppl'])})", "",
             f"Protocol: {protocol_line(d)}.", ""]
    lines.append("| method | " + " | ".join(f"r={s:g}" for s in spars) + " |")
    lines.append("|---|" + "---|" * len(spars))
    for m in methods:
        cells = []
        for s in spars:
            r = by.get((m, s))
            if r is None:
                cells.append("")
                continue
            best = min((by[(mm, s)]["ppl"] for mm in methods if (mm, s) in by
                        and by[(mm, s)]["ppl"] is not None), default=None)
            v = fmt(r["ppl"])
            cells.append(f"**{v}**" if r["ppl"] == best else v)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| method | sparsity | params removed | mean layer error | "
              "held-out layer error | prune s (forward / solve) |", "|---|---|---|---|---|---|"]
    for r in recs:
        lines.append(f"| {r['method']} | {r['sparsity']:g} | {r['params_removed_frac']:.3f} | "
                     f"{fmt(r['layer_error_mean'], 4)} | "
                     f"{fmt(r.get('layer_error_heldout_mean'), 4)} | {r['seconds']:.0f} "
                     f"({fmt(r.get('seconds_forward'), 0)} / {fmt(r.get('seconds_solve'), 0)}) |")
    png = RES / f"compare-{model}.png"
    if plot and png.exists():
        lines += ["", f"![perplexity vs sparsity, {model}](bench/results/{png.name})"]
    if not any(_is_baseline(r) for r in recs):
        lines += options_lines(recs)
    lines += ["", *goal_lines(methods, spars, by, GAP_GOAL if goal is None else goal)]
    return lines


def options_lines(recs) -> list[str]:
    """For SPAP variants: the options each run used that differ from today's defaults."""
    import dataclasses

    from spap.solvers.spap import SpapSolver

    defaults = {f.name: f.default for f in dataclasses.fields(SpapSolver)}
    out = ["", "| variant | options that differ from the current `spap` defaults |", "|---|---|"]
    for r in recs:
        diff = {k: v for k, v in (r.get("options") or {}).items() if defaults.get(k) != v}
        out.append(f"| {r['method']} @ {r['sparsity']:g} | "
                   f"{', '.join(f'{k}={v!r}' for k, v in diff.items()) or '(none)'} |")
    return out


def layer_goal(sp: dict | None, obs: dict | None, key: str) -> str:
    """Layers where SPAP's error (list `key` of the records) is at or below OBS's, as
    "k/n (pct%, met|not met)" against LAYER_GOAL; "n/a" when either record lacks the list
    (held-out errors are absent from files written before probe windows existed)."""
    a, b = (sp or {}).get(key), (obs or {}).get(key)
    if not a or not b:
        return "n/a"
    pairs = list(zip(a, b))
    k = sum(x <= y * (1 + 1e-9) for x, y in pairs)
    met = "met" if k >= LAYER_GOAL * len(pairs) else "not met"
    return f"{k}/{len(pairs)} ({100 * k / len(pairs):.0f}%, {met})"


ZS_DROP_GOAL = 0.75  # SPAP's mean zero-shot accuracy drop at most this fraction of the baseline's
QWEN64_GOAL = 0.85  # the same on Qwen2.5-Coder-0.5B at 64 x 512
GAP_GOAL = 0.75  # SPAP's gap to dense at most this fraction of the strongest baseline's


def _is_baseline(r: dict) -> bool:
    return r.get("base_method", r["method"]) in BASELINES


def goal_lines(methods, spars, by, goal: float) -> list[str]:
    """Every SPAP variant against the strongest baseline *variant* of each sparsity (any refit,
    any target), from the records of one run: the gap ratio against `goal`, layer errors
    against that variant (in-sample and held-out), and time against wanda-sp."""
    if "spap" not in methods:
        return []
    out = [f"SPAP against the strongest baseline variant of the same run (goal: SPAP's gap to "
           f"dense at most {goal:g}x its gap; layer columns: layers where SPAP's error is at "
           f"or below that baseline's, in-sample on the calibration windows and held-out on the "
           f"probe windows):", "",
           "| sparsity | SPAP variant | SPAP gap | strongest baseline (gap) | gap ratio | goal | "
           "layers <= baseline, in-sample | same, held-out | SPAP time / wanda-sp |",
           "|---|---|---|---|---|---|---|---|---|"]
    rows = 0
    spaps = [m for m in methods if m == "spap"] + [
        m for m in methods if m != "spap" and any(
            (m, s) in by and by[(m, s)].get("base_method") == "spap" for s in spars)]
    for s in spars:
        base = [by[(m, s)] for m in methods if (m, s) in by and _is_baseline(by[(m, s)])
                and by[(m, s)]["ppl"] is not None]
        if not base:
            continue
        best = min(base, key=lambda r: r["ppl"])
        for name in spaps:
            sp = by.get((name, s))
            if sp is None or sp["ppl"] is None:
                continue
            ratio = sp["gap"] / best["gap"] if best["gap"] > 0 else float("nan")
            wanda = by.get(("wanda-sp", s))
            tr = fmt(sp["seconds"] / wanda["seconds"]) + "x" if wanda else "n/a"
            out.append(f"| {s:g} | {name} | {fmt(sp['gap'])} | {best['method']} "
                       f"({fmt(best['gap'])}) | {fmt(ratio, 3)} | "
                       f"{'met' if ratio <= goal else 'not met'} | "
                       f"{layer_goal(sp, best, 'layer_errors')} | "
                       f"{layer_goal(sp, best, 'layer_errors_heldout')} | {tr} |")
            rows += 1
    return out if rows else []


def _acc(task: dict) -> tuple[float, float | None]:
    """acc_norm where lm-eval defines it, else acc; with its standard error."""
    if task.get("acc_norm") is not None:
        return task["acc_norm"], task.get("acc_norm_stderr")
    return task["acc"], task.get("acc_stderr")


def zeroshot_section(model: str, d: dict) -> list[str]:
    """Accuracy +- lm-eval's standard error per task; the mean's error combines the tasks'
    (independent items). The first pruned model against each other one: a difference within
    two standard errors of the difference is a tie."""
    rows = d["models"]
    tasks = list(next(iter(rows.values()))["tasks"])
    dtype = f", {d['dtype']} weights" if d.get("dtype") else ""
    lines = [f"### {model}: zero-shot accuracy (lm-eval {d.get('lm_eval_version')}, "
             f"limit {d.get('limit')} per task, offline task data{dtype})", "",
             "| model | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
    means = {}
    for name, r in rows.items():
        accs = [_acc(r["tasks"][t]) for t in tasks]
        mean = sum(a for a, _ in accs) / len(accs)
        errs = [e for _, e in accs if e is not None]
        se = math.sqrt(sum(e * e for e in errs)) / len(accs) if len(errs) == len(accs) else None
        means[name] = (mean, se)
        cells = [f"{a:.3f} ± {e:.3f}" if e is not None else fmt(a, 3) for a, e in accs]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {mean:.3f}{f' ± {se:.3f}' if se is not None else ''} |")
    lines += ["", "acc_norm where lm-eval defines it, else acc; ± is lm-eval's standard error "
              "(the mean's combines the tasks'). Splits: " + ", ".join(
                  f"{t}: {next(iter(rows.values()))['tasks'][t].get('split')}" for t in tasks)
              + "."]
    pruned = [n for n in rows if n != "dense"]
    cal = d.get("calibration") or {}
    made = [f"{n} (method `{rows[n]['method']}`, sparsity {rows[n]['sparsity']:g})"
            for n in pruned if rows[n].get("method") and rows[n].get("sparsity") is not None]
    if made:
        in_memory = [n for n in pruned if not rows[n].get("folder")]
        lines += ["", "Pruned models: " + ", ".join(made)
                  + (", pruned in memory by bench/zeroshot.py" if len(in_memory) == len(pruned)
                     else ", the folders `spap compare --save-models` wrote" + (
                         f" ({', '.join(in_memory)}: pruned in memory by bench/zeroshot.py, "
                         "the same tokens)" if in_memory else ""))
                  + (f"; calibration {cal['nsamples']} x {cal['seqlen']} tokens of "
                     f"{cal.get('source')} (hash {cal['token_hash'][:12]})"
                     if cal.get("token_hash") else "") + "."]
    a = pruned[0] if pruned else None
    for b in pruned[1:]:
        (ma, sa), (mb, sb) = means[a], means[b]
        if sa is None or sb is None:
            continue
        diff, se = ma - mb, math.sqrt(sa * sa + sb * sb)
        verdict = "a tie (within two standard errors)" if abs(diff) <= 2 * se else (
            f"{a if diff > 0 else b} ahead")
        lines += ["", f"{a} against {b}: mean difference {diff:+.3f} ± {se:.3f}: {verdict}."]
        if "dense" in means and means["dense"][0] > mb:
            drop_a, drop_b = means["dense"][0] - ma, means["dense"][0] - mb
            lines[-1] += (f" Mean accuracy drop from dense: {drop_a:.3f} and {drop_b:.3f}, "
                          f"a ratio of {drop_a / drop_b:.2f} (goal: at most "
                          f"{ZS_DROP_GOAL:g}, or a tie).")
    return lines


def speed_section(model: str, d: dict) -> list[str]:
    threads = f"{d['threads']} thread{'s' if d['threads'] != 1 else ''}"
    models = d.get("models") or {}
    how = (f"Timed by `spap bench {models['pruned']} --vs {models['base']}` "
           "(`bench/speed.sh`). " if models.get("pruned") and models.get("base") else "")
    lines = [f"### {model}: speed on {d.get('device_name') or d['device']} "
             f"({threads}, {d['dtype']}, torch {d['torch_version']})", "",
             f"{how}Parameters {d['params']['base']:,} -> {d['params']['pruned']:,} "
             f"({d['params']['pruned'] / d['params']['base']:.3f}x); weight bytes "
             f"{d['weight_bytes']['base']:,} -> {d['weight_bytes']['pruned']:,} "
             f"({d['weight_bytes']['ratio']:.3f}x).", "",
             "| batch | prompt | prefill speedup | ideal (FLOPs) | ratio | decode speedup | "
             "ideal (bytes) | ratio |", "|---|---|---|---|---|---|---|---|"]
    for s in d["settings"]:
        p, q = s["prefill"], s["decode"]
        lines.append(f"| {s['batch']} | {s['prompt_len']} | {fmt(p['speedup'])} | "
                     f"{fmt(p['ideal_speedup'])} | {fmt(p['ratio'])} | {fmt(q['speedup'])} | "
                     f"{fmt(q['ideal_speedup'])} | {fmt(q['ratio'])} |")
    lines += _kv_line(d)
    mem = d.get("memory") or {}
    if mem.get("pruned") and mem.get("base"):
        mib = 2**20
        lines += ["", f"Memory ({mem.get('method')}, batch {mem.get('batch')}, prompt "
                  f"{mem.get('prompt_len')}):", "",
                  "| MiB | pruned | base | ratio |", "|---|---|---|---|"]
        for key in ("weight_bytes", "rss_after_load", "run_peak_rss", "run_peak_above_loaded"):
            a, b = mem["pruned"].get(key), mem["base"].get(key)
            if a and b:
                lines.append(f"| {key} | {a / mib:.0f} | {b / mib:.0f} | {a / b:.3f} |")
    return lines


def tradeoff_section(model: str, d: dict) -> list[str]:
    """Perplexity against pruning time for every run of one ablation file (same process, same
    sparsity, same machine load as far as sparsity-major order allows), with a scatter plot."""
    top = max((r["sparsity"] for r in d["records"]), default=None)
    recs = [r for r in d["records"] if r["ppl"] is not None and r["sparsity"] == top]
    wanda = next((r for r in recs if r["method"] == "wanda-sp"), None)
    spars = ", ".join(sorted({f"{r['sparsity']:g}" for r in recs}))
    lines = [f"### {model}: perplexity against pruning time at sparsity {spars}", "",
             "| run | ppl | gap to dense | prune s | x wanda-sp | forward s | solve s |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(recs, key=lambda r: r["seconds"]):
        ratio = fmt(r["seconds"] / wanda["seconds"]) + "x" if wanda else "n/a"
        lines.append(f"| {r['method']} | {fmt(r['ppl'])} | {fmt(r['gap'])} | "
                     f"{r['seconds']:.0f} | {ratio} | {fmt(r.get('seconds_forward'), 0)} | "
                     f"{fmt(r.get('seconds_solve'), 0)} |")
    png = RES / f"tradeoff-{model}.png"
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return lines
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for r in recs:
        ax.scatter(r["seconds"], r["ppl"], s=25)
        ax.annotate(r["method"], (r["seconds"], r["ppl"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("prune wall time, s (log)")
    ax.set_ylabel("perplexity (log)")
    ax.set_title(f"{model}: quality against time (dense {fmt(d['dense_ppl'])})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(png, dpi=150)
    lines += ["", f"![perplexity against time, {model}](bench/results/{png.name})"]
    return lines


def _with_reference(model: str, d: dict) -> dict:
    """An ablation file with the compare table's spap and strongest-baseline records of the
    same sparsity added, when both saw the same calibration, evaluation and probe tokens."""
    path = RES / f"compare-{model}.json"
    if not path.exists():
        return d
    c = json.loads(path.read_text())
    if not same_tokens(c, d):
        return d
    spars = {r["sparsity"] for r in d["records"]}
    have = {r["method"] for r in d["records"]}
    extra = [r for r in c["records"] if r["sparsity"] in spars and r["method"] not in have
             and r["method"] in ("spap", "obs-ridge", "wanda-sp")]
    return {**d, "records": extra + d["records"]}


def sweep_section(files: list[tuple[str, dict]]) -> list[str]:
    """The calibration-size sweep (bench/sweep.sh) plus the compare table's own size: SPAP's
    gap against the strongest baseline variant as a function of calibration tokens."""
    rows = []
    swept = {r["sparsity"] for m, d in files if m.startswith("smollm2-135m-n")
             for r in d["records"]}
    for _, d in files:
        by = {(r["method"], r["sparsity"]): r for r in d["records"]}
        for s in sorted({r["sparsity"] for r in d["records"]} & swept):
            sp = by.get(("spap", s))
            base = [r for (m, ss), r in by.items() if ss == s and _is_baseline(r)
                    and r["ppl"] is not None]
            if sp is None or not base:
                continue
            best = min(base, key=lambda r: r["ppl"])
            c = d["protocol"]["calibration"]
            rows.append((c["nsamples"], c["seqlen"], s, sp, best, d["model"]))
    if not rows:
        return []
    lines = ["| model | calibration | tokens | sparsity | spap ppl | strongest baseline (ppl) | "
             "gap ratio | spap s / baseline s |", "|---|---|---|---|---|---|---|---|"]
    for n, L, s, sp, best, model in sorted(rows, key=lambda r: (r[5], r[2], r[0])):
        ratio = sp["gap"] / best["gap"] if best["gap"] > 0 else float("nan")
        lines.append(f"| {Path(str(model)).name} | {n} x {L} | {n * L:,} | {s:g} | "
                     f"{fmt(sp['ppl'])} | {best['method']} ({fmt(best['ppl'])}) | "
                     f"{fmt(ratio, 3)} | {fmt(sp['seconds'] / best['seconds'])} |")
    return lines


def recovery_memory_section(name: str, d: dict) -> list[str]:
    """bench/recovery_memory.py: the recovery's own memory on an 8B-shaped layer."""
    runs = d.get("runs") or []
    if not runs:
        return []
    r0 = runs[0]
    where = d.get("gpu") or d["device"]
    cmd = " ".join([d["script"], *d.get("argv", [])])
    lines = [f"`{cmd}` on {where} (torch {d.get('torch')}, {d.get('threads')} "
             f"thread{'s' if d.get('threads') != 1 else ''}): one MLP layer of hidden "
             f"{r0['hidden']}, width {r0['width']}, {r0['kept']} channels kept, bfloat16 "
             "inputs and targets, default recovery (alternating, up to "
             f"{r0['epochs_run']} epochs, 1/8 held out). Solve peak: memory during "
             "`recover()` beyond what was allocated before it (device memory on a GPU, "
             "resident set size on the CPU).", "",
             "| tokens | inputs + targets (GiB) | solve peak (GiB) | seconds |",
             "|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['tokens']:,} | {fmt(r['inputs_targets_gib'])} | "
                     f"{fmt(r['solve_peak_gib'])} | {r['seconds']:.0f} |")
    full = 128 * 2048
    peak = max(r["solve_peak_gib"] for r in runs)
    if any(r["tokens"] >= full for r in runs):
        verdict = "met" if peak < 16 else "NOT met"
        lines += ["", f"Goal (recovery at 128 x 2048 under 16 GB beyond the layer's inputs): "
                      f"**{verdict}**, {fmt(peak)} GiB."]
    else:
        held = r0["inputs_targets_gib"] / r0["tokens"] * full
        why = ", where an epoch takes too long on a CPU" if d["device"] == "cpu" else ""
        lines += ["", f"Not run at 128 x 2048 ({full:,} tokens){why}. The solve works on "
                      "minibatches of 1,024 tokens "
                      "and chunks of at most 8,192, so once the fit tokens pass 8,192 nothing "
                      "in it grows with the token count: compare the rows. By that argument "
                      f"the solve needs about {fmt(peak)} GiB at 128 x 2048 too, beside "
                      f"{fmt(held)} GiB of bfloat16 inputs and targets the pipeline holds "
                      "anyway; the goal (under 16 GB) is measured only by the GPU run "
                      "(`make gpu-8b`, or the first command in the script's docstring)."]
    return lines


def _kv_line(d: dict) -> list[str]:
    """The KV-cache size after the prefill, where `spap bench` measured it."""
    out = []
    for st in d["settings"]:
        kv = st.get("kv_cache") or {}
        if kv.get("pruned_bytes") and kv.get("base_bytes"):
            out.append(f"KV cache after a {st['prompt_len']}-token prefill (batch {st['batch']}):"
                       f" {kv['pruned_bytes'] / 2**20:.1f} MiB against "
                       f"{kv['base_bytes'] / 2**20:.1f} MiB, ratio "
                       f"{kv['pruned_bytes'] / kv['base_bytes']:.3f} (ideal "
                       f"{fmt(kv.get('ideal_ratio'), 3)}).")
    return ["", *out] if out else []


def _head_cells(r: dict) -> tuple[str, str]:
    h = r.get("heads") or {}
    if not h:
        return "all", ""
    return (f"{h['heads_after']}/{h['heads_before']} q, {h['kv_heads_after']}/"
            f"{h['kv_heads_before']} kv", fmt(h.get("layer_error_heldout_mean"), 4))


def heads_section(model: str, d: dict) -> list[str]:
    """The head decisions at the same heads removed, MLP untouched."""
    recs = d["records"]
    lines = [f"### {model}: which heads (dense {fmt(d['dense_ppl'])})", "",
             f"Protocol: {protocol_line(d)}. The MLP is not pruned (`--sparsities 0`); "
             "`refit` is the shared refit of the kept `o_proj` columns (ridge chosen on the "
             "held-out calibration windows); the head error is the relative error of the "
             "attention output, mean over layers, on the probe windows.", "",
             "| variant | decision | o_proj | heads kept | params removed | head error "
             "(held-out) | ppl | gap |", "|---|---|---|---|---|---|---|---|"]
    for r in recs:
        h = r.get("heads") or {}
        refit = "refit" if (h.get("method") == "obs" or (h.get("options") or {}).get("update")) \
            else ("dense + bias" if h.get("method") == "flap" else "dense")
        kept, err = _head_cells(r)
        lines.append(f"| {r['method']} | {h.get('method', '')} | {refit} | {kept} | "
                     f"{r['params_removed_frac']:.3f} | {err} | {fmt(r['ppl'])} | "
                     f"{fmt(r['gap'], 2)} |")
    for tag in ("heads", "kv"):
        group = [r for r in recs if r["method"].startswith(tag + "-") and r["ppl"] is not None]
        obs = next((r for r in group if (r.get("heads") or {}).get("method") == "obs"), None)
        base = [r for r in group if r is not obs]
        if obs is None or not base:
            continue
        best = min(base, key=lambda r: r["ppl"])
        e_obs = obs["heads"].get("layer_error_heldout_mean")
        e_best = min((r["heads"].get("layer_error_heldout_mean") or math.inf) for r in base)
        lines += ["", f"- {tag}: obs {fmt(obs['ppl'])} against the best score-based variant "
                  f"{best['method']} {fmt(best['ppl'])} (gap ratio "
                  f"{fmt(obs['gap'] / best['gap'], 3) if best['gap'] else 'n/a'}); held-out "
                  f"head error {fmt(e_obs, 4)} against the lowest of theirs {fmt(e_best, 4)}: "
                  + ("obs ahead on both." if obs["ppl"] < best["ppl"] and e_obs is not None
                     and e_obs < e_best else "obs **not** ahead on both.")]
    return lines


def params_section(model: str, d: dict) -> list[str]:
    """The same parameter budget spent three ways, per method."""
    recs = d["records"]
    lines = [f"### {model}: one budget, three splits (dense {fmt(d['dense_ppl'])})", "",
             f"Protocol: {protocol_line(d)}.", "",
             "| variant | split | MLP sparsity | heads kept | params removed (all / "
             "non-embedding) | held-out MLP error | held-out head error | ppl |",
             "|---|---|---|---|---|---|---|---|"]
    for r in recs:
        t = r.get("params_target") or {}
        kept, herr = _head_cells(r)
        lines.append(f"| {r['method']} | {t.get('chosen', '')} | "
                     f"{fmt(r['sparsity_achieved'], 3)} | {kept} | "
                     f"{r['params_removed_frac']:.3f} / "
                     f"{fmt(r.get('params_non_embedding_removed_frac'), 3)} | "
                     f"{fmt(r.get('layer_error_heldout_mean'), 4)} | {herr} | "
                     f"{fmt(r['ppl'])} |")
    # one group per budget and method (its options but the split): the splits of one budget
    by_method: dict[tuple, list[dict]] = {}
    for r in recs:
        t = r.get("params_target") or {}
        opts = tuple(sorted((k, str(v)) for k, v in (r.get("options") or {}).items()))
        by_method.setdefault((t.get("params"), t.get("of"), r["base_method"], opts),
                             []).append(r)
    lines.append("")
    for (budget, of, _, _), rs in sorted(by_method.items(), key=lambda kv: str(kv[0])):
        rs = [r for r in rs if r["ppl"] is not None]
        if len(rs) < 2:
            continue
        best = min(rs, key=lambda r: r["ppl"])
        mlp = next((r for r in rs if (r.get("params_target") or {}).get("chosen") == "mlp"),
                   None)
        whose = "all" if of == "all" else f"the {of}"
        lines.append(f"- {fmt(budget, 2)} of {whose} parameters, {best['method']}: the lowest "
                     f"perplexity of its {len(rs)} splits, {fmt(best['ppl'])}"
                     + (f" (MLP only: {fmt(mlp['ppl'])})." if mlp and mlp is not best
                        else " (MLP only)." if mlp else "."))
    return lines


SEED_VARIANTS = ("spap-drift", "spap-drift-strong", "spap-drift-lr005", "spap-drift-lr005-rr")


def seeds_section(files: list[tuple[str, dict]], ref: list[dict]) -> list[str]:
    """The gap ratio of each spap drift variant against the strongest drift baseline at r=0.5,
    per calibration seed (seed 0 from the compare table and the out-of-domain run, which saw
    the same tokens); a variant's mean over the seeds it ran."""
    by_seed: dict[str, tuple[int, dict[str, dict]]] = {}
    dense_also: dict[str, dict[str, float]] = {}  # calibration hash -> second text -> dense
    for d in [*ref, *(d for _, d in files)]:
        cal = d["protocol"]["calibration"]
        recs = by_seed.setdefault(cal["token_hash"], (cal["seed"], {}))[1]
        for text, ppl in (d.get("dense_ppl_also") or {}).items():
            dense_also.setdefault(cal["token_hash"], {}).setdefault(text, ppl)
        for r in d["records"]:
            if r["sparsity"] == 0.5 and r["ppl"] is not None:
                have = recs.setdefault(r["method"], r)  # the first file wins (the compare
                # table); a later run of the same model (the same perplexity) lends it the
                # second texts it lacks
                if (have is not r and r.get("ppl_also") and not have.get("ppl_also")
                        and same_model(have, r)):
                    recs[r["method"]] = {**have, "ppl_also": r["ppl_also"]}
    names = [m for m in SEED_VARIANTS if any(m in recs for _, recs in by_seed.values())]
    rows, ratios = [], {m: [] for m in names}
    outside: dict[str, dict[str, list]] = {m: {} for m in names}  # m -> text -> [(in, out)]
    for h, (seed, recs) in sorted(by_seed.items(), key=lambda x: x[1][0]):
        base = [r for r in recs.values() if _is_baseline(r) and r["method"].endswith("-drift")]
        if not base or not any(m in recs for m in names):
            continue
        best = min(base, key=lambda r: r["ppl"])
        cells = []
        for m in names:
            if m not in recs:
                cells += ["", ""]
                continue
            ratio = recs[m]["gap"] / best["gap"]
            ratios[m].append(ratio)
            for text, dn in dense_also.get(h, {}).items():
                mine = (recs[m].get("ppl_also") or {}).get(text)
                theirs = [(b.get("ppl_also") or {}).get(text) for b in base]
                theirs = [x for x in theirs if x is not None]
                if mine is not None and theirs:
                    outside[m].setdefault(text, []).append(
                        (ratio, (mine - dn) / (min(theirs) - dn)))
            cells += [fmt(recs[m]["ppl"]), f"{ratio:.3f}"]
        rows.append(f"| {seed} | {h[:12]} | {best['method']} | {fmt(best['ppl'])} | "
                    + " | ".join(cells) + " |")
    if not rows:
        return []
    lines = ["| seed | calibration hash | strongest baseline | its ppl | "
             + " | ".join(f"{m} | gap ratio" for m in names) + " |",
             "|---|---|---|---|" + "---|---|" * len(names), *rows, ""]
    for m in names:
        r = ratios[m]
        spread = (max(r) - min(r)) if len(r) > 1 else 0.0
        lines.append(f"- {m}: mean gap ratio over {len(r)} seed(s) **{sum(r) / len(r):.3f}** "
                     f"(spread {spread:.3f}); the goal is 0.75.")
        for text, pairs in outside[m].items():
            inside = sum(x for x, _ in pairs) / len(pairs)
            out = sum(y for _, y in pairs) / len(pairs)
            lines.append(f"  On {text} (the strongest drift baseline there; seeds that have "
                         f"it): mean gap ratio over {len(pairs)} seed(s) {out:.3f}, against "
                         f"{inside:.3f} in domain at the same seeds: {abs(out - inside):.3f} "
                         f"apart (the goal: within 0.05).")
    return lines


def ood_section(model: str, d: dict) -> list[str]:
    """The same pruned models on the calibration domain's held-out text and on a second text
    out of that domain (`spap compare --also-eval`): each spap variant's gap ratio against
    the strongest baseline on each text, and how far the two ratios are apart."""
    texts = list(d.get("dense_ppl_also") or {})
    if not texts:
        return []
    main = d["protocol"]["eval"]["data"]
    lines = [f"### {model}: {main} and {', '.join(texts)}", "", protocol_line(d), "",
             "| method | sparsity | " + " | ".join(f"{t} ppl" for t in [main, *texts])
             + " | prune s |", "|---|---|" + "---|" * (2 + len(texts))]
    dense = [d["dense_ppl"], *(d["dense_ppl_also"][t] for t in texts)]
    lines.append("| dense |  | " + " | ".join(fmt(x) for x in dense) + " |  |")

    def ppl(r, t):
        return r["ppl"] if t == main else (r.get("ppl_also") or {}).get(t)

    recs = [r for r in d["records"] if r["ppl"] is not None]
    for r in recs:
        lines.append(f"| {r['method']} | {r['sparsity']:g} | "
                     + " | ".join(fmt(ppl(r, t)) for t in [main, *texts])
                     + f" | {r['seconds']:.0f} |")
    lines.append("")
    for s in sorted({r["sparsity"] for r in recs}):
        at = [r for r in recs if r["sparsity"] == s]
        base = [r for r in at if _is_baseline(r)]
        for sp in (r for r in at if not _is_baseline(r)):
            if not base:
                continue
            ratios = {}
            for t, dn in zip([main, *texts], dense):
                vals = [(ppl(b, t), b["method"]) for b in base if ppl(b, t) is not None]
                if ppl(sp, t) is None or not vals:
                    continue
                best, name = min(vals)
                ratios[t] = ((ppl(sp, t) - dn) / (best - dn), name)
            if main not in ratios:
                continue
            parts = [f"{t} {v:.3f} (against {n})" for t, (v, n) in ratios.items()]
            far = [abs(ratios[t][0] - ratios[main][0]) for t in texts if t in ratios]
            wanda = next((r for r in at if r["method"] == "wanda-sp"), None)
            took = (f"; prune time {sp['seconds'] / wanda['seconds']:.1f}x wanda-sp's (the "
                    f"goal: at most 5x)" if wanda else "")
            lines.append(f"- {sp['method']} at {s:g}: gap ratio " + ", ".join(parts)
                         + (f"; {max(far):.3f} apart (the goal: within 0.05)" if far else "")
                         + took + ".")
    return lines


def fisher_section(model: str, d: dict) -> list[str]:
    """bench/fisher_lab.py: one layer pruned at a time, each variant's model perplexity on
    the probe windows and its layer error, so a mask is judged by what it costs the model."""
    layers = sorted(d.get("results", {}), key=int)
    if not layers:
        return []
    names = list(d["variants"])
    dense = d["dense_probe_ppl"]
    lines = [f"### {d.get('model', model)} (sparsity {d['sparsity']:g}, dense probe "
             f"perplexity {fmt(dense, 3)})",
             "", f"Command: `{d['command']}`.", "",
             "| variant | " + " | ".join(f"layer {i}: ppl rise (layer error)" for i in layers)
             + " | mean ppl rise | kept of the top 5% activations |",
             "|---|" + "---|" * (len(layers) + 2)]
    for n in names:
        rs = [d["results"][i].get(n) for i in layers]
        if any(r is None for r in rs):
            continue
        rise = [r["probe_ppl"] - dense for r in rs]
        top = [r.get("kept_of_top5pct_norm") for r in rs]
        top_s = (f"{sum(top) / len(top):.2f}" if all(t is not None for t in top) else "n/a")
        lines.append(f"| {n} | " + " | ".join(
            f"{x:.4f} ({r['probe_rel_error']:.4f})" for x, r in zip(rise, rs))
            + f" | {sum(rise) / len(rise):.4f} | {top_s} |")
    return lines


def dp_section(model: str, d: dict) -> list[str]:
    """Data-parallel pruning against one process (bench/dp_scaling.py)."""
    st = d.get("settings") or {}
    opts = " ".join(f"--option {o}" for o in st.get("option") or [])
    lines = [f"### {d.get('model')}: {st.get('method')}{' ' + opts if opts else ''} at "
             f"{st.get('sparsity')}, "
             f"{st.get('nsamples')} x {st.get('seqlen')} tokens, on "
             f"{d.get('device_name') or d.get('device')}", "",
             "| processes | prune s | speed-up | recovery's Adam s | activations per rank "
             "(vs 1) | same channels as 1 | mean layer error | max logit difference "
             "(largest logit) |",
             "|---|---|---|---|---|---|---|---|"]
    for n, r in sorted((d.get("runs") or {}).items(), key=lambda x: int(x[0])):
        same = (r.get("keep_vs_1") or {}).get("equal")
        adam = (r.get("seconds_by_step") or {}).get("solve_recovery_adam")
        lines.append(f"| {n} | {fmt(r.get('prune_s'), 1)} | {fmt(r.get('speedup_prune'), 2)} | "
                     f"{fmt(adam, 1)} | {fmt(r.get('calibration_bytes_per_rank_vs_1'), 3)} | "
                     f"{same} | {fmt(r.get('layer_error_mean'), 4)} | "
                     f"{fmt(r.get('max_logit_diff_vs_1'), 6)} "
                     f"({fmt(r.get('max_abs_logit_1'), 1)}) |")
    return lines


DP_INTRO = (
    "`bench/dp_scaling.py`: the same `spap prune` as one process and under "
    "`torch.distributed.run --nproc-per-node 2` (gloo, one CPU thread per rank, on a 2-core "
    "machine that also ran other jobs, so the speed-ups are only indicative). A rank holds "
    "whole batches of `--batch-size` windows: with 16 windows in batches of 4, rank 0 holds 10 "
    "(8 fit, 2 held out) and rank 1 holds 6, hence 0.62 of one process's activations. "
    "\"Same channels\" compares every layer's kept channels with one process's. With its "
    "default float32 solve, spap's masks follow one process's for the first layers and then "
    "part: the float64 sums differ only in their order, but once cast to float32 for the solve "
    "an element may round the other way, and greedy OBS breaks a near-tie differently; "
    "`--option solve_dtype=float64` keeps every channel. Since recovery's Adam steps are "
    "split between the ranks (each rank's tokens of every minibatch, the gradients summed; "
    "the `-split` file), they too follow one process only up to rounding; "
    "`recovery_parallel=exact` takes one process's steps on every rank. Files without the "
    "recovery column were measured before the steps were split or timed. In the two "
    "recovery files (16 x 256 tokens in batches of 1: 8 windows per rank) the two ranks "
    "shared the 2 cores with other jobs (load average 4 to 7), so two ranks took longer than "
    "one, split or not; what they do show: the exact steps give one process's model bit for "
    "bit, and the split ones other channels from the second layer on (bf16 products, "
    "rounded per rank) at a 2.7% higher mean layer error.")


LAB_INTRO = (
    "`bench/layer_lab.py`: one layer problem per chosen decoder layer, built as the pipeline "
    "builds it (the dense model's MLP inputs at that layer, r=0.5, 64 x 512 calibration "
    "tokens, the last 8 windows held out), solved by every variant. Each cell is the layer's "
    "relative output error on probe windows from the end of the evaluation text, which no "
    "solver sees, and in brackets the seconds of one solve on one CPU thread. `spap-ep4` is "
    "a hard cut followed by 4 recovery epochs; `cont4` is `recovery=continuation` with 4 "
    "epochs (the cut made gradually, the mask re-chosen between epochs), `cont4-fixed` the "
    "same with the decision's mask kept. In the `-lr-` files, `strong` is recovery at full "
    "strength (64 Adam steps per epoch, at most 8 epochs stopped when 2 bring no held-out "
    "gain, the down projection refit once more on all windows), `strong-lrX` the same with "
    "Adam's rate X (0.02 in `strong`; at 0.01 and 0.005 with at most 16 epochs), `strong-s256` "
    "with 256 steps per epoch, `strong-shrink` with `recovery_shrink=0.25`. In the `-rerun-` "
    "files, `rerun-lrX` is `strong-lrX` (at most 16 epochs) with `recovery_rerun=true`: the "
    "epochs the held-out windows chose run once more from the start on all 64 windows, so "
    "its held-out column is in-sample; the probe column is not.")


def lab_section(model: str, d: dict) -> list[str]:
    from layer_lab import table  # (imports torch: only when a lab file exists)

    cmds = "; ".join(f"`{c}`" for c in d.get("commands", [d["command"]]))
    note = [f"Note: {d['note']}.", ""] if d.get("note") else []
    return [f"### {d.get('model', model)} (`layer-{model}.json`)", "", f"Commands: {cmds}.", "",
            *note, table(d)]


CALIB64_INTRO = ("`spap compare` with SmolLM2's sizes (64 calibration windows of 512 tokens, "
                 "the last 8 held out) on Qwen2.5-Coder-0.5B, whose table above used 16 x 512: "
                 "every method on the same tokens (passes of one core each, two or three "
                 "side by side, merged), at 0.3 and 0.5. "
                 "`-fd` variants rank masks by the Fisher-weighted output error "
                 "(`out_weight=fisher`) and refit toward the drift target "
                 "(`refit_target=drift`); a baseline variant gets every option SPAP's does.")
OOD_INTRO = ("`spap compare --also-eval lambada-offline`: the models pruned on Wikipedia "
             "calibration windows, scored on Wikipedia's held-out windows and on as many "
             "windows of the LAMBADA-OpenAI passages (fiction). A gain that fits only the "
             "calibration domain shows as a gap ratio nearer 1 on the second text. Prune "
             "seconds are of one CPU thread, each run a job of its own with one other job "
             "on the machine's two cores, so a time ratio is between jobs, not within one "
             "process.")
FISHER_INTRO = ("`bench/fisher_lab.py`: a single decoder layer pruned (r=0.5, all others "
                "dense) by each variant's mask and refit; the rise of the model's "
                "perplexity on probe windows from the end of the evaluation text (no solver "
                "sees them), and in brackets the layer's relative output error there. "
                "`-fisher` variants rank masks by the output error weighted by the loss's "
                "Fisher (`out_weight=fisher`); the refit is the same.")


PLAN_INTRO = (
    "`bench/plan_check.py` runs the steps of a prune on the CPU (float32, one thread) and "
    "measures the anonymous resident memory at each step's peak, beside what `spap plan` "
    "predicts for the same shapes and settings (`ratio` = measured / predicted; the goal is "
    "within 20%). The Llama-3.1-8B-shaped layer (random weights) ran at 8 x 2048 tokens, "
    "not 128 x 2048, within this machine's memory; its recovery ran on its own, with one "
    "epoch, since recovery's memory does not depend on the number of steps. The `cuts` "
    "files measure one SPAP solve with the drift target before and after the memory cuts "
    "(one damped Gram at a time, no inverse kept past the decision, no full-size float64 "
    "temporaries).")


def plan_section(name: str, d: dict) -> list[str]:
    """One plan-check file: step peaks against the plan, recovery alone, or a cut."""
    gb = 1e9
    if "steps" in d:
        def g(x, scale=gb):
            return "n/a" if x is None else f"{x / scale:.2f}"

        rows = [f"| {step} | {g(v.get('measured_bytes'))} | {g(v.get('predicted_bytes'))} | "
                f"{g(v.get('ratio'), 1)} |" for step, v in d["steps"].items()]
        c = d.get("case_settings", {})
        size = (f"{c['nsamples']} x {c['seqlen']} tokens" if "nsamples" in c else "")
        return [f"`plan-{name}.json` ({size}; within 20% at every step: "
                f"{'yes' if d['within_20_percent'] else 'no'})", "",
                "| step | measured GB | predicted GB | ratio |", "|---|---|---|---|", *rows]
    if "ratio" in d:
        return [f"`plan-{name}.json`: recovery alone at {d['tokens']} tokens, {d['kept']} channels "
                f"kept: measured {d['measured_bytes'] / gb:.2f} GB, predicted "
                f"{d['predicted_bytes'] / gb:.2f} GB (ratio {d['ratio']:.2f})."]
    peaks = ", ".join(f"{k} {v / gb:.2f}" for k, v in d["peak_bytes"].items())
    return [f"`plan-{name}.json` ({d['shape']} MLP, {d['label'] or d['case']}): peak GB by step: "
            f"{peaks}; alive when recovery starts {d['alive_at_recovery_start_bytes'] / gb:.2f}"
            " GB."]


def benchmarks_text() -> str:
    """BENCHMARKS.md: the header, every table, then reproduction and provenance."""
    head = (ROOT / "bench" / "HEADER.md").read_text()
    parts = [head.rstrip(), ""]
    for title, pattern, fn in [
        ("## Perplexity: SPAP against the baselines", "compare-*.json", compare_section),
        ("## Ablation: what each piece of SPAP contributes", "ablation-*.json", compare_section),
        ("## Trade-off: perplexity against pruning time", "compare-*.json", tradeoff_section),
        ("## Recovery memory on an 8B-shaped layer", "recovery-memory-*.json",
         recovery_memory_section),
        ("## Zero-shot accuracy", "zeroshot-*.json", zeroshot_section),
        ("## Speed and memory", "speed-*.json", speed_section),
        ("## Attention heads: the decision", "heads-*.json", heads_section),
        ("## Attention heads: a parameter budget", "params-*.json", params_section),
        ("## Several processes for one prune", "dp-scaling-*.json", dp_section),
        ("## Memory: `spap plan` against measured peaks", "plan-check-*.json", plan_section),
    ]:
        found = load(pattern)
        if not found:
            continue
        if pattern == "ablation-*.json":
            found = [(m, _with_reference(m, d)) for m, d in found]
        parts += [title, ""]
        if pattern == "dp-scaling-*.json":
            parts += [DP_INTRO, ""]
        if pattern == "plan-check-*.json":
            parts += [PLAN_INTRO, ""]
        for model, d in found:
            parts += [*fn(model, d), ""]
        if fn is compare_section and pattern == "compare-*.json":
            sweep = load("sweep-*.json") + [(m, d) for m, d in found if m == "smollm2-135m"]
            if len(sweep) > 1:
                parts += ["## The margin as a function of calibration data", "",
                          "`bench/sweep.sh` (sparsity 0.5; the 64-window row is the compare "
                          "table's run). Same evaluation and probe windows in every row.", "",
                          *sweep_section(sweep), ""]
    seeds = seeds_section(load("seeds-*.json"), [
        d for m, d in load("compare-smollm2-135m.json") + load("ood-smollm2-135m.json")
        if m == "smollm2-135m"])
    if seeds:
        parts += ["## The margin across calibration seeds (SmolLM2-135M, r=0.5, 64 x 512)", "",
                  "`bench/compare.sh`'s protocol with `--seed N` (other calibration windows; "
                  "the same evaluation and probe windows), the drift-target variants of "
                  "spap and of the refitting baselines. `spap-drift-strong` is spap-drift "
                  "with recovery at full strength: 64 Adam steps per epoch, up to 8 epochs "
                  "stopped when 2 bring no held-out gain, and the down projection refit once "
                  "more on all windows at the end; `spap-drift-lr005` the same with Adam's "
                  "rate 0.005 instead of 0.02 and up to 16 epochs; `spap-drift-lr005-rr` that with "
                  "`recovery_rerun=true` (the chosen epochs run once more from the start on "
                  "all 64 windows).", "", *seeds, ""]
    for title, intro, pattern, fn in [
        ("## The larger calibration on Qwen2.5-Coder-0.5B (64 x 512)", CALIB64_INTRO,
         "calib64-*.json", lambda m, d: compare_section(m, d, plot=False, goal=QWEN64_GOAL)),
        ("## Out of domain: the same models on another text", OOD_INTRO, "ood-*.json",
         ood_section),
        ("## One layer at a time: masks judged by the model's perplexity", FISHER_INTRO,
         "fisher-lab-*.json", fisher_section),
        ("## One layer at a time: recovery variants on real layers", LAB_INTRO,
         "layer-lab-*.json", lab_section),
    ]:
        found = load(pattern)
        if found:
            parts += [title, "", intro, ""]
            for model, d in found:
                parts += [*fn(model, d), ""]
    parts += ["## Reproducing these numbers", "",
              "The commands that produce every file of `bench/results/`, and how their passes "
              "were merged, are in [bench/README.md](bench/README.md); "
              "`python bench/report.py` then rewrites this file.", "",
              *provenance_lines()]
    return "\n".join(parts).rstrip() + "\n"


PROVENANCE = ROOT / "bench" / "provenance.json"


def results_files() -> list[str]:
    """The names of the result files the tables read (a pass still running excluded)."""
    return [p.name for p in sorted(RES.glob("*.json"))
            if not (p.name.startswith("compare-") and p.name.endswith(PENDING))]


def provenance_lines() -> list[str]:
    """One line per result file: the script and the commit that produced it."""
    prov = json.loads(PROVENANCE.read_text())
    lines = ["## Where each file comes from", "", prov["note"], ""]
    for name in results_files():
        line = prov["files"].get(name, "no line in bench/provenance.json yet.")
        lines.append(f"- `{name}`: {line}")
    return lines


# ---- the README's generated blocks ----------------------------------------------------------

def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _calib(d: dict) -> str:
    c = d["protocol"]["calibration"]
    return f"{c['nsamples']} x {c['seqlen']}"


def _settings_of(d: dict, r: dict) -> dict:
    """A record's run settings (effort, compute, ...), from the file's variant list."""
    for v in d.get("variants", []):
        if isinstance(v, dict) and v.get("name") == r["method"]:
            return v.get("settings") or {}
    return {}


def _level(d: dict, r: dict) -> str:
    """An effort record's level: its own field, its run settings', or spap's default level."""
    return (r.get("effort") or _settings_of(d, r).get("effort")
            or ("default" if r.get("base_method", r["method"]) == "spap" else "-"))


def _run_level(d: dict, r: dict) -> str:
    """The level a record ran at, for pairing: a baseline's is the level whose shared options
    (`presets.GENERIC`) it ran with, its stated level first (obs at `default` with
    `out_weight=fisher` given too ran at `max`'s); a SPAP record's is its level."""
    level = _level(d, r)
    opts = r.get("options") or {}
    if not _is_baseline(r) or not opts:
        return level
    import dataclasses

    from spap.solvers import solver_class
    from spap.solvers.presets import GENERIC, PRESETS

    solver = solver_class(r.get("base_method", r["method"]))
    own = {f.name: f.default for f in dataclasses.fields(solver)}

    def ran_at(lv):  # the level's shared options, and the solver's defaults for the others
        want = {k: v for k, v in PRESETS[lv].items() if k in GENERIC}
        return bool(want) and all(opts.get(k, own.get(k)) == want.get(k, own.get(k))
                                  for k in GENERIC)

    for lv in [level, *PRESETS]:
        if lv in PRESETS and ran_at(lv):
            return lv
    return level


def _compute(d: dict, r: dict) -> str:
    """A record's compute precision: its own field, or its run setting (`auto` resolved to
    bf16 on the machine of these files, which has bf16 matrix units)."""
    c = r.get("compute") or _settings_of(d, r).get("compute") or "auto"
    return {"auto": "bfloat16", "float32": "float32"}.get(c, c)


def effort_lines(files: list[tuple[str, dict]]) -> list[str]:
    """The README's effort table: every SPAP record of every effort-<model>[-sN].json, with its
    perplexity on the calibration domain and on the second text, its gap ratio against the
    strongest baseline of the same file on each, and its prune time against wanda-sp's."""
    if not files:
        return ["Not yet measured: no `bench/results/effort-*.json` exists, so there is no "
                "figure to give here yet."]
    lines = ["| model, sparsity (calibration seed) | `--effort` | products | "
             "Wikipedia ppl (gap ratio) | out-of-domain ppl (gap ratio) | "
             "prune time (x wanda-sp) |",
             "|---|---|---|---|---|---|"]
    notes = []
    # (model, sparsity, level, products) -> [(seed, in-domain ratio, out-of-domain ratio)]
    over_seeds: dict[tuple, list[tuple[int, float | None, float | None]]] = {}
    def order(f):
        d = f[1]
        return (d["model"], -max((r["sparsity"] for r in d["records"]), default=0),
                d["protocol"]["calibration"].get("seed", 0))

    files = sorted(files, key=order)
    for name, d in files:
        # a row's level and precision -> (its own baseline, its ratio to the strongest)
        paired: dict[str, tuple[dict, float]] = {}
        seed = d["protocol"]["calibration"].get("seed", 0)
        base = [r for r in d["records"] if _is_baseline(r) and r["ppl"] is not None
                and r.get("base_method") != "wanda-sp"]
        wanda = {r["sparsity"]: r for r in d["records"] if r.get("base_method") == "wanda-sp"}
        also = sorted(d.get("dense_ppl_also") or {})
        for r in d["records"]:
            if _is_baseline(r) or r["ppl"] is None:
                continue
            # the strongest baseline run at this row's level (a like-for-like comparison),
            # else the strongest of the file at this sparsity
            here = [b for b in base if b["sparsity"] == r["sparsity"]]
            best = min([b for b in here if _run_level(d, b) == _level(d, r)] or here,
                       key=lambda b: b["ppl"], default=None)
            top = min(here, key=lambda b: b["ppl"], default=None)
            if best is not None and best is not top and top["gap"] > 0:
                paired[f"`{_level(d, r)}` ({_compute(d, r)})"] = (best, r["gap"] / top["gap"])
            q = r["gap"] / best["gap"] if best and best["gap"] > 0 else None
            ratio = f"{q:.3f}" if q is not None else "n/a"
            ood, q2 = "n/a", None
            if also and r.get("ppl_also") and best and best.get("ppl_also"):
                src = also[0]
                dense2 = d["dense_ppl_also"][src]
                g, gb = r["ppl_also"][src] - dense2, best["ppl_also"][src] - dense2
                q2 = g / gb if gb > 0 else None
                ood = f"{fmt(r['ppl_also'][src])} ({q2:.3f})" if q2 is not None else "n/a"
            over_seeds.setdefault((d["model"], r["sparsity"], _level(d, r), _compute(d, r)),
                                  []).append((seed, q, q2))
            w = wanda.get(r["sparsity"])
            t = _minutes(r["seconds"]) + (f" ({r['seconds'] / w['seconds']:.1f}x)" if w else "")
            lines.append(f"| {d['model']}, r={r['sparsity']:g} ({seed}) | `{_level(d, r)}` | "
                         f"{_compute(d, r)} | "
                         f"{fmt(r['ppl'])} ({ratio}) | {ood} | {t} |")
        if base:
            top = min(base, key=lambda b: b["ppl"])
            notes.append(f"`{name}`: r={top['sparsity']:g}, {_calib(d)} calibration tokens, "
                         f"dense {fmt(d['dense_ppl'])}"
                         + (f" ({fmt(d['dense_ppl_also'][also[0]])} on {also[0]})" if also
                            else "")
                         + f"; strongest baseline {top['method']} {fmt(top['ppl'])} "
                         f"(at `{_run_level(d, top)}`)"
                         + "".join(f"; {lv} is paired with {b['method']} {fmt(b['ppl'])}, "
                                   f"and against the strongest gives {q:.3f}"
                                   for lv, (b, q) in paired.items()))
    means = []
    for (model, sp, level, prec), got in over_seeds.items():
        got = sorted(got)
        seeds = sorted({x[0] for x in got})
        if len(seeds) < 2:
            continue
        cells = []
        for i, text in ((1, "Wikipedia"), (2, "out of domain")):
            vals = [x[i] for x in got if x[i] is not None]
            if vals:
                cells.append(f"{text} {sum(vals) / len(vals):.3f} "
                             f"({', '.join(f'{v:.3f}' for v in vals)})")
        means.append(f"- {model}, r={sp:g}, `{level}` ({prec}), calibration seeds "
                     f"{', '.join(map(str, seeds))}: mean gap ratio " + "; ".join(cells) + ".")
    if means:
        lines += ["", *means]
    lines += ["", "Gap ratio: the level's distance to the dense perplexity over the strongest "
              "baseline's of the same run and tokens, at the same level where a baseline ran "
              "at it (below 1 is better); baselines run at the "
              "same precision; times are one CPU thread per job on a 2-core machine shared "
              "with other jobs (load average 4 to 9), so they are rough: the float32 row ran "
              "in a second job beside the first, over the same hours. " + "; ".join(notes) + "."]
    return lines


def results_lines(files: list[tuple[str, dict]]) -> list[str]:
    """The README's summary of the compare tables: per model and sparsity, `spap` against
    the strongest baseline variant and wanda-sp of the same run."""
    lines = ["| model | sparsity (params removed) | dense | spap | strongest baseline | "
             "gap ratio | wanda-sp | spap prune time | calibration |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, d in files:
        by = {(r["method"], r["sparsity"]): r for r in d["records"]}
        for s in sorted({r["sparsity"] for r in d["records"]}):
            sp = by.get(("spap", s))
            base = [r for (_, ss), r in by.items() if ss == s and _is_baseline(r)
                    and r["ppl"] is not None]
            if sp is None or sp["ppl"] is None or not base:
                continue
            best = min(base, key=lambda r: r["ppl"])
            wanda = by.get(("wanda-sp", s))
            lines.append(f"| {model} | {s:g} ({sp['params_removed_frac']:.1%}) | "
                         f"{fmt(d['dense_ppl'])} | {fmt(sp['ppl'])} | {best['method']} "
                         f"{fmt(best['ppl'])} | {sp['gap'] / best['gap']:.3f} | "
                         f"{fmt(wanda['ppl']) if wanda else 'n/a'} | "
                         f"{_minutes(sp['seconds'])} | {_calib(d)} |")
    lines += ["", "Perplexity on held-out Wikipedia windows (lower is better), one CPU thread; "
              "from " + ", ".join(f"`bench/results/compare-{m}.json`" for m, _ in files)
              + ", where every method and variant is listed ([BENCHMARKS.md](BENCHMARKS.md))."]
    return lines


# block name -> (result files it reads, the function that writes its lines)
README_BLOCKS = {
    "effort-table": ("effort-*.json", effort_lines),
    "results-table": ("compare-*.json", results_lines),
}


def fill_blocks(text: str, blocks: dict[str, list[str]]) -> str:
    """`text` with the lines between each block's begin and end markers replaced."""
    for name, lines in blocks.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        i, j = text.find(begin), text.find(end)
        if i < 0 or j < i:
            raise SystemExit(f"README.md has no {begin} ... {end} block; add the two markers "
                             "where the table belongs")
        text = text[:i + len(begin)] + "\n" + "\n".join(lines) + "\n" + text[j:]
    return text


def readme_text(text: str) -> str:
    return fill_blocks(text, {name: fn(load(pattern))
                              for name, (pattern, fn) in README_BLOCKS.items()})


def main() -> None:
    (ROOT / "BENCHMARKS.md").write_text(benchmarks_text())
    readme = ROOT / "README.md"
    readme.write_text(readme_text(readme.read_text()))


if __name__ == "__main__":
    main()
