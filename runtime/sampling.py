"""Next-token choice from one row of logits: greedy, or sampling with temperature / top-k / top-p / penalty.

The order follows Hugging Face `generate`: repetition penalty on the raw logits, then temperature, top-k, top-p.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pbs2p_edge.errors import Pbs2pError


@dataclass(frozen=True)
class SamplingConfig:
    """`temperature=0` means greedy (argmax); top_k=0 and top_p=1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise Pbs2pError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise Pbs2pError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise Pbs2pError(f"top-p must be in (0, 1], got {self.top_p}")
        if not np.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise Pbs2pError(f"repetition penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, seen: Iterable[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty: divide positive logits of seen tokens by `penalty`, multiply negative ones."""
    if penalty == 1.0:
        return logits
    ids = np.unique(np.fromiter(seen, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.shape[-1])]
    out = logits.copy()
    values = out[ids]
    out[ids] = np.where(values > 0, values / penalty, values * penalty)
    return out


def filtered_probabilities(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """Probabilities after temperature, top-k and top-p (float64, sums to 1)."""
    scaled = logits.astype(np.float64) / config.temperature
    if 0 < config.top_k < scaled.size:
        kth_largest = np.partition(scaled, -config.top_k)[-config.top_k]
        scaled = np.where(scaled < kth_largest, -np.inf, scaled)
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    if config.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
        keep = int(np.searchsorted(cumulative, config.top_p, side="left")) + 1
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[:keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs


class Sampler:
    """Stateful chooser: owns the random generator, so one seed gives one token sequence."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self._rng = np.random.default_rng(config.seed)

    def choose(self, logits: np.ndarray, seen: Iterable[int] = ()) -> int:
        logits = apply_repetition_penalty(logits, seen, self.config.repetition_penalty)
        if self.config.greedy:
            return int(np.argmax(logits))
        probs = filtered_probabilities(logits, self.config)
        cumulative = np.cumsum(probs)
        draw = self._rng.random() * cumulative[-1]
        return int(min(np.searchsorted(cumulative, draw, side="right"), probs.size - 1))
