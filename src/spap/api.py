"""The two Python calls: `spap.prune` (a model in memory) and `spap.prune_to_disk` (a model
spec to a saved folder, resumable, optionally one layer in memory at a time).

Both take the run's settings as the fields of `config.PruneConfig`, as keywords or as a
`config=` object; `spap prune` on the command line is `prune_to_disk`. The work flows one way:
settings -> where layers come from (`driver.stores`) -> the driver (`driver.pipeline`) ->
the solver -> where finished layers go -> the report (`report.py`) -> the saved folder
(`modelio.export` in one piece, `modelio.shards` from the resume folder).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import PruneConfig
from .data import calibration_ids, given_ids_description, probe_description, token_hash
from .distributed import current, init_from_env
from .driver.head_surgery import add_missing_attention_biases, commit_head_counts
from .driver.pipeline import head_plan, prune_layers
from .driver.records import LayerRecord
from .driver.stores import IN_MODEL, FromCheckpoint, LayerSource, ToRunFolder
from .driver.surgery import add_missing_biases
from .errors import SpapError
from .memory import MemoryMonitor
from .modelio.identity import identity_in_memory
from .modelio.loading import resolve_device
from .modelio.runfolder import RunFolder, partial_dir, run_identity
from .models import get_adapter, get_attention_adapter
from .plan import prediction
from .report import count_non_embedding, count_params, prune_report
from .solvers import get_solver, solver_options
from .solvers.presets import effort_for

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """The pruned model (the same object, cut in place) and the report written to spap.json."""

    model: Any
    report: dict[str, Any]
    layers: list[LayerRecord]
    calib_ids: torch.Tensor


@dataclass
class JobResult:
    """What `prune_to_disk` wrote (`out`), its report, and the time of each step."""

    out: Path
    report: dict[str, Any]
    params_dense: int
    timings: dict[str, float] = field(default_factory=dict)
    hub_url: str | None = None  # the upload's commit, with `push_to_hub`


def _settings(config: PruneConfig | None, sparsity: float | None,
              settings: dict[str, Any]) -> PruneConfig:
    if sparsity is not None:
        settings["sparsity"] = sparsity
    cfg = PruneConfig.build(config, **settings)
    cfg.validate()
    return cfg


def prune(model, tokenizer=None, sparsity: float | None = None, *,
          config: PruneConfig | None = None, calib_ids: torch.Tensor | None = None,
          calib_desc: dict[str, Any] | None = None, probe_ids: torch.Tensor | None = None,
          checkpoint_dir: str | os.PathLike | None = None, allow_unsaveable: bool = False,
          **settings) -> PruneResult:
    """Prune the MLP channels of every decoder layer of `model` in place.

    Settings are `PruneConfig`'s fields (sparsity, method, method_options, nsamples, seqlen,
    device, ...). Either `tokenizer` (to draw calibration windows from `calib`) or
    `calib_ids` (nsamples, seqlen) must be given. `device` is where each layer is computed
    (default: the model's device). Returns the model and a report; save it with
    `spap.save_pruned`.

    `calib_desc` is the report's description of `calib_ids` when the caller drew them
    (`spap.data.calibration_ids` returns both); without it the report says "given ids".

    `probe_ids` (n_probe, seqlen_probe) are held-out windows that never enter any statistics:
    each layer's MLP error is also measured on them after the cut (`rel_error_heldout`). They
    must not overlap the calibration windows for that to mean anything; `spap compare` takes
    them from the tail of the evaluation text.

    `checkpoint_dir` writes every finished layer there (`modelio.runfolder`), so a killed run
    called again with the same arguments continues from its last finished layer, with a
    bit-identical result (`resume`: None continues a matching run, True requires one, False
    discards it; other settings are refused). The caller removes the folder once the result
    is saved.

    Inside an initialized torch.distributed process group (e.g. under torchrun), every rank
    calls this with the same model and settings: each computes on its own share of the
    windows, the statistics are summed over ranks, and every rank ends with the same pruned
    model (`distributed.py`); only rank 0 writes `checkpoint_dir`.

    A method that adds a down-projection bias is refused on a family whose saved config cannot
    hold one (Qwen2, Mistral), unless `allow_unsaveable`: the model is then only usable in
    memory (`spap compare` measures it that way) and the report says `"saveable": false`.
    """
    cfg = _settings(config, sparsity, settings)
    if calib_desc is not None and (
            calib_ids is None or calib_desc.get("token_hash") != token_hash(calib_ids)):
        raise SpapError("calib_desc describes other windows than calib_ids")
    budget = None
    if cfg.params is not None:
        if calib_ids is None:  # every candidate and the final run share these windows
            if tokenizer is None:
                raise SpapError("pass a tokenizer or calib_ids to draw calibration data")
            calib_ids, calib_desc = calibration_ids(tokenizer, cfg.calibration)
        cfg, budget = choose_split(model, cfg, calib_ids)
    result = _run(model, tokenizer, cfg, calib_ids=calib_ids, calib_desc=calib_desc,
                  probe_ids=probe_ids, run_dir=checkpoint_dir,
                  allow_unsaveable=allow_unsaveable)
    if budget is not None:
        result.report["params_target"] = budget
    return result


def choose_split(model, cfg: PruneConfig, calib_ids: torch.Tensor | None
                 ) -> tuple[PruneConfig, dict[str, Any]]:
    """The settings that remove `cfg.params` of the parameters (`driver.budget`), and what
    was chosen how. With several candidate splits (`params_split="auto"`), each prunes a copy
    of `model` on `calib_ids` and the one with the lowest perplexity on the held-out
    calibration windows (the last 1/8: they choose, as the ridge and the recovery length are
    chosen, and fit nothing) wins; `model` itself is left as it is."""
    import copy

    from .data import heldout_windows
    from .driver.budget import candidate_splits
    from .eval.ppl import nll_of_windows

    cands = candidate_splits(model, get_adapter(model.config), cfg.params, cfg.params_of,
                             cfg.params_split)
    info: dict[str, Any] = {"params": cfg.params, "of": cfg.params_of,
                            "split": cfg.params_split,
                            "candidates": [c.to_json() for c in cands]}
    if len(cands) > 1:
        if calib_ids is None:
            raise SpapError("--params-split auto prunes a copy of the model for every split, "
                            "which --low-memory avoids; choose --params-split mlp, heads or kv")
        n_held = heldout_windows(calib_ids.shape[0])
        if n_held < 1:
            raise SpapError("--params-split auto chooses on the held-out calibration windows; "
                            "use --nsamples 2 or more, or choose --params-split mlp, heads "
                            "or kv")
        shard = current()
        held = calib_ids[calib_ids.shape[0] - n_held:]
        held = held[shard.share(held.shape[0])]
        device = _compute_device(model, cfg)
        for c, rec in zip(cands, info["candidates"]):
            trial = copy.deepcopy(model)
            _run(trial, None, dataclasses.replace(cfg, params=None, **c.settings()),
                 calib_ids=calib_ids, allow_unsaveable=True)
            home = next(trial.parameters()).device
            nll, count = nll_of_windows(trial.to(device), held, batch_size=cfg.batch_size)
            nll, count = shard.sum_float(nll, device), shard.sum_float(float(count), device)
            rec["heldout_calibration_ppl"] = math.exp(nll / count)
            trial.to(home)
            del trial
        best = min(range(len(cands)),
                   key=lambda i: info["candidates"][i]["heldout_calibration_ppl"])
    else:
        best = 0
    info["chosen"] = cands[best].name
    return dataclasses.replace(cfg, params=None, **cands[best].settings()), info


def _compute_device(model, cfg: PruneConfig) -> torch.device:
    """Where the layers are computed: `cfg.device`, or the model's own device."""
    return (next(model.parameters()).device if cfg.device is None
            else torch.device(resolve_device(str(cfg.device))))


def _run(model, tokenizer, cfg: PruneConfig, *, calib_ids=None, calib_desc=None,
         probe_ids=None, run_dir=None,
         identity: dict[str, Any] | None = None, source: LayerSource = IN_MODEL,
         allow_unsaveable: bool = False) -> PruneResult:
    """One run of the driver on `model` with the layers from `source`, finished layers to the
    run folder `run_dir` (if any), and the report."""
    adapter = get_adapter(model.config)
    effort = effort_for(cfg.method, cfg.effort, cfg.method_options)
    solver = get_solver(cfg.method, **effort.options)
    shard = current()
    unsaveable = (getattr(solver, "adds_down_bias", False)
                  and not adapter.can_add_down_bias(model.config))
    if unsaveable and not allow_unsaveable:
        raise SpapError(
            f"method '{cfg.method}' compensates with a down-projection bias, which a saved "
            f"{model.config.model_type} model cannot store; choose another --method"
        )
    probe_desc = probe_description(probe_ids)
    t0 = time.perf_counter()
    if calib_ids is None:
        if tokenizer is None:
            raise SpapError("pass a tokenizer or calib_ids to draw calibration data")
        calib_ids, calib_desc = calibration_ids(tokenizer, cfg.calibration)
    elif calib_desc is None:  # (ids drawn by the caller come with their description)
        calib_desc = given_ids_description(calib_ids)
    t1 = time.perf_counter()
    device = _compute_device(model, cfg)
    predicted = prediction(model.config, cfg, device)  # `spap plan`'s, beside the measured
    dtype = str(model.dtype).replace("torch.", "")
    dense = {"params": count_params(model), "width": adapter.width(model.config),
             "dtype": dtype, "params_non_embedding": count_non_embedding(model)}
    sink = IN_MODEL
    if run_dir is not None:
        settings = {
            "layout": "memory" if source is IN_MODEL else "shards",
            "calibration": {k: calib_desc.get(k)
                            for k in ("token_hash", "nsamples", "seqlen", "bos")},
            "probe": probe_desc and probe_desc["token_hash"],
            "method": cfg.method, "options": solver_options(solver), "sparsity": cfg.sparsity,
            "round_to": cfg.round_to, "batch_size": cfg.batch_size,
            "heads": cfg.heads, "kv_groups": cfg.kv_groups, "head_method": cfg.head_method,
            "head_options": cfg.head_options,
            "layer_limit": cfg.layer_limit, "dtype": dtype, "compute": cfg.compute,
            # (every rank's own device is the same kind; the world size changes the sums'
            # order, so a resume under another one would not be bit-identical)
            "device": str(device) if not shard.distributed else device.type,
            "world_size": shard.world_size,
        }
        run = RunFolder(run_dir)
        run_id = run_identity(identity or identity_in_memory(model, adapter), settings)
        if not shard.is_main:
            shard.barrier()  # rank 0 has opened (or cleared) the folder: read it
        sink = ToRunFolder(run, model, adapter.layers(model), run_id, cfg.resume,
                           write=shard.is_main)
        if shard.is_main:
            shard.barrier()
        if sink.finished():
            log.info("resuming from layer %d in %s", len(sink.finished()), run.path)
    elif source is not IN_MODEL:
        raise SpapError("pruning from a checkpoint source needs a checkpoint_dir to write to")
    info: dict[str, Any] = {}
    try:
        with MemoryMonitor(device) as monitor:
            records = prune_layers(model, adapter, calib_ids, solver, cfg, device=device,
                                   probe=probe_ids, source=source, sink=sink, monitor=monitor,
                                   info=info, shard=shard)
    except SpapError:
        # A problem of these settings (e.g. non-finite activations) recurs on every resume:
        # a folder this call started is of no use. Anything else (Ctrl-C, out of memory, a
        # crash) keeps it for a resume, and a folder with layers an earlier call finished is
        # never thrown away here.
        if run_dir is not None and shard.is_main and not sink.finished():
            run.remove()
        raise
    _set_width(model, adapter, records, cfg, unsaveable)
    t2 = time.perf_counter()
    report = prune_report(cfg, solver_options(solver), model, adapter, records, dense=dense, run={
        "saveable": not unsaveable, "device": str(device),
        "memory": {**monitor.report(), "activations": info.get("activations"),
                   "plan": predicted},
        "resumed_from_layer": len(sink.finished()) if run_dir is not None else None,
        "calibration": calib_desc, "probe": probe_desc,
        # every rank's share: window counts and the bytes of its calibration activations
        "distributed": {"world_size": shard.world_size,
                        **({"ranks": info["ranks"]} if shard.distributed else {})},
        "timings": {"calibration_data_s": t1 - t0, "prune_s": t2 - t1,
                    "capture_s": info.get("capture_s")},
        "precision": info.get("precision"),
        "effort": {**effort.to_json(), "fallback": info.get("effort_fallback")},
    })
    return PruneResult(model, report, records, calib_ids)


def _set_width(model, adapter, records: list[LayerRecord], cfg: PruneConfig,
               unsaveable: bool) -> None:
    """The config's MLP width after the cut (and the zero biases a saved config implies)."""
    if not unsaveable:  # in memory, nn.Linear uses a bias without any config flag
        add_missing_biases(model, adapter)
    if cfg.prunes_heads:  # the cut head counts (uniform: the same keep in every layer)
        attn = get_attention_adapter(model.config)
        add_missing_attention_biases(model, attn)
        commit_head_counts(model, attn)
    widths = {r.kept for r in records}
    if cfg.layer_limit is None or cfg.layer_limit >= len(adapter.layers(model)):
        if len(widths) != 1:  # a uniform ratio gives one width; stock configs need it
            raise RuntimeError(f"layers ended with different widths {sorted(widths)}")
        adapter.set_width(model.config, widths.pop())


def prune_to_disk(model: str, out: str | os.PathLike, sparsity: float | None = None, *,
                  config: PruneConfig | None = None, **settings) -> JobResult:
    """Prune model spec `model` (alias, folder, .gguf, Hub id) and save it to `out`.

    Settings are `PruneConfig`'s fields. A run folder beside the output
    (`modelio.runfolder.partial_dir`) holds every finished layer, so a run killed at layer 70
    of 80 continues from layer 70 when called again with the same settings, with the same
    result bit for bit. In memory (the default) the model is loaded whole, pruned in place and
    saved by `export.save_pruned`, which reloads it and compares logits; with `low_memory` it
    is built on the meta device, one decoder layer at a time is read from the checkpoint, and
    the output is assembled from the run folder as a standard sharded checkpoint. `evaluate`
    adds the dense and pruned perplexity (`report["eval"]`). Each step is timed on its own.
    The folder holds a model card (README.md, `modelio.card`); `push_to_hub` (a Hub
    repository id) uploads the finished folder there (`modelio.hub`).
    """
    from .modelio.export import check_output_dir, save_pruned

    t_start = time.perf_counter()
    cfg = _settings(config, sparsity, settings)
    # everything checked before the model loads
    get_solver(cfg.method, **effort_for(cfg.method, cfg.effort, cfg.method_options).options)
    if cfg.push_to_hub is not None:
        from .modelio.hub import check_repo_id

        check_repo_id(cfg.push_to_hub)
    out = check_output_dir(out, cfg.overwrite)
    shard, device = init_from_env(resolve_device(cfg.device or "auto"))
    cfg = dataclasses.replace(cfg, device=device)
    run_dir = partial_dir(out)
    if cfg.low_memory:
        return _low_memory(model, out, cfg, run_dir, t_start)
    from .modelio.loading import load_model

    model_obj, tok, src = load_model(model, cfg.dtype, cfg.device)
    budget, calib_ids, calib_desc = None, None, None
    if cfg.params is not None:  # the split first: it may need the model pruned several times
        # (on the windows the final run uses too: drawn once)
        calib_ids, calib_desc = calibration_ids(tok, cfg.calibration)
        cfg, budget = choose_split(model_obj, cfg, calib_ids)
    if cfg.prunes_heads:  # refused before any long work
        head_plan(model_obj, cfg)
    timings = {"load_s": time.perf_counter() - t_start}
    ev: dict[str, Any] = {}
    if cfg.evaluate:  # (every rank scores its share of the windows; rank 0 writes)
        from .data import load_text, tokenize

        t0 = time.perf_counter()
        stream = tokenize(tok, load_text("wiki-offline", "test"))
        ev["dense"] = _perplexity(model_obj, tok, cfg, stream)
        timings["dense_eval_s"] = time.perf_counter() - t0
    params_dense = count_params(model_obj)
    identity = identity_in_memory(model_obj, get_adapter(model_obj.config), src.spec)
    t0 = time.perf_counter()
    result = _run(model_obj, tok, cfg, calib_ids=calib_ids, calib_desc=calib_desc,
                  run_dir=run_dir, identity=identity)
    timings["prune_s"] = time.perf_counter() - t0
    report = result.report
    report["model"]["source"] = src.spec
    if budget is not None:
        report["params_target"] = budget
    if cfg.evaluate:
        t0 = time.perf_counter()
        ev["pruned"] = _perplexity(model_obj, tok, cfg, stream)
        timings["pruned_eval_s"] = time.perf_counter() - t0
        report["eval"] = ev
    if not shard.is_main:  # rank 0 writes; the others are done
        return JobResult(out, report, params_dense, timings)
    _job_timings(report, timings, t_start)
    check = result.calib_ids[:1, : min(64, result.calib_ids.shape[1])]
    save_pruned(model_obj, tok, out, report, overwrite=cfg.overwrite, check_ids=check)
    timings["save_s"] = report["timings"]["save_s"]  # measured by the save itself
    RunFolder(run_dir).remove()
    return JobResult(out, report, params_dense, timings, _push(out, cfg))


def _low_memory(spec: str, out: Path, cfg: PruneConfig, run_dir: Path,
                t_start: float) -> JobResult:
    from .modelio.loading import open_lazy
    from .modelio.shards import write_sharded

    lazy = open_lazy(spec, cfg.dtype, cfg.device)
    budget = None
    if cfg.params is not None:
        cfg, budget = choose_split(lazy.model, cfg, None)
    if cfg.prunes_heads:
        head_plan(lazy.model, cfg)
    layers = get_adapter(lazy.model.config).layers(lazy.model)
    timings = {"load_s": time.perf_counter() - t_start}
    params_dense = count_params(lazy.model)
    t0 = time.perf_counter()
    result = _run(lazy.model, lazy.tokenizer, cfg, run_dir=run_dir, identity=lazy.identity,
                  source=FromCheckpoint(lazy.reader, lazy.model, layers))
    timings["prune_s"] = time.perf_counter() - t0
    report = result.report
    report["model"]["source"] = lazy.spec
    report["low_memory"] = True
    if budget is not None:
        report["params_target"] = budget
    if not current().is_main:  # rank 0 assembles the output
        return JobResult(out, report, params_dense, timings)
    _job_timings(report, timings, t_start)
    write_sharded(lazy.model, layers, RunFolder(run_dir), lazy.tokenizer,
                  lazy.generation_config, report, out, overwrite=cfg.overwrite)
    timings["save_s"] = report["timings"]["save_s"]  # measured by the save itself
    return JobResult(out, report, params_dense, timings, _push(out, cfg))


def _push(out: Path, cfg: PruneConfig) -> str | None:
    """Upload the finished folder `out` to `cfg.push_to_hub`, if asked."""
    if cfg.push_to_hub is None:
        return None
    from .modelio.hub import push_folder

    return push_folder(out, cfg.push_to_hub)


def _perplexity(model, tok, cfg: PruneConfig, stream: torch.Tensor) -> dict[str, Any]:
    from .eval.placement import placed
    from .eval.ppl import perplexity

    shard = current()
    # (whole on the device, or spread over GPUs and host memory when larger: placement.py)
    with placed(model, cfg.device, own_device_only=shard.distributed) as where:
        r = perplexity(model, tok, seqlen=cfg.eval_seqlen, windows=cfg.eval_windows,
                       batch_size=cfg.batch_size, stream=stream, progress=cfg.progress,
                       shard=shard, bos=cfg.bos)
    return {**r, "placement": where}


def _job_timings(report: dict[str, Any], timings: dict[str, float], t_start: float) -> None:
    # the report keeps its own prune_s (the layers, without drawing the calibration windows)
    report["timings"].update({k: v for k, v in timings.items() if k != "prune_s"})
    report["timings"]["total_s"] = time.perf_counter() - t_start
