"""Files that are written whole or not at all.

Every JSON result, report and run state goes through `write_json_atomic`: the text is written
to a temporary name in the target's folder and renamed over the target, so a reader (or a run
killed mid-write) never sees half a file. `durable=True` also flushes the bytes and the rename
to disk, for files a resume must trust after a power cut.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def fsync_replace(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target` once its bytes are on disk, and make the rename durable."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    try:
        fd = os.open(target.parent, os.O_RDONLY)
    except OSError:  # no directory handles (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    """Write `text` to `path` through a temporary file and a rename (see the module doc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        if durable:
            fsync_replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def finite_or_none(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, data: Any, *, durable: bool = False,
                      nan: str = "refuse", default=None) -> Path:
    """Write `data` as indented JSON to `path`, atomically.

    `nan` says what a non-finite float does: "refuse" (ValueError: a result that should be
    finite is not), or "null" (written as null, e.g. lm-eval's standard error of a task with
    one item). `default` serializes objects json does not know (as in `json.dumps`).
    """
    if nan not in ("refuse", "null"):
        raise ValueError(f"nan must be 'refuse' or 'null', got {nan!r}")
    if nan == "null":
        data = finite_or_none(data)
    text = json.dumps(data, indent=2, allow_nan=False, default=default)
    return write_text_atomic(path, text, durable=durable)
