"""The settings of a pruning run: one object from the command line to the library.

`PruneConfig` holds everything that decides a run (what to prune and how, the calibration
draw, where it computes, what it writes); `spap prune`'s flags are named after its fields,
`spap.prune(...)` and `spap.prune_to_disk(...)` take its fields as keywords, and the driver
reads it. It is validated before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import SpapError

OFFLOAD_MODES = ("auto", "cpu", "device")
#: PruneConfig.compute (precision.py resolves it)
COMPUTE_MODES = ("auto", "float32", "bfloat16")
#: how --params splits its budget (driver/budget.py), and what it counts
PARAMS_SPLITS = ("auto", "mlp", "heads", "kv")
PARAMS_OF = ("all", "non-embedding")
#: --bos: the tokenizer's own default, a BOS in front of every window, or none (data.py)
BOS_MODES = ("auto", "always", "never")


def check_bos(mode: str) -> None:
    if mode not in BOS_MODES:
        raise SpapError(f"--bos must be one of {', '.join(BOS_MODES)}, got '{mode}'")


@dataclass
class CalibConfig:
    """Calibration data: `nsamples` random windows of `seqlen` tokens from `source`."""

    source: str = "wiki-offline"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    # a BOS token in front of every window: "auto" (as the tokenizer does), "always", "never"
    bos: str = "auto"

    def validate(self) -> None:
        check_bos(self.bos)
        if self.nsamples < 1:
            raise SpapError(f"--nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen < 2:
            raise SpapError(f"--seqlen must be at least 2, got {self.seqlen}")


@dataclass
class PruneConfig:
    # what is pruned, and how
    sparsity: float = 0.3
    method: str = "spap"
    method_options: dict[str, Any] = field(default_factory=dict)
    # a named set of method options (solvers/presets.py: fast, default, max); explicit
    # method_options override it. None: "default" for spap, the method's own defaults for a
    # baseline (presets.DEFAULT_LEVEL)
    effort: str | None = None
    round_to: int = 1
    layer_limit: int | None = None  # prune only the first N layers (smoke runs)
    # attention: the fraction of query heads removed in every KV group, and of whole KV
    # groups (with their query heads); the head decision's method and its options
    heads: float = 0.0
    kv_groups: float = 0.0
    head_method: str = "obs"
    head_options: dict[str, Any] = field(default_factory=dict)
    # a parameter budget instead: remove this fraction of the parameters (`params_of`: all,
    # or non-embedding), the split between MLP channels and heads chosen by `params_split`
    # (driver/budget.py); it then sets sparsity, heads and kv_groups
    params: float | None = None
    params_of: str = "all"
    params_split: str = "mlp"
    # calibration windows (see CalibConfig)
    calib: str = "wiki-offline"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    # a BOS token in front of every window (calibration and perplexity): "auto" (when the
    # tokenizer adds one by itself), "always", "never" (data.py)
    bos: str = "auto"
    # where it computes: None is the model's own device for spap.prune, "auto" otherwise
    device: str | None = None
    dtype: str = "auto"
    # the precision of the matrix products (precision.py): auto (bf16 where the hardware
    # multiplies it fast), float32 (the earlier path, bit for bit) or bfloat16
    compute: str = "auto"
    batch_size: int = 4
    offload: str = "auto"
    # what spap.prune_to_disk does around the pruning
    low_memory: bool = False
    resume: bool | None = None
    overwrite: bool = False
    evaluate: bool = False
    eval_seqlen: int = 2048
    eval_windows: int | None = None
    progress: bool = False
    push_to_hub: str | None = None  # a Hub repository id the saved folder is uploaded to

    @classmethod
    def build(cls, config: PruneConfig | None = None, **settings: Any) -> PruneConfig:
        """`config` (or the defaults) with `settings` replaced; unknown names are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise SpapError(f"unknown setting(s) {', '.join(unknown)}; the settings are "
                            f"{', '.join(sorted(names))}")
        base = config if config is not None else cls()
        out = dataclasses.replace(base, **settings)
        out.method_options = dict(out.method_options or {})
        out.head_options = dict(out.head_options or {})
        return out

    @property
    def prunes_heads(self) -> bool:
        return bool(self.heads) or bool(self.kv_groups)

    @property
    def calibration(self) -> CalibConfig:
        return CalibConfig(self.calib, self.nsamples, self.seqlen, self.seed, self.bos)

    def validate(self) -> None:
        _check_fraction("sparsity", self.sparsity, 0.3)
        _check_fraction("heads", self.heads, 0.25)
        _check_fraction("kv_groups", self.kv_groups, 0.25)
        if self.params is not None:
            _check_fraction("params", self.params, 0.2, zero=False)
            if self.params_split not in PARAMS_SPLITS:
                raise SpapError(f"--params-split must be one of {', '.join(PARAMS_SPLITS)}, "
                                f"got '{self.params_split}'")
            if self.params_of not in PARAMS_OF:
                raise SpapError(f"--params-of must be one of {', '.join(PARAMS_OF)}, got "
                                f"'{self.params_of}'")
            if self.prunes_heads:
                raise SpapError("--params chooses the heads to remove itself; drop --heads and "
                                "--kv-groups, or pick the split with --params-split")
        if self.prunes_heads and self.layer_limit is not None:
            raise SpapError("head pruning changes the config's head counts, which every layer "
                            "must share: it cannot be combined with a layer limit")
        if self.round_to < 1:
            raise SpapError(
                f"--round-to must be a positive multiple such as 8, 64 or 128, got {self.round_to}"
            )
        if self.compute not in COMPUTE_MODES:
            raise SpapError(f"--compute must be one of {', '.join(COMPUTE_MODES)}, "
                            f"got '{self.compute}'")
        if self.batch_size < 1:
            raise SpapError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.offload not in OFFLOAD_MODES:
            raise SpapError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, "
                            f"got '{self.offload}'")
        if self.low_memory and self.evaluate:
            raise SpapError("--eval needs the whole model in memory, which --low-memory "
                            "avoids; run spap eval on the output afterwards, or drop "
                            "--low-memory")
        if self.eval_seqlen < 2:
            raise SpapError(f"--eval-seqlen must be at least 2, got {self.eval_seqlen}")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise SpapError(f"--eval-windows must be at least 1, got {self.eval_windows}")
        self.calibration.validate()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _check_fraction(name: str, x: Any, example: float, zero: bool = True) -> None:
    """SpapError unless `x` is a number in [0, 1) (`zero=False`: in (0, 1))."""
    if (not isinstance(x, (int, float)) or not math.isfinite(x) or not x < 1
            or not (0 <= x if zero else 0 < x)):
        flag = "--" + name.replace("_", "-")
        raise SpapError(f"{flag} must be in {'[' if zero else '('}0, 1), got {x}; e.g. "
                        f"{flag} {example:g}")


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """`key=value` strings into a dict, values parsed as int, float, bool or kept as str."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SpapError(f"--option expects key=value, got '{item}'")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = _parse_value(v.strip())
    return out


def _parse_value(v: str) -> Any:
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v
