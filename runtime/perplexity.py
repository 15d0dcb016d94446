"""Perplexity of an exported bundle, torch-free: the deployed graph (int7 activations, 4-bit head) scored.

The windows are the PyTorch scorer's (`pbs2p_edge.evaluate`): the first `n_tokens` ids of the text (by the
bundle's tokenizer.json, no special tokens) cut into non-overlapping windows of `ctx`, no BOS. Each window
is one prefill from an empty KV cache; every token but the first is predicted. Log-softmax is taken in
float64 a block of rows at a time, so the [ctx, vocab] logits are never widened all at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.evaluate import perplexity_summary, window_count
from pbs2p_edge.runtime.bundle import load_bundle
from pbs2p_edge.runtime.session import DecoderSession
from pbs2p_edge.runtime.text import load_tokenizer

LOG_SOFTMAX_ROWS = 64  # rows of logits widened to float64 at a time (64 x 49k vocab = 25 MB)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum over rows of -log softmax(logits[r])[targets[r]], in float64 (nats). logits [R, V], targets [R]."""
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits for {targets.shape[0]} targets")
    total = 0.0
    for start in range(0, logits.shape[0], LOG_SOFTMAX_ROWS):
        block = logits[start : start + LOG_SOFTMAX_ROWS].astype(np.float64)
        peak = block.max(axis=1)
        log_sum = peak + np.log(np.exp(block - peak[:, None]).sum(axis=1))
        chosen = block[np.arange(block.shape[0]), targets[start : start + LOG_SOFTMAX_ROWS]]
        total += float((log_sum - chosen).sum())
    return total


class BundleScorer:
    """A bundle loaded for scoring: `BundleScorer("out/pbs2p").perplexity(ids, ctx=512)`."""

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        threads: int | None = None,
        *,
        ops_library: str | os.PathLike | None = None,
        verify_hash: bool = True,
    ) -> None:
        self.bundle = load_bundle(bundle_dir, ops_library=ops_library, verify_hash=verify_hash)
        self.tokenizer = load_tokenizer(self.bundle.tokenizer_path)
        self.session = DecoderSession(self.bundle, threads=threads)

    @property
    def kind(self) -> str:
        """The manifest's weights kind: "pbs2p", "int4" or "fp32"."""
        return self.bundle.weights

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens (as `pbs2p_edge.sources.encode` does for PyTorch)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def window_nll(self, window: np.ndarray) -> float:
        """Summed NLL (nats) of tokens 1..ctx-1 of one window, prefilled alone from an empty cache."""
        self.session.reset()
        logits = self.session.forward(window, all_logits=True)
        self.session.reset()  # drop this window's cache now rather than at the next window
        return token_nll(logits[:-1], window[1:])

    def perplexity(self, ids: Sequence[int], ctx: int = 512, progress: bool = True) -> dict[str, Any]:
        """The PyTorch scorer's result fields (`pbs2p_edge.evaluate.perplexity`) for this bundle."""
        from tqdm.auto import tqdm

        n_windows = window_count(len(ids), ctx)
        if ctx > self.bundle.context_length:
            raise Pbs2pError(
                f"--ctx {ctx} exceeds the context of bundle {self.bundle.path} "
                f"({self.bundle.context_length} tokens)"
            )
        windows = np.asarray(ids[: n_windows * ctx], dtype=np.int64).reshape(n_windows, ctx)
        if windows.min() < 0 or windows.max() >= self.bundle.vocab_size:
            raise Pbs2pError(
                f"the tokenizer of bundle {self.bundle.path} gives ids outside its vocabulary of "
                f"{self.bundle.vocab_size}"
            )
        nll = 0.0
        start = time.perf_counter()
        for window in tqdm(windows, desc="perplexity", unit="win", disable=not progress):
            nll += self.window_nll(window)
        return perplexity_summary(nll, n_windows, ctx, time.perf_counter() - start)
