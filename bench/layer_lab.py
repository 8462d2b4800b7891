"""Single-layer laboratory for SPAP's recovery (solvers/recovery.py): each piece of "recovery at
full strength" measured on real MLP layers before anything changes a default.

For each chosen decoder layer of a real model, one layer problem is built exactly as the
pipeline hands it to a solver (LayerProblem: dense weights, the Gram of the down projection's
input with its held-out part, the MLP inputs and the dense MLP's outputs on them, the last 1/8
of the calibration windows held out), and every variant solves it. What is reported per
variant:

- `probe_rel_error`: ||MLP_pruned(a) - MLP_dense(a)||^2 / ||MLP_dense(a)||^2 on probe windows
  cut from the end of the evaluation text (data.probe_windows), disjoint from every
  calibration token and never seen by any solver: the held-out layer error that decides;
- `heldout_rel_error` / `fit_rel_error`: the same ratio on the solver's own held-out and fit
  calibration windows;
- `seconds`: the solve, split into the decision (the greedy OBS mask, computed once per layer
  and shared by every spap variant, as they share it in a real run) and the rest.

Layer inputs: the dense model's MLP inputs at that layer (captured by a forward pre-hook on
the MLP's first input projection), not the pruned model's; that isolates the layer problem and
costs one dense forward. `--drift` adds item 2 of the issue (the drift target, section 4 of
SPAP_METHOD.md), which needs the pruned model's inputs: layers 0..L-1 are pruned by obs-ridge
first (see `drift_lab`).

Reproduce (OMP_NUM_THREADS=1, one core):

    OMP_NUM_THREADS=1 .venv/bin/python bench/layer_lab.py --model smollm2-135m
    OMP_NUM_THREADS=1 .venv/bin/python bench/layer_lab.py --model qwen2.5-coder-0.5b

Writes bench/results/layer-lab-<model>.json (or --out).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from spap import data  # noqa: E402
from spap.compare import split_variants  # noqa: E402
from spap.config import parse_options  # noqa: E402
from spap.driver.pipeline import StopForward, capture_layer_inputs, forward_to_stop  # noqa: E402
from spap.driver.records import n_keep_for  # noqa: E402
from spap.files import write_json_atomic  # noqa: E402
from spap.modelio.loading import load_model  # noqa: E402
from spap.models import get_adapter  # noqa: E402
from spap.precision import resolve  # noqa: E402
from spap.solvers import get_solver  # noqa: E402
from spap.solvers.base import LayerProblem  # noqa: E402
from spap.solvers.recovery import down_input, mlp_forward  # noqa: E402
from spap.solvers.stats import StatsAccumulator  # noqa: E402

f32, f64 = torch.float32, torch.float64

ALL = {"recovery_steps": 64, "recovery_final_refit": True, "recovery_epochs": 8,
       "recovery_patience": 2, "recovery_shrink": "0.25,0.5,0.75"}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "obs-ridge": ("obs", {"refit": "ridge"}),
    "fasp-ridge": ("fasp", {"refit": "ridge"}),
    "spap": ("spap", {}),
    "spap+steps": ("spap", {"recovery_steps": 64}),
    "spap+final": ("spap", {"recovery_final_refit": True}),
    "spap+epochs": ("spap", {"recovery_epochs": 8, "recovery_patience": 2}),
    "spap+shrink": ("spap", {"recovery_shrink": "0.25,0.5,0.75"}),
    "spap+all": ("spap", ALL),
}


def parse_variant(spec: str) -> tuple[str, tuple[str, dict[str, Any]]]:
    """'name=method:key=value;key=value' (or a name of VARIANTS)."""
    if spec in VARIANTS:
        return spec, VARIANTS[spec]
    name, sep, rest = spec.partition("=")
    if not sep:
        raise SystemExit(f"variant '{spec}': not one of {', '.join(VARIANTS)}; "
                         "write name=method:key=value;key=value")
    method, _, opts = rest.partition(":")
    return name, (method or "spap", parse_options([o for o in opts.split(";") if o.strip()]))


# ---- data -----------------------------------------------------------------------------------
def token_windows(tok, nsamples, seqlen, seed, n_probe):
    calib_text = data.load_text(data.WIKI, "calib")
    calib = data.calibration_windows(data.tokenize(tok, calib_text), nsamples, seqlen, seed)
    test_text = data.load_text(data.WIKI, "test")
    probe = data.probe_windows(data.tokenize(tok, test_text), n_probe, seqlen, skip=0)
    desc = {"calibration": {"source": calib_text.source, "split": calib_text.split,
                            "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                            "heldout_windows": data.heldout_windows(nsamples),
                            "token_hash": data.token_hash(calib)},
            "probe": {"source": test_text.source, "split": test_text.split,
                      "windows": n_probe, "seqlen": seqlen,
                      "taken_from": "the end of the evaluation stream (data.probe_windows)",
                      "token_hash": data.token_hash(probe)}}
    return calib, probe, desc


@torch.no_grad()
def capture_mlp_inputs(model, adapter, ids, layers, batch):
    """{layer: (tokens, d) float32} the dense model's MLP inputs at `layers`, windows in
    order; the forward stops after the last one."""
    out = {i: [] for i in layers}
    last = max(layers)
    blocks = adapter.layers(model)

    def hook(i):
        def fn(_m, a):
            out[i].append(a[0].detach().reshape(-1, a[0].shape[-1]).to(f32).clone())
            if i == last:
                raise StopForward
        return fn

    handles = [next(iter(adapter.in_linears(blocks[i]).values())).register_forward_pre_hook(
        hook(i)) for i in layers]
    try:
        for _ in forward_to_stop(model, ids, ids.device, batch):
            pass
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v) for i, v in out.items()}


# ---- one layer problem ----------------------------------------------------------------------
def dense_layer(adapter, layer):
    ins = adapter.in_linears(layer)
    w_in, b_in = adapter.channel_rows(ins)
    down = adapter.out_linear(layer)
    return ({k: v.detach().to(f64) for k, v in w_in.items()},
            {k: v.detach().to(f64) for k, v in b_in.items()},
            down.weight.detach().to(f64),
            down.bias.detach().to(f64) if down.bias is not None else None,
            adapter.activation(layer), adapter.linear_key)


@torch.no_grad()
def build_problem(dense, a, n_val, chunk, targets=None):
    """The LayerProblem of the pipeline (float32 inputs and targets; float64 weights and
    statistics), held-out rows last. `targets` (tokens, m) replaces the dense MLP's output."""
    w_in, b_in, w_down, b_down, act, lk = dense
    n = w_down.shape[1]
    acc = StatsAccumulator(n, True)
    w32 = {k: v.to(f32) for k, v in w_in.items()}
    b32 = {k: v.to(f32) for k, v in b_in.items()}
    ys = []
    p = a.shape[0]
    edges = list(range(0, p - n_val, chunk)) + list(range(p - n_val, p, chunk)) + [p]
    for s, e in zip(edges[:-1], edges[1:]):
        x = down_input(a[s:e], w32, act, lk, b32)  # (c, n)
        acc.add(x, heldout=s >= p - n_val)
        y = x @ w_down.to(f32).T
        ys.append(y + b_down.to(f32) if b_down is not None else y)
    return LayerProblem(w_down=w_down, w_in=w_in, stats=acc.result(), b_down=b_down, b_in=b_in,
                        inputs=a, targets=torch.cat(ys) if targets is None else targets,
                        linear_key=lk, act=act, heldout_tokens=n_val)


