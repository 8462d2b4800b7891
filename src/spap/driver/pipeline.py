"""The one sequential layer-by-layer driver (SparseGPT / Wanda / FLAP practice).

1. Capture the inputs of decoder layer 0 generically: a forward pre-hook (with kwargs) stops
   the model's forward and keeps the hidden states and whatever else the layer is called with
   (position embeddings, masks), so no model-specific forward is re-implemented.
2. For each layer, on the compute device:
   - collect: run the layer on the calibration batch, accumulating statistics of the down
     projection's input (the Gram matrix when the solver needs it) and, for solvers that refit
     input projections, the MLP inputs;
   - solve: the solver sees only tensors and returns the kept channels and new weights;
   - cut: slice the weights physically;
   - replay: run the pruned layer so the next layer sees pruned inputs, and measure the
     relative error of the MLP output against a copy of the dense MLP on the same inputs.
Optional probe windows are captured and carried along like the calibration batches but only
run at replay, after the cut: they never enter the statistics or the solver, so the error
measured on them is a held-out estimate of each layer's error (the calibration one is
in-sample, and the solver minimised it).
Only the current layer sits on the compute device; the rest of the model stays where it is.

Held-out calibration windows: the last `data.heldout_windows(nsamples)` windows (1/8) are
batched apart from the others, so every batch is either fit or held out; their statistics
(the held-out parts of `ActStats`) and their rows of the recovery inputs
(`LayerProblem.heldout_tokens`) let a solver choose a setting out of sample, for a mask chosen
from the fit windows alone (`ActStats.fit`). Windows never overlap (`data.calibration_windows`),
so held-out and fit tokens are disjoint.

Memory: the calibration and probe inputs of the current layer live in an `ActivationStore`, on
the device or (when they would not fit, or when asked) in host memory, streamed to the device
a batch at a time; each layer's outputs overwrite its inputs batch by batch, so one copy
exists at a time. Where each layer's weights come from is a `stores.LayerSource` and where
finished layers go a `stores.LayerSink` (the model itself, a checkpoint read layer by layer,
the resume folder): the driver calls both the same way whichever it has. A sink that holds
finished layers of an interrupted run gives them back pruned; they are run again, unchanged,
to rebuild the next inputs.

Precision (precision.py, `PruneConfig.compute`): every forward of a layer (collect, the dense
stream, replay, probes, the Fisher pass; not the head step, whose solver runs inside it) runs
under autocast to the resolved compute dtype, bf16 where the device multiplies it fast; the
statistics are summed outside autocast (float32 products, float64 sums), and the solver runs
outside it too, told the compute dtype through `LayerProblem.compute_dtype`. The drift
target's check runs in the model's own dtype. The model's weights and the activations passed
between layers keep the checkpoint's dtype.

Data parallel (`shard`, see distributed.py): each rank keeps only its share of the fit,
held-out and probe windows (`Shard.share` of each), runs the layers on those alone, and sums
every statistic and error over the ranks before it is used; the decision is then broadcast
from rank 0, so every rank's model stays the same model. With one process nothing changes.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PruneConfig
from ..data import heldout_windows
from ..distributed import LOCAL, Shard
from ..errors import SpapError
from ..models import get_attention_adapter
from ..models.base import MLPAdapter
from ..precision import FLOAT32, Precision, exact, resolve
from ..solvers import HEAD_DEFAULTS, get_head_solver  # noqa: F401 (HEAD_DEFAULTS: report.py)
from ..solvers.base import LayerProblem, Solver
from ..solvers.heads import HeadLayout, HeadSolver, keep_counts
from ..solvers.presets import FALLBACK, effort_for
from ..solvers.stats import DriftAccumulator, StatsAccumulator, reduce_stats
from .activations import (
    ActivationStore,
    StopForward,
    choose_offload,
    resident_bytes,
    row_bytes,
    tensor_bytes,
)
from .heads import prune_layer_heads
from .records import LayerRecord, n_keep_for
from .stores import IN_MODEL, LayerSink, LayerSource
from .surgery import apply_decision, solve_layer

log = logging.getLogger(__name__)



def forward_to_stop(model, ids: torch.Tensor, device, batch_size: int) -> Iterator[None]:
    """Run the model on `ids` batch by batch, each forward ended by a hook raising
    StopForward (or run to the end); yields once after each batch."""
    for batch in ids.split(batch_size):
        try:
            model(batch.to(device), use_cache=False)
        except StopForward:
            pass
        yield


def _move_outside_layers(model: nn.Module, layers: nn.ModuleList, device) -> None:
    """Move every parameter and buffer that is not inside a decoder layer (embeddings,
    rotary tables, final norm, head) to `device`."""
    inside = {id(m) for m in layers.modules()}
    for m in model.modules():
        if id(m) in inside:
            continue
        for p in m.parameters(recurse=False):
            p.data = p.data.to(device)
        for name, b in list(m.named_buffers(recurse=False)):
            m._buffers[name] = b.to(device)


def capture_layer_inputs(model, layer0: nn.Module, ids: torch.Tensor, device,
                         batch_size: int) -> Iterator[tuple[torch.Tensor, tuple, dict]]:
    """Yield (hidden_states, other positional args, kwargs) of layer 0, one batch at a time."""
    captured: list[tuple[torch.Tensor, tuple, dict]] = []

    def hook(_mod, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, tuple(args[1:]), kwargs))
        raise StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for _ in forward_to_stop(model, ids, device, batch_size):
            yield captured.pop()
    finally:
        handle.remove()


@torch.no_grad()
def capture_stores(model, layer0: nn.Module, calib: torch.Tensor | list[torch.Tensor],
                   probe: torch.Tensor | None, device: torch.device, batch_size: int,
                   offload: str = "auto", copies: int = 1, resident: int = 0,
                   follow: int = 0) -> tuple[ActivationStore, ActivationStore | None]:
    """Layer 0's inputs for the calibration and probe windows, each in an ActivationStore.
    `calib` may be a list of window tensors (e.g. fit and held-out windows), each batched on
    its own and stored in order. Where the activations live is decided from the first batch's
    size times the number of tokens (`activations.choose_offload`), before the rest is
    captured: `copies` of them (2 when a dense stream is carried beside) and `follow` bytes
    that go where they go (recovery's rows), with `resident` bytes that the layer's steps
    hold on the device anyway."""
    parts = [p for p in (calib if isinstance(calib, (list, tuple)) else [calib]) if p.numel()]
    tokens = sum(p.numel() for p in parts) + (probe.numel() if probe is not None else 0)
    store: ActivationStore | None = None
    for part in parts:
        for b in capture_layer_inputs(model, layer0, part, device, batch_size):
            if store is None:  # the first batch tells the size of them all
                per_token = tensor_bytes(b) / b[0].shape[:-1].numel()
                store = ActivationStore(device, choose_offload(
                    offload, device, copies * int(per_token * tokens) + follow,
                    resident=resident))
            store.append(*b)
            del b
    assert store is not None, "no calibration windows"
    offload_now = store.offload
    probes = None
    if probe is not None:
        probes = ActivationStore(device, offload_now)
        # (a rank of a data-parallel run may own no probe window: an empty store)
        for b in (capture_layer_inputs(model, layer0, probe, device, batch_size)
                  if probe.numel() else ()):
            probes.append(*b)
    return store, probes


def _layer_out(out):
    # transformers 5 decoder layers return a tensor; older ones a tuple (hidden, ...).
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def prune_layers(
    model: nn.Module,
    adapter: MLPAdapter,
    calib: torch.Tensor,
    solver: Solver,
    settings: PruneConfig,
    *,
    device: str | torch.device = "cpu",
    probe: torch.Tensor | None = None,
    source: LayerSource = IN_MODEL,
    sink: LayerSink = IN_MODEL,
    monitor=None,
    info: dict[str, Any] | None = None,
    shard: Shard = LOCAL,
) -> list[LayerRecord]:
    """Prune every decoder layer's MLP in place; returns one record per layer.

    From `settings`: the sparsity, round_to, batch size, where activations live (`offload`,
    see activations.py), the progress bar, and `layer_limit` (prune only the first N layers,
    for smoke runs; the rest stay dense). `probe` (n_probe, seqlen_probe) token windows are
    propagated through the pruned layers like the calibration batches, but used for nothing
    except each record's `rel_error_heldout`. `source` gives each layer its weights and
    `sink` takes each finished one (see stores.py); the layers the sink already holds
    (`sink.finished()`) come back pruned and are only run, to rebuild the next layer's
    inputs. `monitor` (a memory.MemoryMonitor) is sampled at every layer; `info`, when given,
    receives where the activations lived, their size, and the seconds the layer-0 capture
    took. `shard`: this process's place in a data-parallel run (module docstring); `info`
    then also receives every rank's window counts and activation bytes.
    """
    device = torch.device(device)
    prec = resolve(settings.compute, device)
    batch_size = settings.batch_size
    finished = sink.finished()
    layers = adapter.layers(model)
    home = next(model.parameters()).device
    _move_outside_layers(model, layers, device)
    try:
        # Layer 0's weights are not needed to capture its inputs: the hook stops before it runs.
        t0 = time.perf_counter()
        # fit windows and held-out windows batched apart, held-out last
        n_held = heldout_windows(calib.shape[0])
        n_fit = calib.shape[0] - n_held
        fit, held = _shares(shard, calib[:n_fit], calib[n_fit:], batch_size)
        if probe is not None:
            probe = probe[shard.share(probe.shape[0], batch_size)]
        dense_stream = (getattr(solver, "needs_dense_stream", False)
                        or getattr(solver, "needs_drift", False))
        down = adapter.out_linear(layers[0])
        drift = getattr(solver, "needs_drift", False)
        resident = resident_bytes(down.in_features, down.out_features,
                                  gram=solver.needs_gram, drift=drift)
        rows = row_bytes(
            fit.numel() + held.numel(), next(iter(adapter.in_linears(layers[0]).values()))
            .in_features, down.out_features, down.weight.element_size(), drift=drift
        ) if getattr(solver, "needs_inputs", False) else 0
        with prec.autocast():
            batches, probes = capture_stores(model, layers[0], [fit, held], probe, device,
                                             batch_size, settings.offload,
                                             2 if dense_stream else 1, resident, rows)
        heldout = (math.ceil(held.shape[0] / batch_size), held.numel())
        if info is not None:
            info["capture_s"] = time.perf_counter() - t0
            info["precision"] = prec.to_json()
            info["activations"] = {
                "where": batches.where, "mode": settings.offload,
                "calibration_bytes": batches.nbytes,
                "probe_bytes": probes.nbytes if probes is not None else 0,
            }
            if shard.distributed:
                info["ranks"] = {
                    "seqlen": int(calib.shape[1]),  # tokens per window
                    "fit_windows": shard.counts(fit.shape[0], device),
                    "heldout_windows": shard.counts(held.shape[0], device),
                    "probe_windows": shard.counts(probe.shape[0] if probe is not None else 0,
                                                  device),
                    "calibration_bytes": shard.counts(batches.nbytes, device),
                }
        if monitor is not None:
            monitor.sample()
        # the dense model's own hidden states, for solvers whose target is the dense model's
        # MLP output (rather than the dense MLP on the pruned model's inputs)
        # (also for the drift target, whose statistics compare the two streams)
        model_targets = getattr(solver, "needs_dense_stream", False)
        drift = getattr(solver, "needs_drift", False)
        if model_targets and drift:
            raise SpapError("recovery_target=model and refit_target=drift are two targets; "
                            "choose one")
        effort = effort_for(settings.method, settings.effort, settings.method_options)
        if drift and settings.prunes_heads and _fall_back(
                solver, effort, "is not combined with head pruning", info):
            drift = False
        dense = batches.clone() if model_targets or drift else None
        fisher = None
        if getattr(solver, "needs_fisher", False):
            with prec.autocast():
                fisher = _output_fisher(model, adapter, layers, fit, source, device, home,
                                        shard, settings.progress and shard.is_main)
        heads = head_plan(model, settings) if settings.prunes_heads else None
        if heads is not None and dense is not None:
            raise SpapError("head pruning is not combined with a target from the dense "
                            "model's hidden states (recovery_target=model or "
                            "refit_target=drift); use the layer target")
        records = []
        limit = settings.layer_limit
        todo = len(layers) if limit is None else min(limit, len(layers))
        bar = range(todo)
        if settings.progress and shard.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(bar, desc=f"pruning ({solver.name})", unit="layer")
        for i in bar:
            done_before = i < len(finished)
            if done_before:
                if dense is not None:  # the dense stream passes the dense layer first
                    source.load(i, layers[i])
                    with prec.autocast():
                        _propagate(layers[i].to(device), dense)
                    layers[i].to(home)
                sink.restore(i, layers[i])
                if heads is not None:  # its tensors are cut; its attention module learns so
                    heads.attn.sync_module_counts(layers[i], model.config)
            else:
                source.load(i, layers[i])
            layer = layers[i].to(device)
            if done_before:  # pruned by the interrupted run: only rebuild the next inputs
                rec = finished[i]
                with prec.autocast():
                    _propagate(layer, batches)
                    if probes is not None:
                        _propagate(layer, probes)
            else:
                head_rec = None
                if heads is not None:  # attention first: the MLP then sees its new output
                    head_rec = prune_layer_heads(
                        heads.attn, layer, batches, model.config,
                        keep_per_group=heads.keep_per_group, kv_keep=heads.kv_keep,
                        solver=heads.solver, heldout_batches=heldout[0], index=i, shard=shard,
                        probes=probes)
                # the drift target's premise is checked once, on the first layer it is used
                if drift and not any(r.kept < r.width_before for r in records):
                    try:
                        _check_additive(layer, adapter.out_linear(layer), batches[0])
                    except SpapError as exc:
                        if not _fall_back(solver, effort, "needs a decoder layer whose output "
                                          "is the residual plus the MLP's; this family "
                                          "normalizes or scales the MLP's output", info):
                            raise exc from None
                        drift, dense = False, None
                rec, batches, probes = _prune_one(adapter, layer, i, batches, solver,
                                                  settings.sparsity, settings.round_to, probes,
                                                  heldout, dense, drift, False, shard,
                                                  None if fisher is None else fisher[i], prec)
                rec.heads = head_rec
            layers[i].to(home)
            if not done_before:
                sink.save(i, layers[i], rec)
            source.release(i, layers[i])
            records.append(rec)
            if monitor is not None:
                monitor.sample()
            log.info(
                "layer %d: kept %d/%d, relative error %.4g%s%s", i, rec.kept, rec.width_before,
                rec.rel_error,
                "" if rec.rel_error_heldout is None else f", held-out {rec.rel_error_heldout:.4g}",
                " (resumed)" if done_before else "",
            )
            if settings.progress and shard.is_main:
                bar.set_postfix(err=f"{rec.rel_error:.3g}")
        sink.close()
        return records
    except BaseException:
        try:
            sink.close()  # the layer being written is kept for a resume
        except Exception as exc:
            log.warning("could not finish writing the last layer: %s", exc)
        raise
    finally:
        _move_outside_layers(model, layers, home)


def _fall_back(solver, effort, reason: str, info: dict[str, Any] | None) -> bool:
    """Where the drift target cannot be used and an effort level (not the user) chose it:
    switch `solver` to the level's fallback target (presets.FALLBACK), log and record why
    (`info["effort_fallback"]`) and return True. False when the user asked for it."""
    if not effort.may_fall_back:
        return False
    note = (f"effort '{effort.level}': the drift target {reason}, so this run fits the "
            f"plain layer target ({', '.join(f'{k}={v}' for k, v in FALLBACK.items())})")
    log.warning(note)
    for key, value in FALLBACK.items():
        setattr(solver, key, value)
    if info is not None:
        info["effort_fallback"] = note
    return True


def _propagate(layer, batches):
    """The next layer's inputs: this layer's outputs with the same extra arguments, written in
    place of this layer's inputs batch by batch (so only one full copy exists). `batches` is an
    ActivationStore or a plain list of (hidden, args, kwargs); it is returned."""
    for j, (hidden, args, kwargs) in enumerate(batches):
        out = _layer_out(layer(hidden, *args, **kwargs))
        if isinstance(batches, ActivationStore):
            batches.put(j, out)
        else:
            batches[j] = (out, args, kwargs)
    return batches


@dataclass
class HeadPlan:
    """What every layer's head step does: the family's attention adapter, the query heads
    kept per KV group and the KV groups kept, and the head solver."""

    attn: Any
    keep_per_group: int
    kv_keep: int
    solver: HeadSolver


def head_plan(model, settings: PruneConfig) -> HeadPlan:
    """The head step of `settings` for `model`; SpapError for a family without prunable
    heads, fractions that remove nothing or too much, or unknown head options."""
    attn = get_attention_adapter(model.config)
    kpg, kvk = keep_counts(HeadLayout(*attn.head_layout(model.config)), settings.heads,
                           settings.kv_groups)
    solver = get_head_solver(settings.head_method, **settings.head_options)
    return HeadPlan(attn, kpg, kvk, solver)


def _shares(shard: Shard, fit: torch.Tensor, held: torch.Tensor,
            batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's fit and held-out windows, in whole batches (`Shard.share`). Every rank
    needs a batch of fit windows; a rank without held-out windows adds nothing to their
    sums."""
    if shard.distributed:
        w = shard.world_size
        n_batches = math.ceil(fit.shape[0] / batch)
        if n_batches < w:
            # the fewest windows whose fit part (all but the held-out rule's) fills w batches
            enough = next(n for n in itertools.count(1)
                          if n - heldout_windows(n) >= (w - 1) * batch + 1)
            raise SpapError(
                f"{w} processes need at least {w} batches of fit calibration windows, one per "
                f"process; there are {fit.shape[0]} fit windows (--nsamples less the held-out "
                f"ones) in {n_batches} batches of --batch-size {batch}: use --nsamples "
                f"{enough} or more, a smaller --batch-size, or fewer processes")
    return fit[shard.share(fit.shape[0], batch)], held[shard.share(held.shape[0], batch)]


def _broadcast_decision(shard: Shard, decision) -> None:
    """Rank 0's decision on every rank (the same statistics give the same decision; this
    makes it so whatever the device's arithmetic does)."""
    shard.broadcast_(decision.keep, decision.w_down, decision.b_down,
                     *(decision.w_in or {}).values())


def _ratio(err: torch.Tensor) -> float:
    return float(err[0] / err[1]) if err[1] > 0 else 0.0


#: the drift target's additivity check (`_check_additive`): the largest gap between the
#: layer's output moved by a nudge of the MLP's output and the nudge itself, relative to the
#: output's scale, that passes: ADDITIVE_TOL, or ADDITIVE_ROUNDINGS roundings of the model's
#: dtype where that is coarser (bf16's eps is 2^-7: a sum of two bf16 states rounds once,
#: the nudge and the residual add a few more)
ADDITIVE_TOL = 1e-3
ADDITIVE_ROUNDINGS = 4


def _check_additive(layer, down: nn.Module, batch) -> None:
    """The drift target assumes the layer's output is the residual plus the down projection's
    output: adding delta to the latter must add exactly delta to the former. Checked on one
    batch by doing it, in the model's own dtype (no autocast), up to a few roundings of that
    dtype (ADDITIVE_ROUNDINGS): a norm or a scale after the MLP (Gemma 2/3, Granite) moves
    the output by a share of delta itself, far above it, and is refused."""
    hidden, args, kwargs = batch
    base = _layer_out(layer(hidden, *args, **kwargs))
    delta = {}

    def nudge(_m, _a, out):
        delta["d"] = torch.randn(out.shape, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.float32).to(out) * out.detach().float().std()
        return out + delta["d"]

    hook = down.register_forward_hook(nudge)
    try:
        moved = _layer_out(layer(hidden, *args, **kwargs))
    finally:
        hook.remove()
    d = delta["d"].reshape(moved.shape).float()
    gap = float(((moved.float() - base.float()) - d).abs().max())
    scale = float(base.float().abs().max() + d.abs().max())
    tol = max(ADDITIVE_TOL, ADDITIVE_ROUNDINGS * torch.finfo(base.dtype).eps)
    if not gap <= tol * max(scale, 1e-12):
        raise SpapError("refit_target=drift needs a decoder layer whose output is the residual "
                        "plus the MLP's down projection; this family normalizes or scales the "
                        "MLP's output before adding it, so use refit_target=layer")


def _output_fisher(model, adapter, layers, fit, source, device, home, shard, progress):
    """The dense model's output Fisher of every layer (sensitivity.py) on the fit windows,
    summed over the ranks: one forward and backward pass of the whole model on `device`."""
    from .sensitivity import output_fisher

    if source is not IN_MODEL:
        raise SpapError("a Fisher output weighting (out_weight=fisher or recovery_weight=fisher) "
                        "runs a backward pass of the whole model, which "
                        "--low-memory avoids; drop one of them")
    layers.to(device)
    try:  # one window at a time: the sum is the same (windows are independent), and the
        # backward pass then holds one window's logits and activations, not a batch's
        # (a batch of 4 on Qwen2.5-0.5B at 512 tokens peaked near 7 GB more)
        fisher = output_fisher(model, adapter, fit, batch_size=1, device=device,
                               progress=progress)
    finally:
        layers.to(home)
    if shard.distributed:
        fisher = [shard.sum_(g.to(device)).cpu() for g in fisher]
    return fisher


class RowBuffer:
    """Rows (tokens, width) of every batch, copied in place into one tensor of `capacity`
    rows (the tokens of all batches), allocated at the first batch in its dtype and width,
    on `device` (None: where the batches are). `result()` is the rows written."""

    def __init__(self, capacity: int, device: torch.device | None = None):
        self.capacity, self.device = capacity, device
        self.buf: torch.Tensor | None = None
        self.filled = 0

    def add(self, t: torch.Tensor) -> None:
        t = t.reshape(-1, t.shape[-1])
        if self.buf is None:
            self.buf = torch.empty(self.capacity, t.shape[-1], dtype=t.dtype,
                                   device=self.device or t.device)
        end = self.filled + t.shape[0]
        self.buf[self.filled:end] = t
        self.filled = end

    def result(self) -> torch.Tensor:
        if self.buf is None:
            raise RuntimeError("no rows were collected; this is a bug in spap")
        return self.buf[:self.filled]


def _prune_one(adapter, layer, index, batches, solver, sparsity, round_to, probes=None,
               heldout=(0, 0), dense=None, drift=False, check_additive=False, shard=LOCAL,
               out_weight=None, prec: Precision = FLOAT32):
    """Prune one layer; returns its record and the next layer's calibration and probe inputs
    (probes stay None when none were given). Probes run only after the cut, so calibration
    results are bit-identical with or without them. `heldout` = (number of trailing batches
    that are held-out windows, their token count). `dense`, when given, holds the dense
    model's inputs of this layer (same batches) and is advanced in place to the next layer's;
    the dense MLP's outputs on it are then the solver's targets, or, with `drift`, the drift
    statistics compare the layer's output on it with its output on the pruned inputs
    (`check_additive`: first check that the layer adds the MLP's output to the residual).
    `shard`: sums over the ranks of a data-parallel run (module docstring). `out_weight`:
    the layer's output Fisher, for a solver that weights its decision by it. `prec`: the
    precision of the forwards (under its autocast) and the solver's compute dtype."""
    ins = adapter.in_linears(layer)
    first_in = next(iter(ins.values()))
    down = adapter.out_linear(layer)
    n = down.in_features
    k = n_keep_for(n, sparsity, round_to)
    t0 = time.perf_counter()
    # recovery's rows live where the activations do: in host memory when those are offloaded
    # (recovery then moves one minibatch, or one chunk of its closed form, at a time)
    def rows() -> RowBuffer:
        return RowBuffer(batches.tokens, torch.device("cpu") if batches.offload else None)

    dense_targets = None
    if dense is not None and not drift:  # the dense layer on the dense inputs, before any cut
        dense_targets = rows()
        hook = adapter.out_linear(layer).register_forward_hook(
            lambda _m, _a, out: dense_targets.add(out.detach()))
        try:
            with prec.autocast():
                _propagate(layer, dense)
        finally:
            hook.remove()
    if k == n:  # nothing to prune: the layer must stay bit-identical
        with prec.autocast():
            if drift:
                _propagate(layer, dense)
            new = _propagate(layer, batches)
        secs = {"collect": 0.0, "solve": 0.0, "replay": time.perf_counter() - t0}
        held = None
        if probes is not None:
            t_probe = time.perf_counter()
            with prec.autocast():
                probes = _propagate(layer, probes)
            secs["probe"] = time.perf_counter() - t_probe
            held = 0.0
        return LayerRecord(index, n, n, 0.0, secs, {}, list(range(n)), held), new, probes

    # collect
    acc = StatsAccumulator(n, solver.needs_gram, down.weight.device)
    # recovery's rows, written in place batch by batch (no list of batches to concatenate:
    # twice their size for a moment)
    inputs, targets, drifts = rows(), rows(), rows()
    # The trailing held-out batches also count into a held-out Gram, for solvers that choose a
    # setting out of sample.
    n_held = heldout[0]
    state: dict[str, Any] = {"batch": 0, "dense": False}

    def is_heldout() -> bool:
        return state["batch"] >= len(batches) - n_held

    def collect(_m, a):
        if state["dense"]:  # the dense stream's forward (drift): no statistics of it
            return
        with exact(a[0].device.type):  # (the sums' products in float32, not autocast's)
            acc.add(a[0], heldout=is_heldout())
        state["x"] = a[0]

    def grab_input(_m, a):
        if not state["dense"]:
            inputs.add(a[0].detach())

    def grab_target(_m, _a, out):
        if not state["dense"]:
            # (copied now: some families, e.g. falcon, add into the down projection's output
            # in place)
            targets.add(out.detach())

    if drift:
        if check_additive:
            _check_additive(layer, down, batches[0])
        drift_acc = DriftAccumulator(down.out_features, n, down.weight.device,
                                     exact=prec.compute == torch.float32)
    hooks = [down.register_forward_pre_hook(collect)]
    if solver.needs_inputs:
        # the MLP inputs and the dense layer's output on them, the recovery's data and target
        hooks.append(first_in.register_forward_pre_hook(grab_input))
        hooks.append(down.register_forward_hook(grab_target))
    try:
        for j, (hidden, args, kwargs) in enumerate(batches):
            state["batch"] = j
            with prec.autocast():
                out = _layer_out(layer(hidden, *args, **kwargs))
            if drift:  # the dense model's hidden state after this layer, and the drift
                state["dense"] = True
                h_d, a_d, k_d = dense[j]
                with prec.autocast():
                    out_dense = _layer_out(layer(h_d, *a_d, **k_d))
                state["dense"] = False
                # (batch, seq, m), in float32 at least: in a bf16 model the drift is often
                # below the rounding of the states it is the difference of
                wide = torch.promote_types(out.dtype, torch.float32)
                d = out_dense.to(wide) - out.to(wide)
                drift_acc.add(d, state.pop("x"), out_dense, heldout=is_heldout())
                if solver.needs_inputs:
                    drifts.add(d)
                dense.put(j, out_dense)
    finally:
        for h in hooks:
            h.remove()
    t1 = time.perf_counter()

    # solve
    f64 = torch.float64
    w_in, b_in = adapter.channel_rows(ins)  # per role ("gate", "up"), fused or not
    problem = LayerProblem(
        w_down=down.weight.to(f64),
        w_in={role: w.to(f64) for role, w in w_in.items()},
        stats=reduce_stats(acc.result(drift_acc.result() if drift else None), shard),
        b_down=down.bias.to(f64) if down.bias is not None else None,
        b_in={role: b.to(f64) for role, b in b_in.items()},
        linear_key=adapter.linear_key,
        act=adapter.activation(layer),
        shard=shard,
        out_weight=None if out_weight is None else out_weight.to(down.weight.device),
        compute_dtype=prec.compute,
        solved_once=True,
    )
    acc = drift_acc = None  # (the statistics live on in the problem alone: a solver frees them)
    if solver.needs_inputs:
        problem.inputs = inputs.result()  # (p, d)
        # (p, m): the dense MLP on these inputs, or the dense model's own MLP output
        problem.targets = (dense_targets if dense_targets is not None else targets).result()
        problem.heldout_tokens = heldout[1] if n_held else 0
        problem.window_tokens = int(batches[0][0].shape[-2])  # (batch, seq, d): seq
        if drift:
            problem.drift = drifts.result()  # (p, m), the same rows as targets
        del inputs, targets, dense_targets, drifts
    decision = solve_layer(solver, problem, k, index)
    _broadcast_decision(shard, decision)
    del problem
    t2 = time.perf_counter()

    # cut
    dense = {name: copy.deepcopy(lin) for name, lin in ins.items()}
    dense_down = copy.deepcopy(down)
    act = adapter.activation(layer)
    apply_decision(adapter, layer, decision, index)

    # replay, measuring the MLP's relative error on the same inputs; then the probes, into
    # their own sums
    err = torch.zeros(2, dtype=f64, device=down.weight.device)
    err_probe = torch.zeros_like(err)
    sink = {"err": err}
    seen: dict[str, torch.Tensor] = {}
    new_first = adapter.in_linears(layer)[next(iter(ins))]
    new_down = adapter.out_linear(layer)

    def grab(_m, a):
        seen["a"] = a[0]

    def measure(_m, _a, out):
        ref = adapter.mlp_output(dense, dense_down, act, seen["a"]).to(f64)
        sink["err"][0] += (out.to(f64) - ref).pow(2).sum()
        sink["err"][1] += ref.pow(2).sum()

    hooks = [new_first.register_forward_pre_hook(grab), new_down.register_forward_hook(measure)]
    try:
        with prec.autocast():
            new = _propagate(layer, batches)
        t3 = time.perf_counter()
        if probes is not None:
            sink["err"] = err_probe
            with prec.autocast():
                probes = _propagate(layer, probes)
    finally:
        for h in hooks:
            h.remove()
    t4 = time.perf_counter()
    shard.sum_(err)
    shard.sum_(err_probe)
    secs = {"collect": t1 - t0, "solve": t2 - t1, "replay": t3 - t2}
    # the solve's own steps (decision, refit, recovery and its parts), when the solver times them
    secs.update({f"solve_{k}": v for k, v in decision.info.pop("seconds", {}).items()})
    held = None
    if probes is not None:
        secs["probe"] = t4 - t3
        held = _ratio(err_probe)
    info = {key: v for key, v in decision.info.items() if _jsonable(v)}
    return LayerRecord(index, n, int(decision.keep.numel()), _ratio(err), secs, info,
                       decision.keep.tolist(), held), new, probes


def _jsonable(v) -> bool:
    return isinstance(v, (int, float, str, bool, list, dict)) or v is None
