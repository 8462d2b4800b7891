"""Save a pruned model so that stock `AutoModelForCausalLM.from_pretrained(out)` loads it.

The folder is written under a temporary name beside the target and renamed at the end, so a
failure never leaves a half-written output. Before the rename, the folder is reloaded with
stock transformers onto the pruned model's own device in its own dtype, and checked against
it twice (`reload_check`): every parameter must be bit for bit the same (a safetensors round
trip is lossless, so any difference means the file is not the model), and the logits on a
few tokens must agree within a tolerance set by that dtype (the same weights through the same
kernels; what a config the model's code reads differently would change).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import SpapError
from .card import write_card

REPORT_NAME = "spap.json"


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty output folder unless `overwrite`; call before any long work."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise SpapError(f"output '{out}' exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SpapError(
            f"output folder '{out}' is not empty; pass --overwrite or choose another --out"
        )
    return out


def _check_uniform_widths(model) -> None:
    """Stock configs hold one MLP width: refuse a model pruned in only some layers."""
    from ..models import get_adapter

    adapter = get_adapter(model.config)
    widths = {adapter.out_linear(layer).in_features for layer in adapter.layers(model)}
    if widths != {adapter.width(model.config)}:
        raise SpapError(
            f"layers have MLP widths {sorted(widths)} but the config says "
            f"{adapter.width(model.config)}; only a model pruned in every layer can be saved"
        )


#: logits of the same weights through the same kernels differ at most by a reordered sum:
#: a few units of the dtype's resolution at the logits' scale; more means another model
LOGIT_TOLERANCE_EPS = 8


def logit_tolerance(dtype: torch.dtype, scale: float) -> float:
    """Largest max-abs logit difference accepted between a model and its reload in `dtype`,
    for logits of largest magnitude `scale` (taken as at least 1): `LOGIT_TOLERANCE_EPS`
    units of the dtype's machine epsilon at that scale (float32: 9.5e-7 * scale, bfloat16:
    6.3e-2 * scale)."""
    return LOGIT_TOLERANCE_EPS * torch.finfo(dtype).eps * max(scale, 1.0)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits in the model's own dtype, on the model's own device."""
    return model(ids.to(next(model.parameters()).device), use_cache=False).logits


def _device_map(model):
    """Where the reload goes: the pruned model's own placement."""
    placed = getattr(model, "hf_device_map", None)
    return placed if placed else str(next(model.parameters()).device)


@torch.no_grad()
def reload_check(model, folder: Path, ids: torch.Tensor) -> dict[str, Any]:
    """Reload `folder` with stock transformers onto `model`'s device in `model`'s dtype and
    compare: parameters bit for bit, then the logits on `ids` within `logit_tolerance`.
    Raises RuntimeError on a mismatch; returns what was measured."""
    from transformers import AutoModelForCausalLM

    dtype = model.dtype
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                    device_map=_device_map(model)).eval()
    try:
        mine, theirs = dict(model.named_parameters()), dict(reloaded.named_parameters())
        if mine.keys() != theirs.keys():
            odd = sorted(mine.keys() ^ theirs.keys())
            raise RuntimeError(f"the reloaded model has other parameters than the pruned one "
                               f"({', '.join(odd[:3])}); this is a bug in spap, please report it")
        for name, p in mine.items():
            q = theirs[name]
            if q.dtype != p.dtype or q.shape != p.shape or not torch.equal(q.to(p.device), p):
                raise RuntimeError(f"saved tensor {name} differs from the pruned model's after "
                                   "reloading; this is a bug in spap, please report it")
        a, b = _logits(model, ids), _logits(reloaded, ids)
        diff = float((a.float() - b.float().to(a.device)).abs().max())
        scale = float(a.float().abs().max())
        tol = logit_tolerance(dtype, scale)
        if not diff <= tol:  # (a NaN fails too)
            raise RuntimeError(
                f"reloaded model's logits differ from the pruned model's by {diff:.3g} (at most "
                f"{tol:.3g} in {str(dtype).replace('torch.', '')}) with the same weights: the "
                "saved config does not describe the pruned model; this is a bug in spap, "
                "please report it")
    finally:
        del reloaded
    return {"kind": "reload: parameters bit for bit, logits within the dtype's tolerance",
            "dtype": str(dtype).replace("torch.", ""), "device": str(a.device),
            "max_abs_logit_diff": diff, "logit_scale": scale, "tolerance": tol,
            "tokens": int(ids.numel())}


def write_report(report: dict[str, Any], folder: Path, t_save: float) -> None:
    """Write `report` as spap.json into `folder`, its timings completed by the save's own time
    (from `t_save`, a `time.perf_counter()` reading taken when the save began)."""
    timings = report.get("timings")
    if isinstance(timings, dict):
        save_s = time.perf_counter() - t_save
        timings["save_s"] = save_s
        if "total_s" in timings:
            timings["total_s"] += save_s
    with open(folder / REPORT_NAME, "w") as f:
        json.dump(report, f, indent=2)


def save_pruned(
    model,
    tokenizer,
    out: str | os.PathLike,
    report: dict[str, Any],
    *,
    overwrite: bool = False,
    check_ids: torch.Tensor | None = None,
) -> Path:
    """Write weights (safetensors), tokenizer, spap.json and a model card (README.md,
    `card.py`) to `out`, verified by a reload (`reload_check`) on `check_ids` when given."""
    t0 = time.perf_counter()
    out = check_output_dir(out, overwrite)
    _check_uniform_widths(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.spap-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if check_ids is not None:
            report["reload_check"] = reload_check(model, tmp, check_ids)
        write_card(tmp, report, model.config)
        write_report(report, tmp, t0)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