@torch.no_grad()
def pruned_weights(dense, dec):
    w_in, b_in, w_down, b_down, _, _ = dense
    keep = dec.keep
    ins = dec.w_in if dec.w_in is not None else {k: v[keep] for k, v in w_in.items()}
    bd = dec.b_down if dec.b_down is not None else b_down
    return ({k: v.to(f64) for k, v in ins.items()}, {k: v[keep] for k, v in b_in.items()},
            dec.w_down.to(f64), bd)


@torch.no_grad()
def rel_error(dense, pruned, a, chunk, ref=None):
    """||MLP_pruned(a) - ref||^2 / ||ref||^2, ref the dense MLP's output unless given."""
    w_in, b_in, w_down, b_down, act, lk = dense
    pw, pb, pd, pbd = pruned
    num = den = 0.0
    for s in range(0, a.shape[0], chunk):
        aa = a[s:s + chunk].to(f64)
        r = (mlp_forward(aa, w_in, w_down, act, lk, b_in, b_down) if ref is None
             else ref[s:s + chunk].to(f64))
        out = mlp_forward(aa, pw, pd, act, lk, pb, pbd)
        num += float((out - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return num / den if den > 0 else 0.0


def solve_variants(problem, dense, k, variants, a_probe, chunk, log):
    """Every variant on one layer problem: {name: record}. spap variants share one decision
    (the greedy OBS mask), timed once and added to each one's seconds."""
    n_val = problem.heldout_tokens
    p = problem.inputs.shape[0]
    fit, val = problem.inputs[:p - n_val], problem.inputs[p - n_val:]
    shared: dict[str, Any] = {}
    out = {}
    for name, (method, opts) in variants:
        # `compute` is the precision of the products (spap.precision), which the pipeline
        # hands every solver in the layer problem; the rest are the method's options
        opts = dict(opts)
        compute = opts.pop("compute", "float32")
        problem.compute_dtype = resolve(compute, problem.w_down.device).compute
        solver = get_solver(method, **opts)
        extra = 0.0
        if method == "spap":
            orig = solver.decide

            def decide(*args, _orig=orig):
                if "keep" not in shared:
                    t = time.perf_counter()
                    shared["keep"] = _orig(*args)
                    shared["s"] = time.perf_counter() - t
                keep, info = shared["keep"]
                return keep.clone(), dict(info)

            solver.decide = decide
        t0 = time.perf_counter()
        dec = solver.solve(problem, k)
        secs = time.perf_counter() - t0
        if method == "spap":
            extra = shared["s"] if "counted" in shared else 0.0
            shared["counted"] = True
        pw = pruned_weights(dense, dec)
        info = dec.info
        rec = {
            "method": method, "options": opts, "compute": compute,
            "probe_rel_error": rel_error(dense, pw, a_probe, chunk),
            "heldout_rel_error": rel_error(dense, pw, val, chunk),
            "fit_rel_error": rel_error(dense, pw, fit, chunk),
            "seconds": secs + extra,
            "recovery_epochs": info.get("recovery_epochs"),
            "recovery_heldout_loss": info.get("recovery_heldout_loss"),
            "recovery_shrink": info.get("recovery_shrink"),
            "recovery_shrink_heldout_loss": info.get("recovery_shrink_heldout_loss"),
            "ridge": info.get("ridge"),
            "seconds_steps": info.get("seconds"),
        }
        if method == "spap":
            rec["seconds_decision"] = shared["s"]
        out[name] = rec
        log(f"  {name:14s} probe {rec['probe_rel_error']:.5f}  held-out "
            f"{rec['heldout_rel_error']:.5f}  fit {rec['fit_rel_error']:.5f}  "
            f"{rec['seconds']:.1f}s  epochs {rec['recovery_epochs']}  "
            f"shrink {rec['recovery_shrink']}")
    return out


# ---- item 2: the drift target ---------------------------------------------------------------
@torch.no_grad()
def capture_layer0(model, adapter, ids, batch):
    """Per batch: (hidden, args, kwargs) of decoder layer 0 (the driver's capture)."""
    return list(capture_layer_inputs(model, adapter.layers(model)[0], ids, ids.device, batch))


def _out(o):
    return o[0] if isinstance(o, tuple) else o


@torch.no_grad()
def run_layer(adapter, layer, batches):
    """Run `layer` on every batch: (outputs per batch, flat MLP inputs, flat MLP outputs).
    The MLP output is the down projection's output (no bias after it in these families)."""
    mlp_in, mlp_out = [], []
    first = next(iter(adapter.in_linears(layer).values()))
    down = adapter.out_linear(layer)
    hs = [first.register_forward_pre_hook(
              lambda _m, a: mlp_in.append(a[0].reshape(-1, a[0].shape[-1]).clone())),
          down.register_forward_hook(
              lambda _m, _a, o: mlp_out.append(o.reshape(-1, o.shape[-1]).clone()))]
    try:
        outs = [_out(layer(h, *args, **kw)) for h, args, kw in batches]
    finally:
        for h in hs:
            h.remove()
    return outs, torch.cat(mlp_in), torch.cat(mlp_out)


@torch.no_grad()
def zero_pruned(adapter, layer, dense, dec):
    """Write a decision into the layer without slicing: kept rows / columns replaced, pruned
    down columns zeroed (the same function as the cut)."""
    w_in, b_in, w_down, *_ = dense
    keep = dec.keep
    down = adapter.out_linear(layer)
    full = torch.zeros_like(w_down)
    full[:, keep] = dec.w_down.to(f64)
    down.weight.copy_(full.to(down.weight.dtype))
    if dec.w_in is not None:
        new = {k: v.clone() for k, v in w_in.items()}
        for k, v in dec.w_in.items():
            new[k][keep] = v.to(f64)
        adapter.write_in(layer, {k: v.to(down.weight.dtype) for k, v in new.items()},
                         {k: v.to(down.weight.dtype) for k, v in b_in.items()})


def drift_lab(model, adapter, calib, probe, layers, sparsity, alphas, batch, chunk, log,
              variant_opts):
    """Item 2: target(alpha) = y_layer + alpha (y_drift - y_layer), y_layer the dense MLP on
    the pruned model's MLP inputs, y_drift = (dense hidden state after the layer) - (the
    pruned model's residual entering the MLP's addition). Layers before each measured layer are
    pruned by obs-ridge (on their pruned inputs, as the pipeline does). alpha is chosen on the
    held-out calibration windows by the error of the layer's output hidden state against the
    dense model's; the probe windows report it. Assumes out = r + mlp(norm(r)) (LLaMA / Qwen2
    layers: no norm after the MLP)."""
    n_win = calib.shape[0]
    n_held = data.heldout_windows(n_win)
    seqlen = calib.shape[1]
    n_val = n_held * seqlen
    ids = torch.cat([calib, probe])
    pruned_b = capture_layer0(model, adapter, ids, batch)
    dense_b = [(h.clone(), a, k) for h, a, k in pruned_b]
    p_cal = n_win * seqlen
    blocks = adapter.layers(model)
    results = {}
    obs = get_solver("obs", refit="ridge")
    for i in range(max(layers) + 1):
        layer = blocks[i]
        dense = dense_layer(adapter, layer)
        d_out, _, _ = run_layer(adapter, layer, dense_b)
        p_out, a_all, m_out = run_layer(adapter, layer, pruned_b)  # dense layer, pruned inputs
        a_cal, a_probe = a_all[:p_cal], a_all[p_cal:]
        n = dense[2].shape[1]
        k = n_keep_for(n, sparsity)
        if i in layers:
            hd = torch.cat([o.reshape(-1, o.shape[-1]) for o in d_out])  # dense hidden after i
            hp = torch.cat([o.reshape(-1, o.shape[-1]) for o in p_out])
            resid = hp - m_out  # the pruned residual entering the MLP's addition
            drift = hd - resid  # what the MLP must output for the dense hidden state
            res_i = {}
            t_layer = build_problem(dense, a_cal, n_val, chunk)
            y_layer = t_layer.targets
            for vname, opts in variant_opts.items():
                rows = {}
                for alpha in alphas:
                    tgt = y_layer + alpha * (drift[:p_cal] - y_layer)
                    prob = build_problem(dense, a_cal, n_val, chunk, targets=tgt)
                    t0 = time.perf_counter()
                    dec = get_solver("spap", **opts).solve(prob, k)
                    secs = time.perf_counter() - t0
                    pw = pruned_weights(dense, dec)
                    val = slice(p_cal - n_val, p_cal)
                    rows[str(alpha)] = {
                        "hidden_heldout_rel_error": rel_error(
                            dense, pw, a_cal[val], chunk, ref=drift[val]) * _ratio(
                                drift[val], hd[val]),
                        "hidden_probe_rel_error": rel_error(
                            dense, pw, a_probe, chunk, ref=drift[p_cal:]) * _ratio(
                                drift[p_cal:], hd[p_cal:]),
                        "mlp_probe_rel_error": rel_error(dense, pw, a_probe, chunk),
                        "recovery_epochs": dec.info.get("recovery_epochs"),
                        "seconds": secs,
                    }
                    log(f"  drift layer {i} {vname} alpha {alpha}: hidden held-out "
                        f"{rows[str(alpha)]['hidden_heldout_rel_error']:.6f} probe "
                        f"{rows[str(alpha)]['hidden_probe_rel_error']:.6f} mlp probe "
                        f"{rows[str(alpha)]['mlp_probe_rel_error']:.5f}")
                best = min(rows, key=lambda s: rows[s]["hidden_heldout_rel_error"])
                res_i[vname] = {"by_alpha": rows, "chosen_alpha": float(best),
                                "chosen": rows[best]}
            # obs-ridge, the prefix's own method, for reference
            dec = obs.solve(t_layer, k)
            pw = pruned_weights(dense, dec)
            res_i["obs-ridge"] = {"hidden_probe_rel_error": rel_error(
                dense, pw, a_probe, chunk, ref=drift[p_cal:]) * _ratio(drift[p_cal:],
                                                                     hd[p_cal:]),
                "mlp_probe_rel_error": rel_error(dense, pw, a_probe, chunk)}
            res_i["dense_mlp_hidden_probe_rel_error"] = float(
                (m_out[p_cal:] - drift[p_cal:]).double().pow(2).sum()
                / hd[p_cal:].double().pow(2).sum())
            results[str(i)] = res_i
        if i == max(layers):
            break
        # prune layer i by obs-ridge on its pruned inputs, then advance both streams
        prob = build_problem(dense, a_cal, n_val, chunk)
        prob.inputs = prob.targets = None  # obs needs only the statistics
        zero_pruned(adapter, layer, dense, obs.solve(prob, k))
        pruned_b = [(_out(layer(h, *a, **kw)), a, kw) for h, a, kw in pruned_b]
        dense_b = [(o, a, kw) for o, (_, a, kw) in zip(d_out, dense_b)]
        log(f"  drift: layer {i} pruned by obs-ridge")
    return results


def _ratio(num_ref, den_ref):
    """||num_ref||^2 / ||den_ref||^2: turns an error relative to the MLP's drift target into
    one relative to the dense hidden state (the residual cancels in the difference)."""
    d = float(den_ref.double().pow(2).sum())
    return float(num_ref.double().pow(2).sum()) / d if d > 0 else 0.0


# ---- main -----------------------------------------------------------------------------------
def table(doc) -> str:
    """Markdown: probe error (and seconds) per layer and variant, with each variant's ratio to
    plain spap (or, without it, the first variant) and its wins against it."""
    layers = sorted(doc["layers_results"], key=int)
    names = list(doc["variants"])
    base = "spap" if "spap" in names else names[0]  # the reference of the last two columns
    head = "| variant | " + " | ".join(f"layer {i} probe (s)" for i in layers) + \
        f" | mean ratio to {base} | layers better than {base} |"
    rows = [head, "|" + "---|" * (len(layers) + 3)]
    for nm in names:
        cells, ratios, wins = [], [], 0
        for i in layers:
            v = doc["layers_results"][i]["variants"].get(nm)
            ref = doc["layers_results"][i]["variants"].get(base)
            if v is None:
                cells.append("")
                continue
            cells.append(f"{v['probe_rel_error']:.5f} ({v['seconds']:.0f})")
            if ref:
                ratios.append(v["probe_rel_error"] / ref["probe_rel_error"])
                wins += v["probe_rel_error"] < ref["probe_rel_error"]
        mean = f"{sum(ratios) / len(ratios):.4f}" if ratios else ""
        rows.append(f"| {nm} | " + " | ".join(cells) + f" | {mean} | {wins}/{len(ratios)} |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default=None,
                    help="comma-separated decoder layers (default: 3 spread over the depth)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--probe-windows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8, help="windows per forward batch")
    ap.add_argument("--chunk", type=int, default=4096, help="tokens per chunk of the sums")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="names of VARIANTS or name=method:key=value;key=value")
    ap.add_argument("--drift", default=None,
                    help="comma-separated layers for the drift-target experiment (item 2)")
    ap.add_argument("--alphas", default="0,0.25,0.5,1")
    ap.add_argument("--drift-variants", default="spap",
                    help="spap variants (names of VARIANTS) solved with the drift targets")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--merge", action="store_true",
                    help="update the variants (and drift) of an existing result file, keeping "
                         "the rest; the command is appended to its `commands`")
    ap.add_argument("--table", default=None, metavar="FILE",
                    help="print a result file's table (markdown) and exit")
    args = ap.parse_args(argv)
    if args.table:
        import json

        print(table(json.loads(Path(args.table).read_text())))
        return
    torch.set_num_threads(args.threads)
    out_path = Path(args.out or ROOT / "bench" / "results" / f"layer-lab-{args.model}.json")

    def log(msg):
        print(msg, flush=True)

    t_all = time.perf_counter()
    model, tok, _ = load_model(args.model)
    adapter = get_adapter(model.config)
    n_layers = len(adapter.layers(model))
    layers = ([int(x) for x in args.layers.split(",")] if args.layers else
              sorted({round(f * (n_layers - 1)) for f in (0.1, 0.5, 0.9)}))
    calib, probe, desc = token_windows(tok, args.nsamples, args.seqlen, args.seed,
                                       args.probe_windows)
    n_val = data.heldout_windows(args.nsamples) * args.seqlen
    variants = [parse_variant(v) for v in split_variants(args.variants, VARIANTS)]
    doc = {
        "script": "bench/layer_lab.py",
        "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/layer_lab.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "layers": layers, "n_layers": n_layers,
        "sparsity": args.sparsity, "data": desc,
        "layer_inputs": "the dense model's MLP inputs at each layer (forward pre-hook on the "
                        "MLP's first input projection); targets: the dense MLP on them",
        "heldout": f"the last {data.heldout_windows(args.nsamples)} of {args.nsamples} "
                   "calibration windows (data.heldout_windows)",
        "errors": "||MLP_pruned(a) - MLP_dense(a)||^2 / ||MLP_dense(a)||^2; probe = windows "
                  "from the evaluation text, never seen by a solver",
        "seconds": "one solve on one CPU thread (torch.set_num_threads(1)); spap variants "
                   "share one decision, whose time is counted in each",
        "variants": {name: {"method": m, "options": o} for name, (m, o) in variants},
        "torch": torch.__version__, "platform": platform.platform(),
        "threads": args.threads, "layers_results": {},
    }
    if args.merge and out_path.exists():
        import json

        old = json.loads(out_path.read_text())
        for key in ("data", "model", "sparsity"):
            if old.get(key) != doc[key]:
                raise SystemExit(f"--merge: {key} differs from {out_path}'s")
        old.setdefault("commands", [old["command"]]).append(doc["command"])
        old["variants"].update(doc["variants"])
        old["layers"] = sorted(set(old["layers"]) | set(layers))
        doc = old
    if variants:
        t = time.perf_counter()
        acts = capture_mlp_inputs(model, adapter, torch.cat([calib, probe]), layers,
                                  args.batch)
        doc["capture_seconds"] = time.perf_counter() - t
        p_cal = calib.numel()
        for i in layers:
            log(f"layer {i}")
            dense = dense_layer(adapter, adapter.layers(model)[i])
            a = acts[i]
            problem = build_problem(dense, a[:p_cal], n_val, args.chunk)
            problem.window_tokens = args.seqlen  # (as the pipeline sets it)
            k = n_keep_for(dense[2].shape[1], args.sparsity)
            res = solve_variants(problem, dense, k, variants, a[p_cal:], args.chunk, log)
            slot = doc["layers_results"].setdefault(
                str(i), {"width": dense[2].shape[1], "kept": k, "variants": {}})
            slot["variants"].update(res)
            write_json_atomic(out_path, doc)
        del acts
    if args.drift:
        names = [v for v in args.drift_variants.split(",") if v]
        doc["drift"] = {
            "what": "target = y_layer + alpha (y_drift - y_layer); y_drift = dense hidden "
                    "state after the layer - the pruned model's residual entering the MLP's "
                    "addition; layers before it pruned by obs-ridge; alpha chosen on the "
                    "held-out calibration windows by the output hidden state's error against "
                    "the dense model's; errors relative to ||dense hidden state||^2",
            "alphas": [float(x) for x in args.alphas.split(",")],
            "layers": {}}
        doc["drift"]["variants"] = {nm: VARIANTS[nm][1] for nm in names}
        doc["drift"]["layers"] = drift_lab(
            model, adapter, calib, probe, [int(x) for x in args.drift.split(",")],
            args.sparsity, doc["drift"]["alphas"], args.batch, args.chunk, log,
            {nm: VARIANTS[nm][1] for nm in names})
    doc["total_seconds" if "commands" not in doc else f"total_seconds_{len(doc['commands'])}"] = (
        time.perf_counter() - t_all)
    write_json_atomic(out_path, doc)
    log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
