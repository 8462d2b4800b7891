"""One untimed run of a model as `spap bench` makes it: a prefill, a fixed-length greedy
generate, and the facts about the model they need. Shared by the timed runs and the
memory subprocess.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ...errors import SpapError
from ...models import get_adapter


def supports_logits_to_keep(model: torch.nn.Module) -> bool:
    # The same test generate() uses to decide whether to pass it.
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _pad_token_id(model: Any) -> int:
    """A pad id for generate (which otherwise warns and guesses); greedy decoding of a fixed
    length never uses it."""
    gen = getattr(model, "generation_config", None)
    for key in ("pad_token_id", "eos_token_id"):
        value = getattr(gen, key, None) if gen is not None else None
        if value is None:
            value = getattr(model.config, key, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def prefill(model: Any, ids: torch.Tensor, keep: bool) -> None:
    extra = {"logits_to_keep": 1} if keep else {}
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False, **extra)


def generate(model: Any, ids: torch.Tensor, new_tokens: int) -> None:
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=_pad_token_id(model),
        )
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise SpapError(
            f"generate returned {out.shape[1] - ids.shape[1]} new tokens instead of "
            f"{new_tokens}; check the model's generation_config (max_length, stop strings)"
        )


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def vocab_size(model: Any) -> int:
    """The language model's vocabulary (a multimodal wrapper keeps it in its text config)."""
    return get_adapter(model.config).text_config(model.config).vocab_size
