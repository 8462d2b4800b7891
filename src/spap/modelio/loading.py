"""Turn what the user typed (alias, local folder, .gguf file, Hub id) into a model and tokenizer.

GGUF models are dequantized by transformers on load (15 to 45 s); an alias is converted once
into a plain safetensors folder under the cache so later runs load in about 2 s. The
architecture is checked from the config before any weights are read, so an unsupported model
fails in a second with the list of supported families.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..assets import MODEL_ALIASES, GgufAlias, cache_dir, locate
from ..errors import SpapError
from ..models import get_adapter

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: `path` (folder or Hub id) plus a GGUF file name if any."""

    spec: str  # what the user typed
    path: str
    gguf_file: str | None = None
    kind: str = "folder"  # alias | folder | gguf | hub


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype the checkpoint records in its config (`dtype`, which transformers also reads
    from an older config's `torch_dtype`; else a multimodal config's text part), or None
    where it records no float32, bfloat16 or float16 (GGUF files record none)."""
    for c in (config, getattr(config, "text_config", None)):
        d = getattr(c, "dtype", None)
        if isinstance(d, str):
            d = _DTYPES.get(d)
        if isinstance(d, torch.dtype) and d in _DTYPES.values():
            return d
    return None


def resolve_dtype(dtype: str | torch.dtype, *, config=None) -> torch.dtype:
    """`dtype` as a torch dtype; "auto" is the checkpoint's own dtype (`checkpoint_dtype`),
    or float32 where it records none (GGUF files, whose weights are dequantized on load)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return (checkpoint_dtype(config) if config is not None else None) or torch.float32
    if dtype not in _DTYPES:
        raise SpapError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpapError(f"device '{device}' requested but CUDA is not available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise SpapError(f"unknown device '{device}'; use auto, cpu or cuda[:N]")
    return device


def _materialize_alias(alias: GgufAlias) -> Path:
    """The alias's converted safetensors folder, built on first use (atomically)."""
    target = cache_dir() / "models" / alias.name
    if (target / "config.json").exists():
        return target
    files = [locate(dist, path, alias.install) for dist, path in alias.parts]
    work = target.parent / f".{alias.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        if len(files) == 1:
            gguf_dir, gguf_name = files[0].parent, files[0].name
        else:
            gguf_dir, gguf_name = work, alias.gguf_name
            with open(work / gguf_name, "wb") as out:
                for f in files:
                    with open(f, "rb") as part:
                        shutil.copyfileobj(part, out, 1 << 24)
        log.info("converting %s from GGUF once into %s", alias.name, target)
        model, tok = _load_gguf(gguf_dir, gguf_name, torch.float32)
        saved = work / "model"
        model.save_pretrained(saved)
        tok.save_pretrained(saved)
        # (another process may have finished the same conversion meanwhile and be reading
        # its folder: that one is kept, never replaced under it)
        if not (target / "config.json").exists():
            if target.exists():  # (no config: an empty or broken folder, not a finished one)
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.replace(saved, target)
            except OSError:
                if not (target / "config.json").exists():
                    raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _load_gguf(folder: Path, name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except ImportError as e:
        raise SpapError(
            f"loading GGUF files needs the 'gguf' package: pip install gguf ({e})"
        ) from None
    # A dequantized GGUF model is a plain float model; drop the quantizer so it saves normally.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tok


def resolve_model(spec: str) -> ModelSource:
    """Classify `spec`; raises SpapError for anything that is none of the accepted forms."""
    if spec in MODEL_ALIASES:
        return ModelSource(spec, str(_materialize_alias(MODEL_ALIASES[spec])), None, "alias")
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(spec, str(p.parent), p.name, "gguf")
    if p.is_dir():
        if not (p / "config.json").exists():
            raise SpapError(f"folder '{spec}' has no config.json; pass a save_pretrained folder")
        return ModelSource(spec, str(p), None, "folder")
    if p.exists() or spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        aliases = ", ".join(MODEL_ALIASES)
        raise SpapError(
            f"unknown model or path '{spec}'; pass a Hub id (org/name), a local folder, "
            f"a .gguf file, or an offline alias ({aliases})"
        )
    return ModelSource(spec, spec, None, "hub")


def load_config(src: ModelSource):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)
    except OSError as e:
        if src.kind == "hub":
            raise SpapError(
                f"could not load '{src.spec}' from the Hugging Face Hub ({_first_line(e)}); "
                "check the id and your connection, or pass a local folder, a .gguf file or "
                f"an offline alias ({', '.join(MODEL_ALIASES)})"
            ) from None
        raise SpapError(f"could not read the config of '{src.spec}': {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def local_folder(src: ModelSource) -> Path:
    """A local folder with the checkpoint's safetensors files (a Hub id is downloaded to the
    HF cache); for reading a checkpoint tensor by tensor."""
    if src.kind == "gguf":
        raise SpapError("--low-memory reads safetensors checkpoints, not GGUF files; prune it "
                        "without --low-memory, or convert it with save_pretrained first")
    if src.kind != "hub":
        return Path(src.path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            src.path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # network, missing repo, auth: all a user can fix
        raise SpapError(f"could not download '{src.spec}' from the Hugging Face Hub ({e}); "
                        "pass a local folder") from None


def load_model(spec: str, dtype: str | torch.dtype = "auto", device: str = "cpu"):
    """Load (model on CPU in `dtype`, tokenizer, ModelSource). Checks the family first.

    `dtype` "auto" keeps the checkpoint's own dtype (a bfloat16 checkpoint stays bfloat16, so
    its pruned copy is saved at its own size); GGUF files load dequantized in float32, and
    the offline aliases (converted from GGUF once) are float32 folders.
    The model is returned on the CPU; `device` is where the caller will compute."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model(spec)
    config = load_config(src)
    get_adapter(config)  # fail fast on an unsupported architecture
    # (GGUF weights are quantized or stored in their own formats: dequantized to float32)
    torch_dtype = resolve_dtype(dtype, config=None if src.gguf_file else config)
    if src.gguf_file:
        model, tok = _load_gguf(Path(src.path), src.gguf_file, torch_dtype)
    else:
        tok = AutoTokenizer.from_pretrained(src.path)
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch_dtype)
    model.eval()
    return model, tok, src


@dataclass
class LazyModel:
    """A model of `open_lazy`: its weights outside the decoder layers loaded, the layers on
    the meta device, to be filled from `reader` one at a time."""

    model: Any
    tokenizer: Any
    reader: Any  # a reader.CheckpointReader
    generation_config: Any
    spec: str
    identity: dict[str, Any]


def open_lazy(spec: str, dtype: str | torch.dtype, device: str) -> LazyModel:
    """Model spec `spec` (a folder or Hub id of safetensors files) built on the meta device,
    with everything but its decoder layers loaded, and its identity for a resume."""
    from transformers import AutoTokenizer, GenerationConfig

    from .identity import fingerprint_names, model_identity
    from .reader import CheckpointReader, empty_model, load_outside_layers

    src = resolve_model(spec)
    folder = local_folder(src)
    config = load_config(src)
    adapter = get_adapter(config)  # fail fast on an unsupported architecture
    reader = CheckpointReader(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    model = empty_model(config, resolve_dtype(dtype, config=config))
    reader.adopt_names(model)  # (the names transformers renames on loading)
    layers = adapter.layers(model)
    load_outside_layers(model, layers, reader)
    gen = (GenerationConfig.from_pretrained(folder)
           if (folder / "generation_config.json").exists() else model.generation_config)
    base = getattr(model, "base_model_prefix", None)
    found = {n: reader.resolve(n, base) for n in fingerprint_names(model, adapter)}
    loaded = reader.load([c for c in found.values() if c is not None])
    ends = {n: loaded[c] for n, c in found.items() if c is not None}
    return LazyModel(model, tok, reader, gen, src.spec, model_identity(src.spec, config, ends))
