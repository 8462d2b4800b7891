"""Write BENCHMARKS.md from the JSON files in bench/results/ (never typed by hand).

    .venv/bin/python bench/report.py

Sections appear for the result files that exist: compare-<model>.json (spap compare),
ablation-<model>.json (spap compare over SPAP variants), zeroshot-<model>.json
(bench/zeroshot.py) and speed-<model>.json (spap bench).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RES = ROOT / "bench" / "results"
BASELINES = ("obs", "fasp", "flap", "wanda-sp", "magnitude")
LAYER_GOAL = 0.95  # SPAP's layer error at or below OBS's on at least this fraction of layers


def load(pattern: str) -> list[tuple[str, dict]]:
    out = []
    for p in sorted(RES.glob(pattern)):
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


def compare_section(model: str, d: dict) -> list[str]:
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
    if png.exists():
        lines += ["", f"![perplexity vs sparsity, {model}](bench/results/{png.name})"]
    if not any(m in BASELINES for m in methods):
        lines += options_lines(recs)
    lines += ["", *goal_lines(methods, spars, by)]
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


def goal_lines(methods, spars, by) -> list[str]:
    if "spap" not in methods or not any(m in BASELINES for m in methods):
        return []
    out = ["Goals of the baselines issue, computed from the records above (layer error goal: "
           f"SPAP's layer error is at or below OBS's on at least {LAYER_GOAL:.0%} of layers, "
           "in-sample on the calibration windows and held-out on the probe windows):", "",
           "| sparsity | SPAP lowest? | SPAP gap | best baseline (gap) | gap reduction | "
           "layers with SPAP error <= OBS, in-sample | same, held-out | "
           "SPAP time / wanda-sp |",
           "|---|---|---|---|---|---|---|---|"]
    for s in spars:
        sp = by.get(("spap", s))
        base = [by[(m, s)] for m in methods if m in BASELINES and (m, s) in by
                and by[(m, s)]["ppl"] is not None]
        if sp is None or not base:
            continue
        best = min(base, key=lambda r: r["ppl"])
        red = 1 - sp["gap"] / best["gap"] if best["gap"] > 0 else float("nan")
        obs = by.get(("obs", s))
        wanda = by.get(("wanda-sp", s))
        tr = fmt(sp["seconds"] / wanda["seconds"]) + "x" if wanda else "n/a"
        out.append(f"| {s:g} | {'yes' if sp['ppl'] <= best['ppl'] else 'no'} | "
                   f"{fmt(sp['gap'])} | {best['method']} ({fmt(best['gap'])}) | "
                   f"{100 * red:.1f}% | {layer_goal(sp, obs, 'layer_errors')} | "
                   f"{layer_goal(sp, obs, 'layer_errors_heldout')} | {tr} |")
    return out


def zeroshot_section(model: str, d: dict) -> list[str]:
    rows = d["models"]
    tasks = list(next(iter(rows.values()))["tasks"])
    lines = [f"### {model}: zero-shot accuracy (lm-eval {d.get('lm_eval_version')}, "
             f"limit {d.get('limit')} per task, offline task data)", "",
             "| model | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
    for name, r in rows.items():
        accs = [r["tasks"][t].get("acc_norm") or r["tasks"][t]["acc"] for t in tasks]
        lines.append(f"| {name} | " + " | ".join(fmt(a, 3) for a in accs) +
                     f" | {fmt(sum(accs) / len(accs), 3)} |")
    lines += ["", "acc_norm where lm-eval defines it, else acc. Splits: " + ", ".join(
        f"{t}: {next(iter(rows.values()))['tasks'][t].get('split')}" for t in tasks) + "."]
    return lines


def speed_section(model: str, d: dict) -> list[str]:
    lines = [f"### {model}: speed on {d.get('device_name') or d['device']} "
             f"({d['threads']} threads, {d['dtype']}, torch {d['torch_version']})", "",
             f"Parameters {d['params']['base']:,} -> {d['params']['pruned']:,} "
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


def main() -> None:
    head = (ROOT / "bench" / "HEADER.md").read_text()
    parts = [head.rstrip(), ""]
    for title, pattern, fn in [
        ("## Perplexity: SPAP against the baselines", "compare-*.json", compare_section),
        ("## Ablation: what each piece of SPAP contributes", "ablation-*.json", compare_section),
        ("## Zero-shot accuracy", "zeroshot-*.json", zeroshot_section),
        ("## Speed and memory", "speed-*.json", speed_section),
    ]:
        found = load(pattern)
        if not found:
            continue
        parts += [title, ""]
        for model, d in found:
            parts += [*fn(model, d), ""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts).rstrip() + "\n")


if __name__ == "__main__":
    main()
