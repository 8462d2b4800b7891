"""Read a model from its checkpoint without holding it whole: built empty, filled by name.

`empty_model` builds the architecture from its config with every parameter on the meta device
(accelerate's `init_empty_weights`; buffers such as rotary tables stay real, they are computed
from the config, not loaded). `CheckpointReader` reads tensors by name from the checkpoint's
safetensors files, a single `model.safetensors` or the shards a `model.safetensors.index.json`
names, through safetensors' `safe_open`, which maps the file and copies out only the tensors
asked for. `load_outside_layers` fills the embeddings, final norm and head; `load_module`
fills one decoder layer when the driver's turn comes to it (`driver.stores.FromCheckpoint`).
`loading.open_lazy` does all of it for a model spec.

Tensor names are the model's `state_dict` names. Where transformers renames a family's
checkpoint names on loading (its conversion mapping: GPT-NeoX's `embed_out` is the model's
`lm_head`, Gemma 3's `language_model.model` its `model.language_model`), `adopt_names` reads
each checkpoint name under the name transformers gives it, so a checkpoint in either form is
read; a family whose checkpoint tensors transformers converts (splits, merges) rather than
renames is refused with --low-memory. `saved_names` drops tied duplicates (the LM head of a
model with tied embeddings) exactly as `save_pretrained` does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import SpapError

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """Tensors of a safetensors checkpoint folder, read by name on demand."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        single = self.folder / SINGLE_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        elif single.exists():
            with safe_open(single, framework="pt") as f:
                self.files = {name: single for name in f.keys()}  # noqa: SIM118
        else:
            raise SpapError(
                f"'{self.folder}' has neither {SINGLE_FILE} nor {INDEX_FILE}; --low-memory "
                "reads safetensors checkpoints (re-save the model with save_pretrained, or "
                "drop --low-memory)"
            )

        self.aliases: dict[str, str] = {}  # model name -> checkpoint name (adopt_names)
        self.converted: list[str] = []  # checkpoint names transformers converts, not renames

    def adopt_names(self, model: nn.Module) -> None:
        """Read each checkpoint name also under the name transformers' conversion mapping
        gives it on loading (`from_pretrained`'s renamings, as it applies them)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        if not renamings and not converters:
            return
        for name in self.files:
            new, converter = rename_source_key(name, renamings, converters)
            if converter is not None:
                self.converted.append(name)
            elif new != name:
                self.aliases.setdefault(new, name)

    def resolve(self, name: str, base_prefix: str | None) -> str | None:
        """The checkpoint's name for model tensor `name`: itself, the checkpoint name that
        transformers renames to it (`adopt_names`), or either without the base model prefix
        (checkpoints saved from the bare base model, e.g. facebook/opt-*)."""
        candidates = [name]
        if base_prefix and name.startswith(base_prefix + "."):
            candidates.append(name[len(base_prefix) + 1:])
        for c in candidates:
            if c in self.files:
                return c
            if c in self.aliases:
                return self.aliases[c]
        return None

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """{name: tensor on the CPU} for checkpoint names `names`, one file opened at a time."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for path, group in by_file.items():
            with safe_open(path, framework="pt") as f:
                for n in group:
                    out[n] = f.get_tensor(n)
        return out


def empty_model(config, dtype: torch.dtype):
    """The causal-LM architecture of `config` with its parameters on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():  # buffers (rotary tables) are built for real, from the config
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def assign_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Set `module`'s parameters and buffers named (relative to it) in `tensors`, of any shape,
    replacing meta or dense ones; a Linear whose weight changes shape gets its new sizes."""
    for name, t in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(t, requires_grad=False)
        elif attr in owner._buffers:
            owner._buffers[attr] = t
        else:
            raise KeyError(f"{type(owner).__name__} has no parameter or buffer '{attr}' ({name})")
        if isinstance(owner, nn.Linear) and attr == "weight":
            owner.out_features, owner.in_features = t.shape


def load_module(model: nn.Module, module: nn.Module, prefix: str, reader: CheckpointReader,
               ) -> None:
    """Fill `module` (whose state_dict names start with `prefix` in the model) from `reader`,
    converting to each tensor's dtype in the model, as from_pretrained does."""
    base = getattr(model, "base_model_prefix", None)
    targets = module.state_dict()
    names = {rel: reader.resolve(prefix + rel, base) for rel in targets}
    missing = [prefix + rel for rel, src in names.items() if src is None]
    if missing:
        raise _missing(missing, reader)
    loaded = reader.load(list(names.values()))
    assign_tensors(module, {rel: loaded[src].to(targets[rel].dtype) for rel, src in names.items()})


def _missing(missing: list[str], reader: CheckpointReader) -> SpapError:
    if reader.converted:
        return SpapError(
            f"the checkpoint in '{reader.folder}' stores {len(reader.converted)} tensor(s) in a "
            f"form transformers converts on loading (e.g. '{reader.converted[0]}'), which "
            "--low-memory does not read; drop --low-memory, or re-save the model with "
            "save_pretrained first")
    return SpapError(
        f"the checkpoint in '{reader.folder}' lacks {len(missing)} tensor(s) the model needs, "
        f"e.g. '{missing[0]}'; is it a complete save_pretrained folder?"
    )


def _tied_targets(model) -> dict[str, str]:
    """{tied name: source name} of the weights this model ties (none if untied)."""
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


def module_name(root: nn.Module, target: nn.Module) -> str:
    """The qualified name of submodule `target` in `root` (e.g. "model.layers")."""
    for name, m in root.named_modules():
        if m is target:
            return name
    raise ValueError(f"{type(target).__name__} is not inside {type(root).__name__}")


@torch.no_grad()
def load_outside_layers(model: nn.Module, layers: nn.ModuleList, reader: CheckpointReader,
                        ) -> None:
    """Load every tensor that is not inside a decoder layer, then tie weights as
    from_pretrained does (a tied head is then the embedding itself, not read)."""
    inside = module_name(model, layers) + "."
    tied = _tied_targets(model)
    base = getattr(model, "base_model_prefix", None)
    wanted = {n: t for n, t in model.state_dict().items() if not n.startswith(inside)}
    names, missing = {}, []
    for n in wanted:
        found = reader.resolve(n, base)
        if found is not None:
            names[n] = found
        elif n not in tied:
            missing.append(n)
    if missing:
        raise _missing(missing, reader)
    loaded = reader.load(list(names.values()))
    assign_tensors(model, {n: loaded[src].to(wanted[n].dtype) for n, src in names.items()})
    if tied:
        model.tie_weights()


def saved_names(model: nn.Module) -> list[str]:
    """The tensor names `save_pretrained` writes for `model`: its state_dict without the tied
    duplicates."""
    tied = _tied_targets(model)
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    drop = set()
    for group in by_id.values():
        if len(group) > 1:
            drop.update(n for n in group if n in tied)
    return [n for n in model.state_dict() if n not in drop]


def names_on_disk(model: nn.Module, names: list[str]) -> dict[str, str]:
    """{model name: the name save_pretrained writes it under} for `names`: transformers'
    conversion mapping reverted (`revert_weight_conversion`, on empty stand-ins), which
    for most families is the name itself."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import revert_weight_conversion

    if not get_model_conversion_mapping(model, add_legacy=False):
        return {n: n for n in names}  # (most families: nothing renamed)
    out = {}
    for n in names:
        renamed = revert_weight_conversion(model, {n: torch.empty(0)})
        if len(renamed) != 1:  # (a converted tensor: the writer keeps the model's name)
            out[n] = n
        else:
            out[n] = next(iter(renamed))
    return out
