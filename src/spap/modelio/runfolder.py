"""Resume a killed run from its last finished layer.

A run that saves its result keeps a folder beside the output, `.<out>.spap-partial`, holding
`state.json` (what identifies the run, and the record of every finished layer) and one
safetensors file per finished layer (`layers/layer-00007.safetensors`, the pruned layer's
tensors under their full model names). Each file is written under a temporary name, flushed
to disk and renamed, and only then is the layer added to `state.json` (rewritten the same
way), so a kill at any instant (Ctrl-C, the OOM killer, a power cut) leaves a folder that
describes exactly the layers it holds.

Resuming loads the finished layers pruned, runs them again on the calibration (and probe)
batches to rebuild the next layer's inputs, and prunes on from there. The rebuilt inputs are
the same computation on the same weights as in the uninterrupted run, so on the same machine
the result is bit-identical. What makes "the same run" is `run_identity`: the model (source,
config, a fingerprint of two weight tensors), the calibration and probe token hashes, the
method and all its options, sparsity, round_to, batch size, layer limit, dtype, device, the
output layout and the package versions; a resume under anything else is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..driver.pipeline import LayerIO, LayerRecord
from ..errors import SpapError

STATE_FILE = "state.json"
PARTIAL_SUFFIX = ".spap-partial"


def partial_dir(out: str | os.PathLike) -> Path:
    """The run folder of output folder `out`: a hidden sibling, found again by the next run."""
    out = Path(out).expanduser()
    return out.parent / f".{out.name}{PARTIAL_SUFFIX}"


def _fsync_replace(tmp: Path, target: Path) -> None:
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


def write_json_durable(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    _fsync_replace(tmp, path)


def config_hash(config) -> str:
    d = config.to_dict()
    d.pop("_name_or_path", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tensor_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def relative_name(root: nn.Module, target: nn.Module) -> str:
    for name, m in root.named_modules():
        if m is target:
            return name
    raise ValueError(f"{type(target).__name__} is not inside {type(root).__name__}")


def layer_prefix(model: nn.Module, layers: nn.ModuleList, index: int) -> str:
    """State-dict prefix of decoder layer `index`, e.g. "model.layers.7."."""
    return f"{relative_name(model, layers)}.{index}."


def model_identity(model: nn.Module, adapter, source: str | None = None) -> dict[str, Any]:
    """What identifies an in-memory dense model: its source, config and a fingerprint of the
    first and last layers' down projections (cheap, and different for any two checkpoints
    that differ in those layers)."""
    layers = adapter.layers(model)
    ends = {}
    for i in (0, len(layers) - 1):
        down = adapter.out_linear(layers[i])
        ends[layer_prefix(model, layers, i) + relative_name(layers[i], down)] = down.weight
    return {"source": source or getattr(model.config, "_name_or_path", ""),
            "config_sha": config_hash(model.config), "fingerprint": tensor_fingerprint(ends)}


def run_identity(model_id: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Everything a resumed run must share with the interrupted one."""
    from ..api import versions

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

    def open(self, identity: dict[str, Any], resume: bool | None = None) -> list[LayerRecord]:
        """Start or continue the run; returns the records of its finished layers.

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
            # only the layers whose file is there, in order from layer 0
            records = []
            for r in old.get("layers", []):
                if r["index"] != len(records) or not self.layer_file(r["index"]).exists():
                    break
                records.append(LayerRecord(**r))
            self.state["layers"] = [r.to_json() for r in records]
            return records
        if resume is True:
            raise SpapError(f"nothing to resume: there is no unfinished run in '{self.path}'; "
                            "drop --resume to start one")
        if self.path.exists():  # a run killed before its first state was written
            shutil.rmtree(self.path)
        self.layers_dir.mkdir(parents=True)
        self.state = {"identity": identity, "layers": []}
        write_json_durable(state_path, self.state)
        return []

    def save_layer(self, index: int, tensors: dict[str, torch.Tensor],
                   record: LayerRecord) -> None:
        from safetensors.torch import save_file

        assert self.state is not None, "open() the run folder first"
        if index != len(self.state["layers"]):
            raise RuntimeError(f"layer {index} finished out of order")
        target = self.layer_file(index)
        tmp = target.with_name(f".{target.name}.tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        _fsync_replace(tmp, target)
        self.state["layers"].append(record.to_json())
        write_json_durable(self.path / STATE_FILE, self.state)

    def load_layer(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.layer_file(index)))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def layer_tensors(layer: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The layer's state_dict on the CPU under full model names."""
    return {prefix + k: v.detach().to("cpu").contiguous() for k, v in layer.state_dict().items()}


class CheckpointIO(LayerIO):
    """Writes every finished layer to the run folder; a resumed layer is loaded from it.

    The write (serialise, fsync, rename, then the state) runs on a background thread while
    the next layer is pruned; at most one write is in flight, so at most one finished layer's
    tensors are held for it. `close` waits for it: a run stopped by Ctrl-C still records the
    layer it was writing.
    """

    def __init__(self, run: RunFolder, model: nn.Module, layers: nn.ModuleList):
        self.run = run
        self._prefix = relative_name(model, layers) + "."
        self._writing: threading.Thread | None = None
        self._error: BaseException | None = None

    def prefix(self, index: int) -> str:
        return f"{self._prefix}{index}."

    def load(self, index: int, layer: nn.Module, finished: bool) -> None:
        if not finished:
            return
        from .reader import assign_tensors

        p = self.prefix(index)
        tensors = self.run.load_layer(index)
        assign_tensors(layer, {k[len(p):]: v for k, v in tensors.items()})

    def save(self, index: int, layer: nn.Module, record: LayerRecord) -> None:
        self._wait()
        # CPU tensors that share the layer's storage: a later release of the layer (to meta)
        # leaves them alive until written
        tensors = layer_tensors(layer, self.prefix(index))

        def write() -> None:
            try:
                self.run.save_layer(index, tensors, record)
            except BaseException as exc:  # reported by the next save or close
                self._error = exc

        self._writing = threading.Thread(target=write, name="spap-checkpoint")
        self._writing.start()

    def _wait(self) -> None:
        if self._writing is not None:
            self._writing.join()
            self._writing = None
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc

    def close(self) -> None:
        self._wait()
