"""Which precision the matrix products of a run use: bf16 where the device multiplies it fast.

A pruning run is dominated by matrix products: the calibration forwards of every layer and
recovery's Adam steps. On a GPU with tensor cores and on a CPU with bf16 matrix units (Intel
AMX, AVX512-BF16) a bf16 product runs several times faster than a float32 one (measured at
8x on one thread of an AMX CPU for SmolLM2's MLP shapes). Sums and solves do not change
precision: the statistics a decision or a closed form is computed from are accumulated in
float32 within a chunk and in float64 across chunks, and every solve runs in the solver's own
dtype. What runs in bf16 is exactly what `autocast` covers (linear layers and the products
inside them), with float32 master weights wherever weights are trained.

The setting (`PruneConfig.compute`):

- "auto": bf16 where the hardware has fast bf16 matrix units (`detect`), else float32;
- "float32": today's path bit for bit (no autocast anywhere), to reproduce earlier results;
- "bfloat16": bf16 products whatever the hardware (slow, but the same numbers, on a CPU
  without bf16 units).

TF32 is not used: every product that may lose precision already runs in bf16 under autocast,
which is faster than TF32, and the float32 products that remain are in solves and sums, where
TF32's 10-bit mantissa is not allowed.

The choice is resolved once per run (`resolve`) and handed to the driver and the solvers as an
argument (`Precision.compute`); nothing here is global state.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import COMPUTE_MODES
from .errors import SpapError

#: /proc/cpuinfo flags of CPUs with bf16 matrix or dot-product units
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: a CPU without readable flags counts as having bf16 units when a bf16 product of this size
#: is at least PROBE_SPEEDUP times faster than the float32 one
PROBE_SHAPE = (256, 256)
PROBE_SPEEDUP = 2.0


@dataclass
class Precision:
    """The resolved setting: `compute` is the dtype of the matrix products (torch.bfloat16 or
    torch.float32); `setting` what was asked; `detection` what the hardware said."""

    compute: torch.dtype
    setting: str = "float32"
    device_type: str = "cpu"
    detection: dict[str, Any] = field(default_factory=dict)

    @property
    def mixed(self) -> bool:
        return self.compute != torch.float32

    def autocast(self):
        """A context in which linear layers multiply in `compute` (nothing when float32)."""
        return autocast(self.device_type, self.compute)

    def to_json(self) -> dict[str, Any]:
        return {"setting": self.setting, "compute": str(self.compute).replace("torch.", ""),
                "device_type": self.device_type, "tf32": False, "detection": self.detection}


FLOAT32 = Precision(torch.float32)


def autocast(device_type: str, dtype: torch.dtype):
    """torch.autocast to `dtype` on `device_type`, or a no-op for float32 (so the float32 path
    is the code without autocast, bit for bit)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def exact(device_type: str):
    """A context inside an autocast region in which products run in their operands' own
    dtype again: for statistics gathered by hooks during an autocast forward."""
    return torch.autocast(device_type, enabled=False)


@contextlib.contextmanager
def bf16_products(device_type: str):
    """A context in which float32 matrix products on the CPU round their operands to bf16 and
    multiply them on the bf16 units, accumulating and returning float32 (oneDNN's bf16 math
    mode; measured 3x faster than float32 for SmolLM2's shapes on one AMX thread). A product
    of two bf16 numbers is exact in float32, so for operands that are bf16 numbers already
    this is the float32 product, up to the order of the float32 sums. Elsewhere, or where
    torch lacks the setting, nothing changes. The setting is restored on exit."""
    mm = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if device_type != "cpu" or mm is None or not hasattr(mm, "fp32_precision"):
        yield
        return
    old = mm.fp32_precision
    mm.fp32_precision = "bf16"
    try:
        yield
    finally:
        mm.fp32_precision = old


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags, or None where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _probe_cpu() -> float:
    """float32 time over bf16 time of one small product on this CPU (after a warm-up)."""
    a = torch.randn(*PROBE_SHAPE)
    times = []
    for dt in (torch.float32, torch.bfloat16):
        x = a.to(dt)
        x @ x
        t = time.perf_counter()
        for _ in range(8):
            x @ x
        times.append(time.perf_counter() - t)
    return times[0] / max(times[1], 1e-12)


def detect(device: torch.device | str, flags: set[str] | None = None) -> dict[str, Any]:
    """Whether `device` multiplies bf16 fast, and how that was found: {"bf16_fast": bool, ...}.
    CUDA: compute capability 8.0 or later (bf16 tensor cores). CPU: one of CPU_BF16_FLAGS in
    /proc/cpuinfo (`flags` to override), or, without flags, a micro-probe (PROBE_SPEEDUP)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"bf16_fast": major >= 8, "how": "cuda compute capability",
                "capability": f"{major}.{minor}"}
    if device.type != "cpu":
        return {"bf16_fast": False, "how": f"no rule for device type {device.type}"}
    out: dict[str, Any] = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    flags = cpu_flags() if flags is None else flags
    if flags is not None:
        found = sorted(f for f in CPU_BF16_FLAGS if f in flags)
        return {**out, "bf16_fast": bool(found), "how": "cpu flags", "flags": found}
    speedup = _probe_cpu()
    return {**out, "bf16_fast": speedup >= PROBE_SPEEDUP, "how": "probe",
            "bf16_speedup": round(speedup, 2)}


def resolve(setting: str, device: torch.device | str,
            detection: dict[str, Any] | None = None) -> Precision:
    """The precision of a run on `device` for `setting` (one of COMPUTE_MODES). The hardware
    is only consulted for "auto" (or `detection` is taken as given)."""
    if setting not in COMPUTE_MODES:
        raise SpapError(f"--compute must be one of {', '.join(COMPUTE_MODES)}, got '{setting}'")
    device = torch.device(device)
    if setting == "float32":
        return Precision(torch.float32, setting, device.type)
    if setting == "bfloat16":
        return Precision(torch.bfloat16, setting, device.type)
    det = detect(device) if detection is None else detection
    return Precision(torch.bfloat16 if det["bf16_fast"] else torch.float32, setting,
                     device.type, det)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
