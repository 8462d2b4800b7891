"""Perplexity on held-out text.

Protocol (recorded in every result): the evaluation text is tokenized as one stream without
special tokens, cut into non-overlapping windows of `seqlen` tokens from its start (the tail
shorter than a window is dropped), optionally only the first `windows` of them; where the
model's tokenizer adds a BOS token (or `bos="always"`), each window is the BOS and
`seqlen - 1` text tokens (data.py). Each window is scored independently (no context carried
over) and perplexity is exp of the mean token negative log-likelihood over all predicted
tokens (seqlen - 1 per window: every token after the window's first position, so with a BOS
every text token, the first one predicted from the BOS alone, and never the BOS). This is the
GPTQ / SparseGPT / Wanda WikiText-2 protocol, applied by default to the held-out part of the
offline Wikipedia text.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..data import bos_description, bos_token, eval_windows, load_text, token_hash, tokenize
from ..distributed import Shard


@torch.no_grad()
def perplexity_of_windows(
    model, windows: torch.Tensor, *, batch_size: int = 4, device=None, progress: bool = False
) -> float:
    nll, count = nll_of_windows(model, windows, batch_size=batch_size, device=device,
                                progress=progress)
    return math.exp(nll / count)


@torch.no_grad()
def nll_of_windows(model, windows: torch.Tensor, *, batch_size: int = 4, device=None,
                   progress: bool = False) -> tuple[float, int]:
    """(summed next-token negative log-likelihood, number of predicted tokens) over `windows`
    (n, L): each window scored on its own, its first token only as context."""
    device = device or next(model.parameters()).device
    nll, count = 0.0, 0
    batches = windows.split(batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch")
    for batch in batches:
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()  # (b, L-1, V)
        target = batch[:, 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                     reduction="sum"))
        count += target.numel()
    return nll, count


def perplexity(
    model,
    tokenizer,
    *,
    data: str = "wiki-offline",
    seqlen: int = 2048,
    windows: int | None = None,
    batch_size: int = 4,
    device=None,
    progress: bool = False,
    stream: torch.Tensor | None = None,
    shard: Shard | None = None,
    bos: str = "auto",
) -> dict:
    """Perplexity of `model` on the held-out text of `data`; returns the value and protocol.

    `stream` (pre-tokenized evaluation ids) skips tokenization when evaluating several models.
    `shard`: in a data-parallel run every rank scores its own whole batches of the windows and
    the sums are added over the ranks, so each rank returns the perplexity of all of them.
    `bos`: "auto", "always" or "never", a BOS token in front of every window (data.py).
    """
    text = None
    bos_id = bos_token(tokenizer, bos)
    if stream is None:
        text = load_text(data, "test")
        stream = tokenize(tokenizer, text)
    w = eval_windows(stream, seqlen, windows, bos_id)
    t0 = time.perf_counter()
    if shard is None or not shard.distributed:
        ppl = perplexity_of_windows(model, w, batch_size=batch_size, device=device,
                                    progress=progress)
    else:
        mine = w[shard.share(w.shape[0], batch_size)]
        nll, count = nll_of_windows(model, mine, batch_size=batch_size, device=device,
                                    progress=progress and shard.is_main)
        on = device or next(model.parameters()).device
        ppl = math.exp(shard.sum_float(nll, on) / shard.sum_float(float(count), on))
    return {
        "ppl": ppl,
        "protocol": {
            "data": data,
            "split": text.split if text else "test",
            "seqlen": seqlen,
            "windows": int(w.shape[0]),
            "tokens_scored": int(w.shape[0] * (seqlen - 1)),
            "overlap": "none (independent windows)",
            "bos": bos_description(bos, bos_id),
            "token_hash": token_hash(w),
        },
        "seconds": time.perf_counter() - t0,
    }
