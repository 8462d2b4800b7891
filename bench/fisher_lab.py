"""Does a decision weighted by the loss's sensitivity pick masks that hurt the model less?

On Qwen2.5-Coder the mask with the lowest layer error (greedy OBS) did not give the lowest
perplexity: fasp's mask, with higher layer errors, did. The layer's output error counts every
output direction alike, and the loss does not (solvers/weighting.py). This lab measures, on
single real layers, what `out_weight=fisher` changes, by the quantity that matters:

for each chosen decoder layer, that layer alone is pruned (every other layer dense) by each
variant's mask and refit, and the model's perplexity is measured on probe windows from the end
of the evaluation text (no solver sees them). Also reported: the layer's unweighted relative
output error on the same probe windows, and which channels each mask keeps in common.

The Fisher G of every layer comes from one forward and backward pass of the dense model over
the fit windows (the held-out calibration windows choose the ridge, as in a real run).

    OMP_NUM_THREADS=1 .venv/bin/python bench/fisher_lab.py --model smollm2-135m
    OMP_NUM_THREADS=1 .venv/bin/python bench/fisher_lab.py --model qwen2.5-coder-0.5b

Writes bench/results/fisher-lab-<model>.json (or --out).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "src", ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from layer_lab import VARIANTS as LAB_VARIANTS  # noqa: E402
from layer_lab import (  # noqa: E402
    build_problem,
    capture_mlp_inputs,
    dense_layer,
    parse_variant,
    pruned_weights,
    rel_error,
    token_windows,
    zero_pruned,
)

from spap import data  # noqa: E402
from spap.compare import split_variants  # noqa: E402
from spap.driver.records import n_keep_for  # noqa: E402
from spap.driver.sensitivity import output_fisher  # noqa: E402
from spap.eval.ppl import perplexity_of_windows  # noqa: E402
from spap.files import write_json_atomic  # noqa: E402
from spap.modelio.loading import load_model  # noqa: E402
from spap.models import get_adapter  # noqa: E402
from spap.solvers import get_solver  # noqa: E402

VARIANTS = ("obs-ridge=obs:refit=ridge,obs-ridge-fisher=obs:refit=ridge;out_weight=fisher,"
            "fasp-ridge=fasp:refit=ridge,fasp-ridge-fisher=fasp:refit=ridge;out_weight=fisher")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default=None, help="comma-separated (default: 3 over depth)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--probe-windows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--variants", default=VARIANTS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out or ROOT / "bench" / "results" / f"fisher-lab-{args.model}.json")
    t_all = time.perf_counter()
    model, tok, _ = load_model(args.model)
    adapter = get_adapter(model.config)
    blocks = adapter.layers(model)
    n_layers = len(blocks)
    layers = ([int(x) for x in args.layers.split(",")] if args.layers else
              sorted({round(f * (n_layers - 1)) for f in (0.1, 0.5, 0.9)}))
    calib, probe, desc = token_windows(tok, args.nsamples, args.seqlen, args.seed,
                                       args.probe_windows)
    n_held = data.heldout_windows(args.nsamples)
    variants = [parse_variant(v) for v in split_variants(args.variants, LAB_VARIANTS)]
    doc = {"script": "bench/fisher_lab.py",
           "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/fisher_lab.py "
                      + " ".join(argv if argv is not None else sys.argv[1:]),
           "model": args.model, "layers": layers, "sparsity": args.sparsity, "data": desc,
           "what": "one layer pruned (the others dense) by each variant; perplexity on the "
                   "probe windows, the layer's unweighted relative output error on them, "
                   "the share of kept channels each mask has in common with obs-ridge's, and "
                   "the share of the 5% channels with the largest activation norm it keeps",
           "fisher": f"sum of g g^T over the {args.nsamples - n_held} fit windows, g the "
                     "gradient of the summed next-token loss with respect to the layer's "
                     "down-projection output, on the dense model",
           "variants": {n: {"method": m, "options": o} for n, (m, o) in variants},
           "torch": torch.__version__, "platform": platform.platform(), "results": {}}
    t = time.perf_counter()
    doc["dense_probe_ppl"] = perplexity_of_windows(model, probe, batch_size=args.batch)
    fisher = output_fisher(model, adapter, calib[: args.nsamples - n_held],
                           batch_size=args.batch)
    doc["fisher_seconds"] = time.perf_counter() - t
    print(f"dense probe ppl {doc['dense_probe_ppl']:.4f}; fisher {doc['fisher_seconds']:.0f}s",
          flush=True)
    acts = capture_mlp_inputs(model, adapter, torch.cat([calib, probe]), layers, args.batch)
    p_cal = calib.numel()
    for i in layers:
        dense = dense_layer(adapter, blocks[i])
        a = acts[i]
        problem = build_problem(dense, a[:p_cal], n_held * args.seqlen, args.chunk)
        problem.out_weight = fisher[i]
        k = n_keep_for(dense[2].shape[1], args.sparsity)
        saved = {n: p.detach().clone() for n, p in blocks[i].named_parameters()}
        res, keeps = {}, {}
        for name, (method, opts) in variants:
            t = time.perf_counter()
            dec = get_solver(method, **opts).solve(problem, k)
            secs = time.perf_counter() - t
            zero_pruned(adapter, blocks[i], dense, dec)
            ppl = perplexity_of_windows(model, probe, batch_size=args.batch)
            with torch.no_grad():
                for n, p in blocks[i].named_parameters():
                    p.copy_(saved[n])
            keeps[name] = set(dec.keep.tolist())
            res[name] = {"probe_ppl": ppl,
                         "probe_rel_error": rel_error(dense, pruned_weights(dense, dec),
                                                      a[p_cal:], args.chunk),
                         "seconds": secs, "ridge": dec.info.get("ridge")}
        # the channels with the largest activations (the "massive" ones): how many each keeps
        norm = problem.stats.norm
        top = set(torch.topk(norm, max(1, len(norm) // 20)).indices.tolist())
        for name in res:
            res[name]["kept_of_top5pct_norm"] = len(keeps[name] & top) / len(top)
        ref = keeps.get("obs-ridge")
        for name, r in res.items():
            r["kept_in_common_with_obs_ridge"] = (len(keeps[name] & ref) / k if ref else None)
            common = r["kept_in_common_with_obs_ridge"]
            print(f"layer {i:2d} {name:18s} ppl {r['probe_ppl']:.4f}  err "
                  f"{r['probe_rel_error']:.5f}  common "
                  f"{'n/a' if common is None else format(common, '.3f')}"
                  f"  top5% {r['kept_of_top5pct_norm']:.2f}"
                  f"  {r['seconds']:.1f}s", flush=True)
        doc["results"][str(i)] = res
        write_json_atomic(out, doc)
    doc["total_seconds"] = time.perf_counter() - t_all
    write_json_atomic(out, doc)


if __name__ == "__main__":
    main()
