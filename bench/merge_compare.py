"""Merge the records of a second `spap compare` JSON into the first, refusing files whose
protocols differ (other calibration or evaluation tokens, other model): a table may only put
side by side runs that saw the same tokens.
    usage: bench/merge_compare.py MAIN.json EXTRA.json  (MAIN is rewritten; EXTRA removed)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from spap.files import write_json_atomic


def same_tokens(a: dict, b: dict) -> bool:
    """Both runs saw the same calibration, evaluation and probe tokens."""
    pa, pb = a["protocol"], b["protocol"]
    return all((pa.get(x) or {}).get("token_hash") == (pb.get(x) or {}).get("token_hash")
               for x in ("calibration", "eval", "probe"))


# The dense perplexity of two runs on the same tokens agrees up to the order of float sums
# (thread count, library version): 1.6e-5 relative was seen between runs a month apart.
DENSE_RTOL = 1e-4


def same_protocol(a: dict, b: dict) -> bool:
    close = abs(a["dense_ppl"] - b["dense_ppl"]) <= DENSE_RTOL * abs(a["dense_ppl"])
    return a["model"] == b["model"] and close and same_tokens(a, b)


def same_model(r: dict, q: dict) -> bool:
    """Two records of one method and sparsity on the same tokens are one pruned model (a run
    repeated, e.g. with `--also-eval`) when they gave the same perplexity."""
    return (r["ppl"] is not None and q["ppl"] is not None
            and abs(r["ppl"] - q["ppl"]) <= DENSE_RTOL * abs(r["ppl"]))


def fill_second_texts(a: dict, b: dict, have: dict) -> dict[str, str]:
    """A run of EXTRA that MAIN already holds (same method and sparsity) and that gave the same
    perplexity (so the same pruned model, run again with `--also-eval`) lends MAIN's record its
    perplexities on the second texts MAIN lacks, and MAIN takes EXTRA's dense perplexities on
    them. Returns {record: text} of what was filled."""
    filled = {}
    for r in b["records"]:
        mine = have.get((r["method"], r["sparsity"]))
        if mine is None or not same_model(mine, r):
            continue  # not in MAIN, or another model: its second-text figures are not MAIN's
        dense = b.get("dense_ppl_also") or {}
        for text, ppl in (r.get("ppl_also") or {}).items():
            if text in (mine.get("ppl_also") or {}) or text not in dense:
                continue
            mine["ppl_also"] = {**(mine.get("ppl_also") or {}), text: ppl}
            a["dense_ppl_also"] = {text: dense[text], **(a.get("dense_ppl_also") or {})}
            filled[f"{r['method']} @ {r['sparsity']:g}"] = text
    return filled


def main(main_path: str, extra_path: str) -> int:
    a, b = json.loads(Path(main_path).read_text()), json.loads(Path(extra_path).read_text())
    if not same_protocol(a, b):
        print(f"{extra_path}: another protocol than {main_path}; not merged", file=sys.stderr)
        return 2
    have = {(r["method"], r["sparsity"]): r for r in a["records"]}
    a["records"] += [r for r in b["records"] if (r["method"], r["sparsity"]) not in have]
    for name, text in fill_second_texts(a, b, have).items():
        print(f"{main_path}: {name}'s {text} perplexity taken from {extra_path}")
    names = {x["name"] for x in a["variants"]}
    a["variants"] += [v for v in b["variants"] if v["name"] not in names]
    a["sparsities"] = sorted(set(a["sparsities"]) | set(b["sparsities"]))
    write_json_atomic(main_path, a)  # a reader (or a kill) never sees half of MAIN
    Path(extra_path).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
