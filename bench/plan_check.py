"""`spap plan`'s memory model against measured peaks, step by step, on the CPU.

Each case runs the driver (`driver.pipeline.prune_layers`) on a model of real shapes with
random weights and random calibration ids, while a thread samples the process's anonymous
resident memory (RssAnon: the tensors, not the pages of torch's libraries, which a new op
pages in as it first runs) every few milliseconds; the driver's steps are told apart by
wrapping the functions that start them (capture, collect, decision, refit, recovery,
replay), so every sample is counted to the step that was running. A step's
measured peak is its largest sample less a baseline: the sample after the model was built
less the model's own bytes (Python, torch, and what loading left behind); glibc is told to
map every allocation over 1 MiB on its own (mallopt's M_MMAP_THRESHOLD), so freed tensors
leave the resident set as they do on a device. The prediction is `spap.plan`'s host bytes for the
same settings on a CPU device. Both go to bench/results/plan-check-<case>.json.

Cases:
  llama8b-layer  one decoder layer of Llama-3.1-8B's shape (hidden 4096, width 14336, 32
                 heads, 8 KV heads; a vocabulary of 1024 so the embeddings stay small),
                 float32, the recipe with the drift target and recovery (64 Adam steps per
                 epoch, minibatches of up to 1024 tokens). Calibration 8 x 2048 tokens by
                 default (128 x 2048 needs ~40 GB on a CPU in float32); one recovery epoch,
                 since recovery's memory does not depend on the number of steps.
  smollm2        SmolLM2-135M (the offline alias, real weights), whole run, 16 x 256 tokens.
  llama8b-recovery  recovery (`solvers.recovery.recover`) alone at the same layer's shape: its
                 inputs and targets in float32 as the pipeline holds them on a CPU, the kept
                 weights, one epoch of 64 Adam steps; against the plan's recovery terms
                 (weights, Adam's moments and gradients, the float64 closed form). The layer
                 case runs without recovery: with it, a CPU needs ~16 GiB at this shape.
  cuts           the solver's memory cuts at a real MLP shape (--shape): the Gram accumulation
                 (four windows of 2048 tokens, the last two held out), SPAP's solve with the drift
                 target up to recovery's start, and what is alive when recovery starts; run
                 with this code and with an earlier commit's (`--use-path`) to compare.

    OMP_NUM_THREADS=1 nohup .venv/bin/python bench/plan_check.py --case llama8b-layer &

`--no-plan` only measures (for the code of an earlier commit, to measure a memory cut:
PYTHONPATH at that commit's src/, `--label before`).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if "--use-path" not in sys.argv and str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

GIB = 2**30
#: the recipe whose memory is checked: the drift target and recovery's Adam steps
RECIPE = {"refit_target": "drift", "recovery_steps": 64, "recovery_batch": 1024}

CASES = {
    "llama8b-layer": {"config": "bench/configs/llama-3.1-8b.json", "layers": 1, "vocab": 1024,
                      "nsamples": 8, "seqlen": 2048, "batch_size": 4, "epochs": 1,
                      "options": {"recovery": "none"}},
    # small enough for a test, large enough that every term is megabytes
    "tiny": {"config": "bench/configs/llama-3.1-8b.json", "layers": 1, "vocab": 512,
             "shape": {"hidden_size": 256, "intermediate_size": 2048, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "head_dim": 64},
             "nsamples": 8, "seqlen": 256, "batch_size": 4, "epochs": 1},
    "smollm2": {"alias": "smollm2-135m", "nsamples": 16, "seqlen": 256, "batch_size": 4,
                "epochs": 1},
}


MMAP_THRESHOLD = 1 << 20


def map_large_allocations() -> bool:
    """glibc maps every allocation of MMAP_THRESHOLD bytes or more on its own (mallopt), so
    a freed tensor leaves the resident set at once; False where that is not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return False
    return bool(mallopt is not None and mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD


def anon_rss() -> int:
    """The process's anonymous resident memory (bytes)."""
    with open("/proc/self/status") as f:
        return int(re.search(r"RssAnon:\s+(\d+)", f.read()).group(1)) * 1024


class StepSampler:
    """RSS samples counted to the step that is running (`step`), peak per step."""

    def __init__(self, interval: float = 0.004):
        self.interval = interval
        self.step = "start"
        self.peaks: dict[str, int] = {}
        self.order: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        rss = anon_rss()
        step = self.step
        if step not in self.peaks:
            self.order.append(step)
        self.peaks[step] = max(self.peaks.get(step, 0), rss)

    def enter(self, step: str) -> str:
        self.sample()
        before, self.step = self.step, step
        self.sample()
        return before

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _wrap(owner, name: str, sampler: StepSampler, step: str, restore: bool = False) -> None:
    """owner.name runs as `step` (back to the caller's step afterwards when `restore`)."""
    fn = getattr(owner, name)

    from spap.memory import trim_host_heap

    @functools.wraps(fn)
    def inner(*a, **kw):
        # (what the last step freed back to the OS first, so that a step's peak is what is
        # alive in it, not the heap the one before left behind)
        trim_host_heap()
        before = sampler.enter(step)
        try:
            return fn(*a, **kw)
        finally:
            if restore:
                sampler.enter(before)

    setattr(owner, name, inner)


def instrument(sampler: StepSampler) -> None:
    from spap.driver import pipeline
    from spap.memory import trim_host_heap
    from spap.solvers.spap import SpapSolver

    _wrap(pipeline, "capture_stores", sampler, "capture")
    _wrap(pipeline, "_prune_one", sampler, "collect")
    _wrap(SpapSolver, "solve", sampler, "decision")
    _wrap(SpapSolver, "refit_kept", sampler, "refit")
    _wrap(SpapSolver, "recover", sampler, "recovery")
    _wrap(pipeline, "apply_decision", sampler, "replay")
    # freed heap back to the OS between layers, as spap's own runs do
    trim = pipeline._propagate

    def propagate(*a, **kw):
        trim_host_heap()
        return trim(*a, **kw)

    pipeline._propagate = propagate


def _config(case: dict[str, Any]):
    from transformers import AutoConfig

    if "alias" in case:
        from spap.plan import model_config

        return model_config(case["alias"])
    spec = json.loads((ROOT / case["config"]).read_text())
    for key in ("torch_dtype", "dtype", "architectures"):
        spec.pop(key, None)
    model_type = spec.pop("model_type")
    spec.update(num_hidden_layers=case["layers"], vocab_size=case["vocab"], bos_token_id=1,
                eos_token_id=2, **case.get("shape", {}))
    return AutoConfig.for_model(model_type, **spec)


def build(case: dict[str, Any]):
    from transformers import AutoModelForCausalLM

    if "alias" in case:
        from spap.modelio.loading import load_model

        model, _, _ = load_model(case["alias"], "float32", "cpu")
        for prm in model.parameters():  # out of the mmapped checkpoint, into anonymous memory
            prm.data = prm.data.clone()
        return model, model.config
    config = _config(case)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model, config


def _warm_up(case: dict[str, Any]) -> None:
    """The same recipe once on a 1-layer model of a few channels, so that the baseline holds
    what any run holds besides its tensors (the modules it imports, the kernels' workspaces,
    the thread pools) and the measured peaks are the run's tensors."""
    from spap.config import PruneConfig
    from spap.driver.pipeline import prune_layers
    from spap.models import get_adapter
    from spap.solvers import get_solver

    small = {**case, "layers": 1, "vocab": 64, "shape": {
        "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16}}
    small.pop("alias", None)
    small.setdefault("config", "bench/configs/llama-3.1-8b.json")
    model, config = build(small)
    options = {**RECIPE, "recovery_epochs": 1, **case.get("options", {})}
    cfg = PruneConfig(method="spap", method_options=options, nsamples=8, seqlen=16,
                      batch_size=4, device="cpu", dtype="float32", compute="float32")
    calib = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    prune_layers(model, get_adapter(config), calib, get_solver("spap", **options), cfg,
                 device="cpu")


def run(case_name: str, label: str, with_plan: bool, nsamples: int | None,
        seqlen: int | None) -> dict[str, Any]:
    """`_run` on one thread, as the plan's terms count a step's temporaries (several threads
    add their own workspaces), and as the results files were measured; the caller's thread
    count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(case_name, label, with_plan, nsamples, seqlen)
    finally:
        torch.set_num_threads(threads)


def _run(case_name: str, label: str, with_plan: bool, nsamples: int | None,
         seqlen: int | None) -> dict[str, Any]:
    from spap.config import PruneConfig
    from spap.driver.pipeline import prune_layers
    from spap.memory import trim_host_heap
    from spap.models import get_adapter
    from spap.solvers import get_solver

    map_large_allocations()
    case = dict(CASES[case_name])
    case["nsamples"] = nsamples or case["nsamples"]
    case["seqlen"] = seqlen or case["seqlen"]
    _warm_up(case)
    model, config = build(case)
    trim_host_heap()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rss0 = anon_rss() - weights
    options = {**RECIPE, "recovery_epochs": case["epochs"], **case.get("options", {})}
    cfg = PruneConfig(method="spap", method_options=options, nsamples=case["nsamples"],
                      seqlen=case["seqlen"], batch_size=case["batch_size"], device="cpu",
                      dtype="float32", compute="float32")  # (the float32 path, as planned)
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, config.vocab_size, (cfg.nsamples, cfg.seqlen), generator=g)
    solver = get_solver("spap", **options)
    sampler = StepSampler()
    instrument(sampler)
    sampler.enter("load")
    sampler.start()
    t0 = time.perf_counter()
    records = prune_layers(model, get_adapter(config), calib, solver, cfg, device="cpu")
    secs = time.perf_counter() - t0
    sampler.stop()
    measured = {s: sampler.peaks[s] - rss0 for s in sampler.order}
    out: dict[str, Any] = {
        "case": case_name, "label": label, "case_settings": case, "recipe": options,
        "threads": torch.get_num_threads(), "seconds": secs, "baseline_bytes": rss0,
        "weight_bytes": weights,
        "kept": records[0].kept, "width": records[0].width_before,
        "measured_step_peak_bytes": measured,
        "measured_peak_bytes": max(measured.values()),
        "layer_info": {k: v for k, v in records[0].info.items()
                       if isinstance(v, (int, float, str))},
    }
    if with_plan:
        out.update(compare(config, cfg, measured))
    return out


def recompare(path: Path) -> dict[str, Any]:
    """A saved measurement's predictions again, from the plan as it is now (the measured
    peaks unchanged)."""
    from spap.config import PruneConfig

    res = json.loads(path.read_text())
    case = res["case_settings"]
    config = _config(case)
    cfg = PruneConfig(method="spap", method_options=res["recipe"], nsamples=case["nsamples"],
                      seqlen=case["seqlen"], batch_size=case["batch_size"], device="cpu",
                      dtype="float32", compute="float32")  # (the float32 path, as planned)
    res.update(compare(config, cfg, res["measured_step_peak_bytes"]))
    return res


def compare(config, cfg, measured: dict[str, int]) -> dict[str, Any]:
    """The plan's host bytes per step for the same settings on a CPU, beside the measured."""
    from spap.plan import plan, shapes_of

    p = plan(shapes_of(config), cfg, "cpu-fp32")
    predicted = {s.name: s.host_bytes for s in p.steps}
    # collect and the dense stream's forward are interleaved per batch: one measured step
    pairs = {"capture": ["capture"], "collect": ["collect", "dense stream"],
             "decision": ["decision"], "refit": ["refit"],
             "recovery": ["recovery"], "replay": ["replay"]}
    rows = {}
    for step, names in pairs.items():
        if step not in measured:
            continue
        pred = max(predicted.get(nm, 0) for nm in names)
        rows[step] = {"measured_bytes": measured[step], "predicted_bytes": pred,
                      "ratio": measured[step] / pred if pred else None}
    run_steps = [s for s in pairs if s in measured]
    peak_pred = max(rows[s]["predicted_bytes"] for s in run_steps)
    peak_meas = max(measured[s] for s in run_steps)
    return {"plan": p.to_json(), "steps": rows,
            "peak": {"measured_bytes": peak_meas, "predicted_bytes": peak_pred,
                     "ratio": peak_meas / peak_pred},
            "within_20_percent": all(abs(r["ratio"] - 1) <= 0.2 for r in rows.values()
                                     if r["ratio"] is not None)}


def recovery_case(label: str, nsamples: int | None, seqlen: int | None) -> dict[str, Any]:
    """recover() alone at Llama-3.1-8B's MLP shape (case llama8b-recovery)."""
    from spap.config import PruneConfig
    from spap.driver.records import n_keep_for
    from spap.memory import trim_host_heap
    from spap.solvers.recovery import recover

    d, n = 4096, 14336
    ns, sl = nsamples or 8, seqlen or 2048
    cfg = PruneConfig(method="spap", method_options={**RECIPE, "recovery_epochs": 1},
                      nsamples=ns, seqlen=sl, dtype="float32", device="cpu")
    k = n_keep_for(n, cfg.sparsity)
    tokens, n_val = ns * sl, (ns // 8 or 1) * sl
    map_large_allocations()
    trim_host_heap()
    rss0 = anon_rss()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(tokens, d, generator=g)
    y = torch.randn(tokens, d, generator=g)
    w_in = {"gate": torch.randn(k, d, generator=g) / d**0.5,
            "up": torch.randn(k, d, generator=g) / d**0.5}
    w_down = torch.randn(d, k, generator=g) / k**0.5
    held = sum(t.numel() * 4 for t in (a, y, w_down, *w_in.values()))
    sampler = StepSampler()
    sampler.enter("recovery")
    sampler.start()
    t0 = time.perf_counter()
    recover(a, y, w_in, w_down, torch.nn.functional.silu, "up", n_val,
            w_down_dense=w_down.clone(), ridge=0.1, epochs=1, lr=0.02, batch=1024,
            steps=RECIPE["recovery_steps"])
    secs = time.perf_counter() - t0
    sampler.stop()
    measured = sampler.peaks["recovery"] - rss0
    out = {"case": "llama8b-recovery", "label": label, "tokens": tokens, "kept": k,
           "seconds": secs, "held_bytes": held, "measured_bytes": measured}
    from spap.plan import Shapes, plan

    shapes = Shapes("llama", 1, d, n, d, 2, 0, 0, 1024, d, 128)
    step = next(s for s in plan(shapes, cfg, "cpu-fp32").steps if s.name == "recovery")
    terms = {name: b for name, b in step.host.items() if name.startswith(
        ("weights (float32)", "Adam", "largest of"))}
    # the caller's inputs, targets and weights, and the dense down projection passed in
    pred = held + 4 * d * k + sum(terms.values())
    out.update(predicted_terms=terms, predicted_bytes=pred, ratio=out["measured_bytes"] / pred)
    return out


class _AtRecovery(Exception):
    pass


#: MLP shapes (hidden, width) of the cuts case
SHAPES = {"llama-3.1-8b": (4096, 14336), "qwen2.5-0.5b": (896, 4864)}


def cuts_case(label: str, shape: str = "llama-3.1-8b") -> dict[str, Any]:
    """The solver's memory at a real MLP shape (case cuts): Gram accumulation, the solve up
    to recovery, and what is alive when recovery starts."""
    import spap.solvers.spap as spap_mod
    from spap.memory import trim_host_heap
    from spap.solvers import get_solver
    from spap.solvers.base import LayerProblem
    from spap.solvers.stats import DriftStats, StatsAccumulator

    d, n = SHAPES[shape]
    m = d
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"case": "cuts", "label": label, "shape": shape, "hidden": d,
                           "width": n}
    map_large_allocations()
    trim_host_heap()
    rss0 = anon_rss()
    acc = StatsAccumulator(n, True)
    x = torch.randn(2048, n, generator=g)
    sampler = StepSampler()
    sampler.enter("accumulate")
    sampler.start()
    for held in (False, False, True, True):
        acc.add(x, heldout=held)
    stats = acc.result(DriftStats(torch.randn(m, n, generator=g, dtype=torch.float64) * 1e-3,
                                  1.0, 10.0, torch.randn(m, n, generator=g,
                                                         dtype=torch.float64) * 1e-3, 0.1, 1.0))
    del x
    tokens, n_val = 2048, 256
    problem = LayerProblem(
        w_down=torch.randn(m, n, generator=g, dtype=torch.float64) / n**0.5,
        w_in={"gate": torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5,
              "up": torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5},
        stats=stats, b_down=None, b_in={}, linear_key="up", act=torch.nn.functional.silu)
    problem.inputs = torch.randn(tokens, d, generator=g)
    problem.targets = torch.randn(tokens, m, generator=g)
    problem.drift = torch.randn(tokens, m, generator=g) * 0.1
    problem.heldout_tokens = n_val
    trim_host_heap()
    sampler.enter("before solve")
    entry: dict[str, int] = {}

    def stop(*_a, **_k):
        entry["bytes"] = anon_rss() - rss0
        raise _AtRecovery

    spap_mod.recover = stop
    solver = get_solver("spap", **RECIPE, recovery_epochs=1)
    sampler.enter("solve")
    t0 = time.perf_counter()
    try:
        solver.solve(problem, n - round(0.3 * n))
    except _AtRecovery:
        pass
    sampler.stop()
    out["seconds"] = time.perf_counter() - t0
    out["peak_bytes"] = {k: v - rss0 for k, v in sampler.peaks.items()}
    out["alive_at_recovery_start_bytes"] = entry.get("bytes")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=sorted([*CASES, "llama8b-recovery", "cuts"]))
    ap.add_argument("--recompare", default=None, metavar="JSON",
                    help="a saved result's predictions again from the plan as it is now")
    ap.add_argument("--label", default="", help="a name for this code (e.g. before, after)")
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--no-plan", action="store_true", help="measure only (older code)")
    ap.add_argument("--use-path", action="store_true",
                    help="import spap from PYTHONPATH, not from this checkout")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b",
                    help="the MLP shape of the cuts case")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not (args.case or args.recompare):
        ap.error("give --case or --recompare")
    if args.recompare:
        res = recompare(Path(args.recompare))
        Path(args.recompare).write_text(json.dumps(res, indent=1))
        print(json.dumps({"steps": res["steps"], "peak": res["peak"]}, indent=1))
        return 0
    if args.case in ("llama8b-recovery", "cuts"):
        res = (recovery_case(args.label, args.nsamples, args.seqlen)
               if args.case == "llama8b-recovery" else cuts_case(args.label, args.shape))
        name = (f"plan-check-{args.case}" + (f"-{args.shape}" if args.case == "cuts" else "")
                + (f"-{args.label}" if args.label else "") + ".json")
        out = Path(args.out) if args.out else ROOT / "bench" / "results" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k != "predicted_terms"}, indent=1))
        return 0
    res = run(args.case, args.label, not args.no_plan, args.nsamples, args.seqlen)
    name = f"plan-check-{args.case}" + (f"-{args.label}" if args.label else "") + ".json"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    for step, b in res["measured_step_peak_bytes"].items():
        row = res.get("steps", {}).get(step)
        pred = (f"  predicted {row['predicted_bytes'] / GIB:6.2f} GiB  ratio "
                f"{row['ratio']:.3f}" if row and row["ratio"] is not None else "")
        print(f"{step:12s} measured {b / GIB:6.2f} GiB{pred}")
    print(f"wrote {out} ({res['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
