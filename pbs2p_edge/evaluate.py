"""Perplexity on fixed, non-overlapping windows (the same windows for every model in a comparison).

The token stream is cut into `n_tokens // ctx` windows of exactly `ctx` tokens; no BOS is inserted, each window
is scored on its own (no carried-over context), and every token but the first of each window is predicted.
Leftover tokens past the last full window are not scored.

`window_count` and `perplexity_summary` are torch-free: the PyTorch scorer below and the bundle scorer
(`pbs2p_edge.runtime.perplexity`) share them, so both cut the same windows and report the same fields.
"""

from __future__ import annotations

import math
import time
from typing import Any

from pbs2p_edge.errors import Pbs2pError


def window_count(n_tokens: int, ctx: int) -> int:
    """Full windows of `ctx` tokens in `n_tokens`; refuses ctx <= 1 and text shorter than one window."""
    if ctx <= 1:
        raise Pbs2pError(f"context length must be > 1 (got {ctx})")
    n_windows = n_tokens // ctx
    if n_windows == 0:
        raise Pbs2pError(f"evaluation text has {n_tokens} tokens, fewer than one window of {ctx}")
    return n_windows


def perplexity_summary(nll_sum: float, n_windows: int, ctx: int, seconds: float) -> dict[str, Any]:
    """The result fields from the summed negative log-likelihood of every predicted token (nats)."""
    predicted = n_windows * (ctx - 1)
    return {
        "ppl": math.exp(nll_sum / predicted),
        "nll": nll_sum / predicted,
        "ctx": ctx,
        "windows": n_windows,
        "tokens": n_windows * ctx,
        "predicted_tokens": predicted,
        "seconds": seconds,
    }


def perplexity(
    model: Any, ids: Any, ctx: int = 512, progress: bool = True, batch_size: int = 1
) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    n_windows = window_count(int(ids.numel()), ctx)
    windows = ids[: n_windows * ctx].view(n_windows, ctx)
    nll = 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in tqdm(range(0, n_windows, batch_size), desc="perplexity", unit="win", disable=not progress):
            batch = windows[i : i + batch_size]
            logits = model(input_ids=batch).logits.float()
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            nll += float(loss)
    return perplexity_summary(nll, n_windows, ctx, time.perf_counter() - start)
