"""Where the driver's layers come from and where finished layers go.

The driver (`pipeline.prune_layers`) asks a `LayerSource` for decoder layer i's weights
before it prunes the layer and tells it when the layer is no longer needed; it hands every
finished layer to a `LayerSink`, which may already hold the first layers of an interrupted
run. It never knows which it has:

- sources: `IN_MODEL` (the weights are in the model already) and `FromCheckpoint` (the
  model was built on the meta device; layer i is read from the checkpoint's safetensors when
  its turn comes and turned back into meta tensors, keeping its new shapes, once written);
- sinks: `IN_MODEL` (the pruned layer stays in the model) and `ToRunFolder` (every finished
  layer is written to the resume folder, `modelio.runfolder`, on a background thread; a
  resumed run gets the finished layers back from it, pruned). The output shards of a
  low-memory run are that folder's files, assembled by `modelio.shards` at the end.
"""

from __future__ import annotations

import threading
from typing import Any

from torch import nn

from ..memory import trim_host_heap
from ..modelio.reader import CheckpointReader, assign_tensors, load_module, module_name
from ..modelio.runfolder import RunFolder
from .records import LayerRecord


class LayerSource:
    """Where layer weights come from; the default: they are in the model."""

    def load(self, index: int, layer: nn.Module) -> None:
        """Give decoder layer `index` its dense weights (before it moves to the device)."""

    def release(self, index: int, layer: nn.Module) -> None:
        """The run no longer needs layer `index`'s weights (it was saved, or is in the model)."""


class LayerSink:
    """Where finished layers go; the default: they stay in the model."""

    def finished(self) -> list[LayerRecord]:
        """Records of layers 0..k-1, pruned by an interrupted run of the same settings."""
        return []

    def restore(self, index: int, layer: nn.Module) -> None:
        """Give finished layer `index` its pruned weights back."""
        raise RuntimeError("this sink holds no finished layers")

    def save(self, index: int, layer: nn.Module, record: LayerRecord) -> None:
        """Layer `index` is pruned and back on its home device."""

    def close(self) -> None:
        """Called once when the run ends, also when it fails: finish pending work."""


class InModel(LayerSource, LayerSink):
    """The weights are in the model before and after: nothing to read or write."""


IN_MODEL = InModel()


def _prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    return module_name(model, layers) + "."


class FromCheckpoint(LayerSource):
    """Layer weights read from a checkpoint when their turn comes, dropped when released (at
    most one layer's weights are resident)."""

    def __init__(self, reader: CheckpointReader, model: nn.Module, layers: nn.ModuleList):
        self.reader = reader
        self.model = model
        self.prefix = _prefix(model, layers)

    def load(self, index: int, layer: nn.Module) -> None:
        load_module(self.model, layer, f"{self.prefix}{index}.", self.reader)

    def release(self, index: int, layer: nn.Module) -> None:
        layer.to("meta")  # frees the weights; the shapes (pruned) stay
        trim_host_heap()


class ToRunFolder(LayerSink):
    """Every finished layer written to the resume folder; a resumed layer comes back from it.

    The write (serialise, fsync, rename, then the state) runs on a background thread while
    the next layer is pruned; at most one write is in flight, so at most one finished layer's
    tensors are held for it. `close` waits for it: a run stopped by Ctrl-C still records the
    layer it was writing.
    """

    def __init__(self, run: RunFolder, model: nn.Module, layers: nn.ModuleList,
                 identity: dict[str, Any], resume: bool | None = None, write: bool = True):
        self.run = run
        self.prefix = _prefix(model, layers)
        self.write = write  # False: read finished layers only (ranks other than 0)
        records = run.open(identity, resume) if write else run.read(identity)
        self._done = [LayerRecord(**r) for r in records]
        self._writing: threading.Thread | None = None
        self._error: BaseException | None = None

    def finished(self) -> list[LayerRecord]:
        return list(self._done)

    def restore(self, index: int, layer: nn.Module) -> None:
        p = f"{self.prefix}{index}."
        tensors = self.run.load_layer(index)
        assign_tensors(layer, {k[len(p):]: v for k, v in tensors.items()})

    def save(self, index: int, layer: nn.Module, record: LayerRecord) -> None:
        if not self.write:
            return
        self._wait()
        # CPU tensors that share the layer's storage: a later release of the layer (to meta)
        # leaves them alive until written
        p = f"{self.prefix}{index}."
        tensors = {p + k: v.detach().to("cpu").contiguous() for k, v in
                   layer.state_dict().items()}
        saved = record.to_json()

        def write() -> None:
            try:
                self.run.save_layer(index, tensors, saved)
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


