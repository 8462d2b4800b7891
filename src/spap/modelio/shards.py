"""The output of a low-memory run: a standard sharded checkpoint assembled from the run folder.

Every finished layer is already a safetensors file in the run folder (spap.checkpoint); here
they become the shards of the output as `save_pretrained` would name them:
`model-00001-of-000NN.safetensors` holds the tensors outside the decoder layers (embeddings,
final norm, an untied head; a tied head is not written, as save_pretrained leaves it out) and
shard i + 2 holds layer i. `model.safetensors.index.json` maps every name to its shard, with
the same metadata save_pretrained writes (total_parameters, total_size), and config.json
(carrying the new MLP width), generation_config.json, the tokenizer, spap.json and the model
card complete the folder, so stock `AutoModelForCausalLM.from_pretrained(out)` loads it.

Shards are hard links to the layer files (copies where the file system has none), so until
the final rename the run folder still resumes; a layer that needs zero biases added (a method
that gave the down projection a bias, in a family whose config flag then adds biases to every
MLP linear) is written anew with them.

The whole model is never in memory, so the reload check of `export.save_pruned` (logits of
the reloaded model against the pruned one) is replaced by a structural one (`check_structure`):
the saved config is built on the meta device and its tensor names, shapes and dtypes must be
exactly those the shards hold.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .card import write_card
from .export import check_output_dir, write_report
from .reader import INDEX_FILE, empty_model, module_name, names_on_disk, saved_names
from .runfolder import STATE_FILE, RunFolder

METADATA = {"format": "pt"}
_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
          "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def shard_name(k: int, total: int) -> str:
    return f"model-{k:05d}-of-{total:05d}.safetensors"


def _header(path: Path) -> dict[str, tuple[list[int], str]]:
    """{name: (shape, safetensors dtype)} of a file, without reading its tensors."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {n: (f.get_slice(n).get_shape(), f.get_slice(n).get_dtype()) for n in f.keys()}  # noqa: SIM118


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _layer_shard(model: nn.Module, run: RunFolder, index: int, prefix: str,
                 expected: list[str], target: Path, disk: dict[str, str]) -> None:
    """Layer `index`'s file as shard `target`, with zero biases added where the model has a
    bias the file lacks (surgery.add_missing_biases added them to the meta model), and its
    tensors under the names save_pretrained writes (`disk`: model name -> that name)."""
    from safetensors.torch import load_file, save_file

    src = run.layer_file(index)
    have = set(_header(src))
    missing = [n for n in expected if n not in have]
    extra = sorted(have - set(expected))
    if extra or any(not n.endswith(".bias") for n in missing):
        raise RuntimeError(f"layer {index} file does not match the model (missing {missing}, "
                           f"extra {extra}); this is a bug in spap, please report it")
    renamed = any(disk[n] != n for n in expected)
    if not missing and not renamed:
        _link_or_copy(src, target)
        return
    tensors = load_file(str(src))
    for n in missing:
        p = model.get_parameter(n)
        tensors[n] = torch.zeros(p.shape, dtype=p.dtype)
    tensors = {disk[n]: t for n, t in tensors.items()}
    tmp = target.with_name(f".{target.name}.tmp")
    save_file(tensors, str(tmp), metadata=METADATA)
    os.replace(tmp, target)


