"""SPBO: stepwise N:M pruning with re-binarization of the surviving weights, on one column block.

The same function covers the three methods so every comparison shares the binarizer:
- binarize only (N = M): ARB on the dense block;
- naive (progressive=False): the M - N lowest-scored weights of every group of M are pruned at once, then
  ARB runs on the kept entries;
- SPBO (progressive=True): ARB on the dense block, then `steps` pruning steps; after each step the pruned
  weights are exactly 0 and ARB is warm-started from the previous scales on the kept entries only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pbs2p_edge.compress.binarize import Binarized, arb, error, reconstruct


@dataclass
class BlockFit:
    keep: torch.Tensor  # bool [rows, cols], exactly N of every aligned M columns per row
    alpha: torch.Tensor  # [rows]
    mu: torch.Tensor  # [rows]
    # Column-weighted error ||(W - Q) / d||^2 after the dense fit (SPBO only) and after each pruning step.
    step_errors: list[float] = field(default_factory=list)


def step_sizes(total: int, steps: int) -> list[int]:
    """Split `total` pruned weights per group into `steps` near-equal steps, larger steps first."""
    base, extra = divmod(total, steps)
    return [base + 1] * extra + [base] * (steps - extra)


def column_weight(d: torch.Tensor, metric: str) -> torch.Tensor:
    """OBS weight 1 / [U]_jj^2 of each column (or 1 for magnitude pruning)."""
    return 1.0 / d.square() if metric == "obs" else torch.ones_like(d)


def fit_block(
    w: torch.Tensor,
    d: torch.Tensor,
    n: int,
    m: int,
    *,
    steps: int = 1,
    iters: int = 15,
    progressive: bool = True,
    rescore: bool = True,
    metric: str = "obs",
) -> BlockFit:
    """Choose the N:M mask and the ARB scales of block `w` [rows, cols]; `d` = diag of U for its columns."""
    rows, cols = w.shape
    if cols % m:
        raise ValueError(f"block width {cols} is not a multiple of M={m}")
    colw = column_weight(d, metric)
    pruned = m - n
    keep = torch.ones(rows, cols // m, m, dtype=torch.bool)
    if pruned == 0:
        b = arb(w, None, iters)
        return BlockFit(keep.view(rows, cols), b.alpha, b.mu, [_err(w, b, keep, colw)])
    order = (w.square() * colw[None, :]).view(rows, cols // m, m).argsort(dim=-1, stable=True)
    if not progressive:
        keep.scatter_(-1, order[..., :pruned], False)
        b = arb(w, keep.view(rows, cols), iters)
        return BlockFit(keep.view(rows, cols), b.alpha, b.mu, [_err(w, b, keep, colw)])

    b = arb(w, None, iters)
    errors = [_err(w, b, keep, colw)]
    done = 0
    for count in step_sizes(pruned, steps):
        if rescore:
            pick = _cheapest_to_prune(w, b, keep, colw, count)
        else:
            pick = order[..., done : done + count]
        keep.scatter_(-1, pick, False)
        done += count
        b = arb(w, keep.view(rows, cols), iters, start=(b.alpha, b.mu))
        errors.append(_err(w, b, keep, colw))
    return BlockFit(keep.view(rows, cols), b.alpha, b.mu, errors)


def _err(w: torch.Tensor, b: Binarized, keep: torch.Tensor, colw: torch.Tensor) -> float:
    return error(w, reconstruct(b, keep.view(w.shape).to(w.dtype)), colw)


def _cheapest_to_prune(
    w: torch.Tensor, b: Binarized, keep: torch.Tensor, colw: torch.Tensor, count: int
) -> torch.Tensor:
    """Per group of M, the `count` kept weights whose zeroing adds the least (weighted) error over their
    current binarized value: w^2 - (w - q)^2, scaled by the column's OBS weight."""
    rows, groups, m = keep.shape
    q = reconstruct(b, torch.ones_like(w))
    extra = (w.square() - (w - q).square()) * colw[None, :]
    extra = extra.view(rows, groups, m).masked_fill(~keep, float("inf"))
    return extra.argsort(dim=-1, stable=True)[..., :count]
