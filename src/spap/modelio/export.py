"""Save a pruned model so that stock `AutoModelForCausalLM.from_pretrained(out)` loads it.

The folder is written under a temporary name beside the target and renamed at the end, so a
failure never leaves a half-written output. Before the rename, the folder is reloaded with
stock transformers and its logits are compared with the in-memory pruned model.
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


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids.to(next(model.parameters()).device), use_cache=False).logits.float().cpu()


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
    """Write weights (safetensors), tokenizer and spap.json to `out`, verified by a reload."""
    from transformers import AutoModelForCausalLM

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
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=model.dtype)
            reloaded.eval()
            a, b = _logits(model, check_ids), _logits(reloaded, check_ids)
            diff = float((a - b).abs().max())
            scale = float(a.abs().max())
            report["reload_check"] = {"max_abs_logit_diff": diff, "logit_scale": scale,
                                      "tokens": int(check_ids.numel())}
            if not torch.allclose(a, b, rtol=1e-3, atol=1e-3 * max(scale, 1.0)):
                raise RuntimeError(
                    f"reloaded model's logits differ from the pruned model's (max {diff:.3g}); "
                    "this is a bug in spap, please report it"
                )
            del reloaded
        write_report(report, tmp, t0)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
