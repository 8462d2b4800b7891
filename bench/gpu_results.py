"""What bench/labs/gpu_check.py and bench/gpu_8b.py share: a timestamped log and the results
document, a JSON file rewritten atomically after every step, where a failed step is recorded
(error and traceback) and the next one runs. On the GPU machine a run may be cut off at its
time limit; whatever finished is then already on disk."""

from __future__ import annotations

import argparse
import gc
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spap.files import write_json_atomic

T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(x, spec: str) -> str:
    """A number for the summary tables; "-" when it was not measured."""
    return "-" if x is None else format(x, spec)


def _json_default(o: Any) -> Any:
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return repr(o)


class Results:
    """The JSON document `<out>/<name>`, rewritten atomically after every step and run."""

    def __init__(self, out: Path, name: str, args: argparse.Namespace):
        self.path = out / name
        self.data: dict[str, Any] = {"args": vars(args), "steps": {}}
        out.mkdir(parents=True, exist_ok=True)
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = time.perf_counter() - T_START
        # non-finite floats as null: a failed step's NaN must not cost the whole document
        write_json_atomic(self.path, self.data, nan="null", default=_json_default)

    def step(self, name: str, fn: Callable[[dict[str, Any]], None]) -> None:
        """Run fn(record) guarded; the record is stored as data[name]."""
        record: dict[str, Any] = {}
        self.data[name] = record
        status = self.data["steps"][name] = {"ok": None}
        log(f"== step {name}")
        t0 = time.perf_counter()
        try:
            fn(record)
            status["ok"] = True
        except Exception as exc:  # recorded, never fatal
            status.update(ok=False, error=f"{type(exc).__name__}: {exc}",
                          traceback=traceback.format_exc())
            log(f"step {name} FAILED: {type(exc).__name__}: {exc}")
        status["seconds"] = time.perf_counter() - t0
        self.write()

    def finish(self, summary: Callable[[dict[str, Any]], str]) -> int:
        """The last write, the summary table and where the file is; 0 when every step ran."""
        self.write()
        print(summary(self.data), flush=True)
        print(f"results in {self.path}", flush=True)
        return 0 if all(s["ok"] for s in self.data["steps"].values()) else 1


def quiet_hub_bars() -> None:
    """Turn off transformers' download and save/reload bars: they would crowd the log."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:
        pass
