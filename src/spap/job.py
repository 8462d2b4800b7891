"""`spap prune` as one library call: load, (evaluate), prune, (evaluate), save; resumable.

`prune_to_disk` is what the command runs. It keeps a run folder beside the output
(`checkpoint.partial_dir`) where every finished layer is written, so a run killed at layer 70
of 80 continues from layer 70 when called again with the same settings (automatically, or
with `resume=True` to insist), with the same result bit for bit.

Two ways to hold the model:

- in memory (the default): the model is loaded whole with `from_pretrained`, pruned in place
  and saved by `export.save_pruned` (which reloads it and compares logits);
- `low_memory`: the model is built on the meta device and one decoder layer at a time is read
  from the checkpoint's safetensors files (spap.lazy); the output is assembled from the run
  folder as a standard sharded checkpoint (spap.shards). Host memory holds the embeddings,
  the head and one layer, plus the calibration activations when they are offloaded.

Each step is timed on its own (load, dense perplexity, prune, pruned perplexity, save).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SpapError

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    out: Path
    report: dict[str, Any]
    params_dense: int
    timings: dict[str, float] = field(default_factory=dict)


def _local_folder(src) -> Path:
    """A local folder with the checkpoint's files (a Hub id is downloaded to the HF cache)."""
    if src.kind == "gguf":
        raise SpapError("--low-memory reads safetensors checkpoints, not GGUF files; prune it "
                        "without --low-memory, or convert it with save_pretrained first")
    if src.kind != "hub":
        return Path(src.path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            src.path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # network, missing repo, auth: all a user can fix
        raise SpapError(f"could not download '{src.spec}' from the Hugging Face Hub ({e}); "
                        "pass a local folder") from None


def prune_to_disk(
    model: str,
    out: str | os.PathLike,
    sparsity: float,
    *,
    method: str = "spap",
    method_options: dict[str, Any] | None = None,
    calib: str = "wiki-offline",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    round_to: int = 1,
    batch_size: int = 4,
    offload: str = "auto",
    low_memory: bool = False,
    resume: bool | None = None,
    overwrite: bool = False,
    evaluate: bool = False,
    eval_seqlen: int = 2048,
    eval_windows: int | None = None,
    progress: bool = False,
) -> JobResult:
    """Prune model spec `model` (alias, folder, .gguf, Hub id) and save it to `out`.

    `resume` None continues an unfinished run of the same settings if its folder is there,
    True requires one, False discards it; a run folder of other settings is refused.
    `evaluate` adds the perplexity of the dense and the pruned model (`report["eval"]`); it
    needs the whole model and is refused with `low_memory`.
    """
    from .api import prune
    from .config import CalibConfig, PruneConfig
    from .modelio.export import check_output_dir
    from .modelio.loading import resolve_device
    from .modelio.runfolder import partial_dir
    from .solvers import get_solver

    t_start = time.perf_counter()
    options = dict(method_options or {})
    # Everything that can be checked without the model is checked first.
    PruneConfig(sparsity, method, options, round_to, batch_size).validate()
    CalibConfig(calib, nsamples, seqlen, seed).validate()
    get_solver(method, **options)
    if low_memory and evaluate:
        raise SpapError("--eval needs the whole model in memory, which --low-memory avoids; "
                        "run spap eval on the output afterwards, or drop --low-memory")
    out = check_output_dir(out, overwrite)
    device = resolve_device(device)
    run_dir = partial_dir(out)
    common = dict(method=method, method_options=options, calib=calib, nsamples=nsamples,
                  seqlen=seqlen, seed=seed, device=device, round_to=round_to,
                  batch_size=batch_size, progress=progress, offload=offload,
                  checkpoint_dir=run_dir, resume=resume)
    timings: dict[str, float] = {}
    if low_memory:
        return _low_memory(model, out, sparsity, dtype, device, overwrite, common, timings,
                           t_start)

    from .api import count_params
    from .eval.ppl import perplexity
    from .modelio.export import save_pruned
    from .modelio.loading import load_model
    from .modelio.runfolder import model_identity
    from .models import get_adapter

    model_obj, tok, src = load_model(model, dtype, device)
    timings["load_s"] = time.perf_counter() - t_start
    ev: dict[str, Any] = {}
    stream = None
    if evaluate:
        from .data import load_text, tokenize

        t0 = time.perf_counter()
        stream = tokenize(tok, load_text("wiki-offline", "test"))
        model_obj.to(device)
        ev["dense"] = perplexity(model_obj, tok, seqlen=eval_seqlen, windows=eval_windows,
                                 batch_size=batch_size, stream=stream, progress=progress)
        model_obj.to("cpu")
        timings["dense_eval_s"] = time.perf_counter() - t0
    params_dense = count_params(model_obj)
    model_id = model_identity(model_obj, get_adapter(model_obj.config), src.spec)
    t0 = time.perf_counter()
    result = prune(model_obj, tok, sparsity, model_id=model_id, **common)
    timings["prune_s"] = time.perf_counter() - t0
    report = result.report
    report["model"]["source"] = src.spec
    if evaluate:
        t0 = time.perf_counter()
        model_obj.to(device)
        ev["pruned"] = perplexity(model_obj, tok, seqlen=eval_seqlen, windows=eval_windows,
                                  batch_size=batch_size, stream=stream, progress=progress)
        model_obj.to("cpu")
        timings["pruned_eval_s"] = time.perf_counter() - t0
        report["eval"] = ev
    # the report keeps its own prune_s (the layers, without drawing the calibration windows)
    report["timings"].update({k: v for k, v in timings.items() if k != "prune_s"})
    report["timings"]["total_s"] = time.perf_counter() - t_start
    t0 = time.perf_counter()
    check = result.calib_ids[:1, : min(64, result.calib_ids.shape[1])]
    save_pruned(model_obj, tok, out, report, overwrite=overwrite, check_ids=check)
    timings["save_s"] = time.perf_counter() - t0
    from .modelio.runfolder import RunFolder

    RunFolder(run_dir).remove()
    return JobResult(out, report, params_dense, timings)


def _low_memory(spec: str, out: Path, sparsity: float, dtype: str, device: str,
                overwrite: bool, common: dict[str, Any], timings: dict[str, float],
                t_start: float) -> JobResult:
    from transformers import AutoTokenizer, GenerationConfig

    from .api import count_params, prune
    from .modelio.loading import load_config, resolve_dtype, resolve_model
    from .modelio.reader import CheckpointReader, empty_model, load_outside_layers, model_identity
    from .modelio.runfolder import RunFolder
    from .modelio.shards import write_sharded
    from .models import get_adapter

    src = resolve_model(spec)
    folder = _local_folder(src)
    config = load_config(src)
    adapter = get_adapter(config)  # fail fast on an unsupported architecture
    reader = CheckpointReader(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    model = empty_model(config, resolve_dtype(dtype, device))
    layers = adapter.layers(model)
    load_outside_layers(model, layers, reader)
    gen = (GenerationConfig.from_pretrained(folder)
           if (folder / "generation_config.json").exists() else model.generation_config)
    down = adapter.out_linear(layers[0])
    out_weight = next(n for n, m in layers[0].named_modules() if m is down) + ".weight"
    model_id = model_identity(src.spec, config, reader, model, layers, out_weight)
    timings["load_s"] = time.perf_counter() - t_start
    params_dense = count_params(model)
    t0 = time.perf_counter()
    result = prune(model, tok, sparsity, model_id=model_id, source=reader, **common)
    timings["prune_s"] = time.perf_counter() - t0
    report = result.report
    report["model"]["source"] = src.spec
    report["low_memory"] = True
    # the report keeps its own prune_s (the layers, without drawing the calibration windows)
    report["timings"].update({k: v for k, v in timings.items() if k != "prune_s"})
    report["timings"]["total_s"] = time.perf_counter() - t_start
    t0 = time.perf_counter()
    write_sharded(model, layers, RunFolder(common["checkpoint_dir"]), tok, gen, report, out,
                  overwrite=overwrite)
    timings["save_s"] = time.perf_counter() - t0
    return JobResult(out, report, params_dense, timings)
