"""The resume folder's on-disk format: a run's identity, its finished layers, one file each.

A run that saves its result keeps a folder beside the output, `.<out>.spap-partial`, holding
`state.json` (what identifies the run, and the record of every finished layer) and one
safetensors file per finished layer (`layers/layer-00007.safetensors`, the pruned layer's
tensors under their full model names). Each file is written under a temporary name, flushed
to disk and renamed, and only then is the layer added to `state.json` (rewritten the same
way), so a kill at any instant (Ctrl-C, the OOM killer, a power cut) leaves a folder that
describes exactly the layers it holds.

What makes "the same run" is `run_identity`: the model (`identity.model_identity`), the
calibration and probe token hashes, the method and all its options, sparsity, round_to, batch
size, layer limit, dtype, device, the output layout and the package versions; a resume under
anything else is refused. How a resumed run continues is the driver's business
(`driver.stores.ToRunFolder`); this module only reads and writes the folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import SpapError
from ..files import fsync_replace, write_json_atomic
from ..versions import versions

STATE_FILE = "state.json"
PARTIAL_SUFFIX = ".spap-partial"


def partial_dir(out: str | os.PathLike) -> Path:
    """The run folder of output folder `out`: a hidden sibling, found again by the next run."""
    out = Path(out).expanduser()
    return out.parent / f".{out.name}{PARTIAL_SUFFIX}"


def run_identity(model_id: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Everything a resumed run must share with the interrupted one."""
    v = versions()
    return {"model": model_id, **settings,
            "versions": {k: v.get(k) for k in ("spap", "torch", "transformers")}}


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if old == new else [f"{path} {old!r} there, {new!r} now"]


class RunFolder:
    """The partial run's folder: identity, finished layer records, one file per layer."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.state: dict[str, Any] | None = None

    @property
    def layers_dir(self) -> Path:
        return self.path / "layers"

    def layer_file(self, index: int) -> Path:
        return self.layers_dir / f"layer-{index:05d}.safetensors"

    def _write_state(self) -> None:
        write_json_atomic(self.path / STATE_FILE, self.state, durable=True)

    def open(self, identity: dict[str, Any], resume: bool | None = None) -> list[dict[str, Any]]:
        """Start or continue the run; returns the records (as saved) of its finished layers.

        `resume` None continues a run of the same identity if there is one (and refuses one of
        another); True requires one; False discards whatever is there and starts afresh.
        """
        state_path = self.path / STATE_FILE
        if resume is False and self.path.exists():
            shutil.rmtree(self.path)
        if state_path.exists():
            old = json.loads(state_path.read_text())
            diff = _differences(old.get("identity"), identity)
            if diff:
                shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3
                                               else "")
                raise SpapError(
                    f"the unfinished run in '{self.path}' has other settings ({shown}); run "
                    "again with its settings to resume it, or pass --restart to discard it"
                )
            self.state = old
            records = self._finished(old)
            self.state["layers"] = records
            return list(records)
        if resume is True:
            raise SpapError(f"nothing to resume: there is no unfinished run in '{self.path}'; "
                            "drop --resume to start one")
        if self.path.exists():  # a run killed before its first state was written
            shutil.rmtree(self.path)
        self.layers_dir.mkdir(parents=True)
        self.state = {"identity": identity, "layers": []}
        self._write_state()
        return []

    def read(self, identity: dict[str, Any]) -> list[dict[str, Any]]:
        """The records of the finished layers of the run of this identity, without writing
        anything (the other ranks of a data-parallel run, once rank 0 has `open`ed it)."""
        state_path = self.path / STATE_FILE
        if not state_path.exists():
            return []
        old = json.loads(state_path.read_text())
        if _differences(old.get("identity"), identity):
            return []
        return self._finished(old)

    def _finished(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """Only the layers whose file is there, in order from layer 0."""
        records: list[dict[str, Any]] = []
        for r in state.get("layers", []):
            if r["index"] != len(records) or not self.layer_file(r["index"]).exists():
                break
            records.append(r)
        return records

    def save_layer(self, index: int, tensors: dict[str, torch.Tensor],
                   record: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        assert self.state is not None, "open() the run folder first"
        if index != len(self.state["layers"]):
            raise RuntimeError(f"layer {index} finished out of order")
        target = self.layer_file(index)
        tmp = target.with_name(f".{target.name}.tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        fsync_replace(tmp, target)
        self.state["layers"].append(record)
        self._write_state()

    def load_layer(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.layer_file(index)))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
