"""The versions of the packages a result depends on, recorded in every report and run state."""

from __future__ import annotations

import importlib.metadata as md
import platform

PACKAGES = ("spap", "torch", "transformers", "safetensors", "accelerate", "datasets")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
