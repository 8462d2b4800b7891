"""Peak host memory of one model's run, measured in a fresh subprocess.

On CPU the process peak RSS is process-wide and never goes down, so it
cannot be split between two models living in one process, and the allocator keeps freed pages
from earlier runs. Each model is therefore saved to a temporary folder and run once (the largest
setting) in a fresh Python subprocess, which reports its RSS (psutil) after imports, after
loading, and the peak during the run. The peak is the kernel's RSS high-water mark (VmHWM, the
figure getrusage's ru_maxrss is built from; psutil does not expose it), reset after loading
through /proc/self/clear_refs where Linux allows it, so a loading spike does not hide the run's
peak; elsewhere ru_maxrss (`spap.memory.process_max_rss_bytes`) is used and the run's peak is
reported only when it exceeds the loading peak. The parent's own process-wide ru_maxrss is
reported too, labelled as such.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
import torch

from ...memory import process_max_rss_bytes
from .flops import weight_bytes
from .runs import generate, model_dtype, prefill, vocab_size

logger = logging.getLogger(__name__)


def _peak_rss_bytes() -> int:
    """The RSS high-water mark. VmHWM is read first because it is the mm's own counter, the
    one /proc/self/clear_refs resets; getrusage also folds in the peak recorded when any thread
    exits (loader threads do), so after a reset it can still report the loading peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, IndexError, ValueError):
        pass
    return process_max_rss_bytes()


def _current_rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0), so VmHWM counts only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_in_subprocess(
    model: Any, batch: int, prompt_len: int, gen_tokens: int, keep: bool, seed: int
) -> dict[str, Any]:
    """Run one prefill + decode of `model` in a fresh interpreter and return its RSS figures.

    The weights go through safetensors' `save_model` and the config through JSON rather than
    `save_pretrained`, which refuses models loaded from GGUF (their quantizer is marked not
    serialisable even though the weights are plain dequantised tensors). A failure here is
    logged and recorded, never raised: it must not throw away a finished timing run.
    """
    from safetensors.torch import save_model

    src_root = str(Path(__file__).resolve().parents[3])  # the folder holding the spap package
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src_root, os.environ.get("PYTHONPATH", "")]),
    }
    try:
        with tempfile.TemporaryDirectory(prefix="spap-rss-") as tmp:
            config = model.config.to_dict()
            config.pop("quantization_config", None)  # the weights saved are dequantised
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            save_model(model, str(Path(tmp) / "model.safetensors"))
            job = {
                "path": tmp,
                "dtype": str(model_dtype(model)).removeprefix("torch."),
                "batch": batch,
                "prompt_len": prompt_len,
                "gen_tokens": gen_tokens,
                "keep": keep,
                "seed": seed,
                "threads": torch.get_num_threads(),
                "out": str(Path(tmp) / "rss.json"),
            }
            cmd = [sys.executable, "-c", "from spap.eval.speed.rss import child_main; child_main()"]
            proc = subprocess.run(
                [*cmd, json.dumps(job)], env=env, capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or [
                    "exit status " + str(proc.returncode)
                ]
                raise RuntimeError(f"RSS subprocess failed: {tail[0]}")
            return json.loads(Path(job["out"]).read_text())
    except Exception as exc:  # memory is optional; the timings must survive
        logger.warning("CPU memory measurement skipped: %s", exc)
        return {"error": str(exc)}


def child_main() -> None:
    """Entry point of the RSS subprocess: load, reset the peak, run, write the figures."""
    job = json.loads(sys.argv[1])
    torch.set_num_threads(job["threads"])
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    after_import = _current_rss_bytes()
    dtype = getattr(torch, job["dtype"])
    config = AutoConfig.from_pretrained(job["path"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    load_model(model, str(Path(job["path"]) / "model.safetensors"))
    model.eval()
    load_peak = _peak_rss_bytes()
    after_load = _current_rss_bytes()
    reset = _reset_peak_rss()
    generator = torch.Generator().manual_seed(job["seed"])
    ids = torch.randint(
        0, vocab_size(model), (job["batch"], job["prompt_len"]), generator=generator
    )
    prefill(model, ids, job["keep"])
    generate(model, ids, job["gen_tokens"] + 1)
    run_peak = _peak_rss_bytes()
    result = {
        "rss_after_import": after_import,
        "rss_after_load": after_load,
        "load_peak_rss": load_peak,
        "run_peak_rss": run_peak,
        # Without the reset the run's peak is only visible when it exceeds the loading peak.
        "peak_reset": reset,
        "run_peak_above_loaded": (run_peak - after_load if reset or run_peak > load_peak else None),
        "weight_bytes": weight_bytes(model),
    }
    Path(job["out"]).write_text(json.dumps(result))
