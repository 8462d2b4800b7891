"""Zero-shot accuracy of the dense model and of pruned models, with lm-eval's standard errors;
writes bench/results/zeroshot-<model>.json.

Either score the very models `spap compare --save-models DIR` saved (same calibration tokens
as the compare table; the default of bench/compare.sh is SAVE_MODELS=DIR):

    .venv/bin/python bench/zeroshot.py smollm2-135m --saved /tmp/models/smollm2-135m \
        --models spap-0.3,obs-ridge-0.3 --tasks piqa,arc_easy,hellaswag,winogrande,boolq \
        --limit 500

or prune in memory here (as spap compare does), with identical calibration tokens:

    .venv/bin/python bench/zeroshot.py smollm2-135m --limit 500 --sparsities 0.3 \
        --methods spap,obs --nsamples 64 --seqlen 512

Each is scored with spap's lm-eval bridge (spap.eval.harness.zero_shot) on the offline task
data.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import spap
from spap.config import CalibConfig
from spap.data import calibration_ids
from spap.eval.harness import zero_shot
from spap.files import write_json_atomic

TASKS = "piqa,hellaswag,winogrande,arc_easy,arc_challenge,boolq,openbookqa,lambada"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--methods", default="spap,obs,fasp")
    ap.add_argument("--sparsities", default="0.3,0.5")
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="auto",
                    help="score every model in this dtype (auto: as loaded; bfloat16 runs "
                         "on a CPU's bf16 matrix units, several times faster than float32)")
    ap.add_argument("--option", action="append", default=[], help="method:key=value")
    ap.add_argument("--saved", default=None,
                    help="folder of models saved by spap compare --save-models")
    ap.add_argument("--models", default=None,
                    help="with --saved: comma-separated subfolder names (e.g. spap-0.3)")
    ap.add_argument("--out", default=None,
                    help="results file (default bench/results/zeroshot-<model>.json)")
    ap.add_argument("--add", action="store_true",
                    help="add these tasks (or these models) to the existing results file "
                         "(same limit and calibration tokens) instead of replacing it; "
                         "models that have every task already are skipped, so a stopped "
                         "run continues where it stopped")
    args = ap.parse_args()

    out = (Path(args.out) if args.out else
           Path(__file__).parent / "results" / f"zeroshot-{args.model}.json")
    dense, tok, _ = spap.load_model(args.model, dtype=args.dtype)
    ids, calib = calibration_ids(tok, CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen))
    tasks = args.tasks.split(",")
    opts: dict[str, dict] = {}
    for item in args.option:
        m, kv = item.split(":", 1)
        k, v = kv.split("=", 1)
        opts.setdefault(m, {})[k] = spap.config._parse_value(v)
    scored = next(dense.parameters()).dtype  # (every model is scored in it)
    dtype = str(scored).removeprefix("torch.")
    result = {"model": args.model, "limit": args.limit, "dtype": dtype, "calibration": calib,
              "models": {}}
    if args.add and out.exists():
        result = json.loads(out.read_text())
        if (result["limit"], result.get("dtype", "float32")) != (args.limit, dtype):
            raise SystemExit(f"{out}: another limit or dtype; --add refused")

    def done(name) -> bool:
        """With --add: this model already has every requested task (a resumed run)."""
        return args.add and set(tasks) <= set(result["models"].get(name, {}).get("tasks", {}))

    def record(name, model, extra):
        if done(name):
            print(name, "already scored on", ",".join(tasks), flush=True)
            return
        t0 = time.perf_counter()
        zs = zero_shot(model, tok, tasks, limit=args.limit, batch_size=args.batch_size)
        result["lm_eval_version"] = zs["lm_eval_version"]
        old = result["models"].get(name, {})
        result["models"][name] = {**old, **extra, "tasks": {**old.get("tasks", {}), **zs["tasks"]},
                                  "seconds": old.get("seconds", 0) + time.perf_counter() - t0}
        # at a small --limit lm-eval's standard error can be NaN (one item): written as null
        write_json_atomic(out, result, nan="null")
        print(name, {t: round(v.get("acc_norm") or v["acc"], 3) for t, v in zs["tasks"].items()},
              flush=True)

    record("dense", dense, {})
    if args.saved:
        for name in args.models.split(","):
            folder = Path(args.saved) / name
            model, _, _ = spap.load_model(str(folder), dtype=args.dtype)
            rep = json.loads((folder / "spap.json").read_text())
            if rep["calibration"].get("token_hash") != result.get("calibration_saved",
                                                                  rep["calibration"]
                                                                  .get("token_hash")):
                raise SystemExit(f"{folder}: other calibration tokens than the models before")
            result["calibration_saved"] = rep["calibration"].get("token_hash")
            # the tokens the saved models were pruned on, not this script's own draw
            result["calibration"] = rep["calibration"]
            record(name, model, {"method": rep["method"], "options": rep["options"],
                                 "sparsity": rep["sparsity_requested"],
                                 "params_removed_frac": rep["params_removed_frac"],
                                 "folder": str(folder)})
        return
    if args.add and result["calibration"].get("token_hash") != calib["token_hash"]:
        raise SystemExit(f"{out}: other calibration tokens; --add refused")
    # pruned from the checkpoint's own dtype, as `spap compare` prunes; scored in --dtype
    source = dense if args.dtype == "auto" else spap.load_model(args.model)[0]
    for s in [float(x) for x in args.sparsities.split(",")]:
        for m in args.methods.split(","):
            model = copy.deepcopy(source)
            res = spap.prune(model, sparsity=s, method=m, method_options=opts.get(m),
                             calib_ids=ids, calib_desc=calib,
                             allow_unsaveable=True)
            model.to(scored)
            record(f"{m} {s:g}", model, {"method": m, "sparsity": s,
                                         "params_removed_frac": res.report["params_removed_frac"]})
            del model
            torch.cuda.empty_cache() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
