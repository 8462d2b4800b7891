"""The plain-text table `spap bench` prints from a `bench` result.
"""

from __future__ import annotations

from typing import Any


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