#: the safetensors header's name of each torch dtype a checkpoint holds
_SAFETENSORS_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                      torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                      torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def check_structure(folder: Path, dtype: torch.dtype) -> dict[str, Any]:
    """The saved config, built on the meta device in `dtype`, expects exactly the tensors the
    shards hold: the same names, and for each the same shape and dtype; the index names the
    shard that holds each. Raises RuntimeError, naming the first mismatches, otherwise."""
    from transformers import AutoConfig

    ref = empty_model(AutoConfig.from_pretrained(folder), dtype)
    if getattr(ref, "all_tied_weights_keys", None):
        ref.tie_weights()
    sd = ref.state_dict()
    names = saved_names(ref)
    disk = names_on_disk(ref, names)
    want = {disk[n]: (list(sd[n].shape), _SAFETENSORS_DTYPE.get(sd[n].dtype, str(sd[n].dtype)))
            for n in names}
    index = json.loads((folder / INDEX_FILE).read_text())
    got: dict[str, tuple[list[int], str]] = {}
    for shard in sorted(set(index["weight_map"].values())):
        for n, (shape, dt) in _header(folder / shard).items():
            if index["weight_map"].get(n) != shard:
                raise RuntimeError(f"{n} is in {shard} but the index says otherwise")
            got[n] = (list(shape), dt)
    problems = [f"{n} missing" for n in sorted(want.keys() - got.keys())]
    problems += [f"{n} not in the config's model" for n in sorted(got.keys() - want.keys())]
    for n in sorted(want.keys() & got.keys()):
        (ws, wd), (gs, gd) = want[n], got[n]
        if ws != gs:
            problems.append(f"{n} shape {gs}, config {ws}")
        if wd != gd:
            problems.append(f"{n} dtype {gd}, config {wd}")
    if problems:
        raise RuntimeError(f"saved tensors do not match the saved config: "
                           f"{'; '.join(problems[:3])} ({len(problems)} in all); this is a bug "
                           "in spap, please report it")
    return {"kind": "structure: names, shapes and dtypes of the shards against the saved "
                    "config built on the meta device (the model was never whole in memory)",
            "dtype": str(dtype).replace("torch.", ""),
            "tensors": len(got), "shards": len(set(index["weight_map"].values())), "ok": True}


def write_sharded(model: nn.Module, layers: nn.ModuleList, run: RunFolder, tokenizer,
                  generation_config, report: dict[str, Any], out: str | os.PathLike, *,
                  overwrite: bool = False) -> Path:
    """Assemble the run folder into the output folder `out` (see the module docstring)."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    out = check_output_dir(out, overwrite)
    names = saved_names(model)
    disk = names_on_disk(model, names)  # (as save_pretrained names them)
    prefix = module_name(model, layers) + "."
    n_shards = len(layers) + 1
    folder = run.path
    weight_map: dict[str, str] = {}
    sd = model.state_dict()
    outside = sorted(n for n in names if not n.startswith(prefix))
    if any(sd[n].is_meta for n in outside):
        raise RuntimeError("tensors outside the decoder layers were never loaded; a bug in spap")
    first = shard_name(1, n_shards)
    tmp = folder / f".{first}.tmp"
    save_file({disk[n]: sd[n].detach().cpu().contiguous() for n in outside}, str(tmp),
              metadata=METADATA)
    os.replace(tmp, folder / first)
    weight_map.update(dict.fromkeys((disk[n] for n in outside), first))
    for i in range(len(layers)):
        lp = f"{prefix}{i}."
        expected = [n for n in names if n.startswith(lp)]
        target = shard_name(i + 2, n_shards)
        _layer_shard(model, run, i, lp, expected, folder / target, disk)
        weight_map.update(dict.fromkeys((disk[n] for n in expected), target))
    total_size = 0
    for shard in set(weight_map.values()):
        for shape, dt in _header(folder / shard).values():
            total_size += _BYTES[dt] * (int(torch.Size(shape).numel()))
    index = {"metadata": {"total_parameters": sum(p.numel() for p in model.parameters()),
                          "total_size": total_size},
             "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # config and generation config as save_pretrained writes them
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    report["reload_check"] = check_structure(folder, model.dtype)
    write_card(folder, report, model.config)
    write_report(report, folder, t0)
    # the run is complete: what only resuming needed goes, and the folder becomes the output
    shutil.rmtree(run.layers_dir)
    (folder / STATE_FILE).unlink()
    if out.exists():
        shutil.rmtree(out)
    os.replace(folder, out)
    return out
