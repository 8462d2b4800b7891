"""`spap.prune(model, tokenizer, ...)`: the one Python call, also used by the CLI."""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch

from .config import CalibConfig, PruneConfig
from .data import calibration_windows, heldout_windows, load_text, token_hash, tokenize
from .driver.activations import OFFLOAD_MODES
from .driver.pipeline import LayerIO, LayerRecord, prune_layers
from .driver.surgery import add_missing_biases
from .errors import SpapError
from .memory import MemoryMonitor
from .models import get_adapter
from .solvers import get_solver, solver_options

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """The pruned model (the same object, cut in place) and the report written to spap.json."""

    model: Any
    report: dict[str, Any]
    layers: list[LayerRecord]
    calib_ids: torch.Tensor


def count_params(model) -> int:
    # Tied embeddings are one Parameter, counted once by parameters().
    return sum(p.numel() for p in model.parameters())


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("spap", "torch", "transformers", "safetensors", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def calibration_ids(tokenizer, calib: CalibConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """The calibration windows and their description for the report."""
    text = load_text(calib.source, "calib")
    stream = tokenize(tokenizer, text)
    ids = calibration_windows(stream, calib.nsamples, calib.seqlen, calib.seed)
    desc = {
        "source": text.source,
        "split": text.split,
        "stream_tokens": int(stream.numel()),
        "nsamples": calib.nsamples,
        "seqlen": calib.seqlen,
        "seed": calib.seed,
        "tokens": int(ids.numel()),
        "token_hash": token_hash(ids),
        "windows_overlap": False,
        "heldout_windows": heldout_windows(calib.nsamples),
        "heldout_rule": "the last windows (1/8), never fit; they choose the ridge and the "
                        "recovery length",
    }
    return ids, desc


def prune(
    model,
    tokenizer=None,
    sparsity: float = 0.3,
    *,
    method: str = "spap",
    method_options: dict[str, Any] | None = None,
    calib: str = "wiki-offline",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    device: str | torch.device | None = None,
    round_to: int = 1,
    batch_size: int = 4,
    layer_limit: int | None = None,
    calib_ids: torch.Tensor | None = None,
    progress: bool = False,
    allow_unsaveable: bool = False,
    probe_ids: torch.Tensor | None = None,
    offload: str = "auto",
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool | None = None,
    model_id: dict[str, Any] | None = None,
    source=None,
) -> PruneResult:
    """Prune the MLP channels of every decoder layer of `model` in place.

    Either `tokenizer` (to draw calibration windows from `calib`) or `calib_ids`
    (nsamples, seqlen) must be given. `device` is where each layer is computed (default: the
    model's device). Returns the model and a report; save it with `spap.save_pruned`.

    A method that adds a down-projection bias is refused on a family whose saved config cannot
    hold one (Qwen2, Mistral), unless `allow_unsaveable`: the model is then only usable in
    memory (`spap compare` measures it that way) and the report says `"saveable": false`.

    `probe_ids` (n_probe, seqlen_probe) are held-out windows that never enter any statistics:
    each layer's MLP error is also measured on them after the cut (`rel_error_heldout`), an
    out-of-sample counterpart of the in-sample calibration error. They must not overlap the
    calibration windows for that to mean anything; `spap compare` takes them from the tail of
    the evaluation text.

    `offload` says where the calibration (and probe) activations live: "device", "cpu"
    (host memory, pinned on CUDA, streamed to the device a batch at a time), or "auto" (off the
    device only when they would take more than half its free memory); the results are the
    same. The report's "memory" entry has the run's peak device and host memory.

    `checkpoint_dir` writes every finished layer there (see spap.checkpoint), so a killed run
    called again with the same arguments continues from its last finished layer, with a
    bit-identical result; `resume` None continues a matching run if one is there, True
    requires one, False discards it. A run of other settings is refused (SpapError).
    `model_id` identifies the dense model in that check (default: its config and a fingerprint
    of two of its weight tensors). The caller removes the folder once the result is saved.

    `source` (a `lazy.CheckpointReader`) prunes a model built with `lazy.empty_model`: each
    layer is read from the checkpoint when its turn comes and dropped once written to
    `checkpoint_dir` (required then); `spap.job.prune_to_disk` assembles the output from it.
    """
    if offload not in OFFLOAD_MODES:
        raise SpapError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got '{offload}'")
    if source is not None and checkpoint_dir is None:
        raise SpapError("pruning from a checkpoint source needs a checkpoint_dir to write to")
    cfg = PruneConfig(sparsity, method, dict(method_options or {}), round_to, batch_size,
                      layer_limit)
    cfg.validate()
    adapter = get_adapter(model.config)
    solver = get_solver(method, **cfg.method_options)
    unsaveable = getattr(solver, "adds_down_bias", False) and not adapter.can_add_down_bias(
        model.config
    )
    if unsaveable and not allow_unsaveable:
        raise SpapError(
            f"method '{method}' compensates with a down-projection bias, which a saved "
            f"{model.config.model_type} model cannot store; choose another --method"
        )
    probe_desc = probe_description(probe_ids)
    t0 = time.perf_counter()
    if calib_ids is None:
        if tokenizer is None:
            raise SpapError("pass a tokenizer or calib_ids to draw calibration data")
        ccfg = CalibConfig(calib, nsamples, seqlen, seed)
        ccfg.validate()
        calib_ids, calib_desc = calibration_ids(tokenizer, ccfg)
    else:
        calib_desc = {"source": "given ids", "nsamples": int(calib_ids.shape[0]),
                      "seqlen": int(calib_ids.shape[1]), "tokens": int(calib_ids.numel()),
                      "token_hash": token_hash(calib_ids),
                      "heldout_windows": heldout_windows(int(calib_ids.shape[0]))}
    t1 = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    params_before = count_params(model)
    width_before = adapter.width(model.config)
    dtype = str(model.dtype).replace("torch.", "")
    io: LayerIO | None = None
    finished: list[LayerRecord] = []
    if checkpoint_dir is not None:
        from .modelio.runfolder import CheckpointIO, RunFolder, model_identity, run_identity

        settings = {
            "layout": "shards" if source is not None else "memory",
            "calibration": {k: calib_desc.get(k) for k in ("token_hash", "nsamples", "seqlen")},
            "probe": probe_desc and probe_desc["token_hash"],
            "method": method, "options": solver_options(solver), "sparsity": sparsity,
            "round_to": round_to, "batch_size": batch_size, "layer_limit": layer_limit,
            "dtype": dtype, "device": str(device),
        }
        identity = run_identity(model_id or model_identity(model, adapter), settings)
        run = RunFolder(checkpoint_dir)
        finished = run.open(identity, resume)
        layers = adapter.layers(model)
        if source is not None:
            from .modelio.reader import LazyLayers

            io = LazyLayers(run, model, layers, source)
        else:
            io = CheckpointIO(run, model, layers)
        if finished:
            log.info("resuming from layer %d (%d finished in %s)", len(finished), len(finished),
                     run.path)
    run_info: dict[str, Any] = {}
    try:
        with MemoryMonitor(device) as monitor:
            records = prune_layers(
                model, adapter, calib_ids, solver, sparsity, round_to=round_to, device=device,
                batch_size=batch_size, progress=progress, layer_limit=layer_limit,
                probe=probe_ids, offload=offload, io=io, finished=finished, monitor=monitor,
                info=run_info,
            )
    except SpapError:
        # A problem of these settings (e.g. non-finite activations) recurs on every resume:
        # their run folder is of no use. Anything else (Ctrl-C, out of memory, a crash) keeps
        # it for a resume.
        if checkpoint_dir is not None:
            run.remove()
        raise
    if not unsaveable:  # in memory, nn.Linear uses a bias without any config flag
        add_missing_biases(model, adapter)
    widths = {r.kept for r in records}
    if layer_limit is None or layer_limit >= len(adapter.layers(model)):
        if len(widths) != 1:  # a uniform ratio gives one width; stock configs need it
            raise RuntimeError(f"layers ended with different widths {sorted(widths)}")
        adapter.set_width(model.config, widths.pop())
    t2 = time.perf_counter()
    params_after = count_params(model)
    removed = sum(r.width_before - r.kept for r in records)
    total = sum(r.width_before for r in records) or 1
    report = {
        "method": method,
        "options": solver_options(solver),
        "sparsity_requested": sparsity,
        "sparsity_achieved": removed / total,
        "saveable": not unsaveable,
        "round_to": round_to,
        "params_before": params_before,
        "params_after": params_after,
        "params_removed_frac": 1 - params_after / params_before,
        "model": {
            "model_type": model.config.model_type,
            "width_key": adapter.width_key,
            "width_before": width_before,
            "width_after": adapter.width(model.config),
            "layers": len(adapter.layers(model)),
            "layers_pruned": len(records),
            "dtype": dtype,
        },
        "device": str(device),
        "memory": {**monitor.report(), "activations": run_info.get("activations")},
        "resumed_from_layer": len(finished) if checkpoint_dir is not None else None,
        "calibration": calib_desc,
        "layer_error_mean": sum(r.rel_error for r in records) / max(len(records), 1),
        "layer_error_heldout_mean": _heldout_mean(records) if probe_ids is not None else None,
        "probe": probe_desc,
        "layers": [r.to_json() for r in records],
        "timings": {"calibration_data_s": t1 - t0, "prune_s": t2 - t1,
                    "capture_s": run_info.get("capture_s")},
        "versions": versions(),
    }
    return PruneResult(model, report, records, calib_ids)


def probe_description(probe_ids: torch.Tensor | None) -> dict[str, Any] | None:
    """The probe windows' description for the report; refuses a shape the pipeline can't use."""
    if probe_ids is None:
        return None
    if probe_ids.dim() != 2 or probe_ids.shape[0] < 1 or probe_ids.shape[1] < 1:
        raise SpapError(
            f"probe_ids must be (n_probe, seqlen) token ids, got shape {tuple(probe_ids.shape)}"
        )
    return {"windows": int(probe_ids.shape[0]), "seqlen": int(probe_ids.shape[1]),
            "tokens": int(probe_ids.numel()), "token_hash": token_hash(probe_ids)}


def _heldout_mean(records: list[LayerRecord]) -> float:
    errs = [r.rel_error_heldout for r in records if r.rel_error_heldout is not None]
    return sum(errs) / max(len(errs), 1)
