"""ARB binarizer: W ~ alpha * B + mu per row of a column group, B in {-1, +1}, sums over kept entries only.

Each refinement iteration is one step of block coordinate descent on ||mask * (W - alpha B - mu)||^2:
B = sign(W - mu) is the optimal sign for alpha >= 0, then (alpha, mu) is the closed-form least-squares
solution for those signs. The error therefore never increases, and the returned (alpha, mu) are optimal
for the returned signs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_EPS = 1e-12


@dataclass
class Binarized:
    alpha: torch.Tensor  # [rows]
    mu: torch.Tensor  # [rows]
    signs: torch.Tensor  # bool [rows, cols], True = +1


def sign_of(x: torch.Tensor) -> torch.Tensor:
    """+1 where x >= 0, else -1 (sign(0) = +1 so every weight gets a sign)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def fit_scales(w: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form (alpha, mu) minimizing sum_kept (w - alpha b - mu)^2 per row, for fixed signs b."""
    count = keep.sum(1).clamp_min(1.0)
    sum_b = (keep * b).sum(1)
    sum_w = (keep * w).sum(1)
    sum_bw = (keep * b * w).sum(1)
    det = count * count - sum_b * sum_b  # sum(b^2) = count because b = +-1
    degenerate = det <= _EPS * count * count
    alpha = (count * sum_bw - sum_b * sum_w) / torch.where(degenerate, 1.0, det)
    mu = (sum_w - alpha * sum_b) / count
    # All kept signs equal: alpha and mu are not identifiable; spread around the mean instead.
    mean = sum_w / count
    spread = (keep * (w - mean[:, None]).abs()).sum(1) / count
    alpha = torch.where(degenerate, spread, alpha)
    mu = torch.where(degenerate, mean, mu)
    return alpha, mu


def reconstruct(b: Binarized, keep: torch.Tensor) -> torch.Tensor:
    return keep * (b.alpha[:, None] * sign_of_bool(b.signs) + b.mu[:, None])


def sign_of_bool(signs: torch.Tensor) -> torch.Tensor:
    return torch.where(signs, 1.0, -1.0)


def arb(
    w: torch.Tensor,
    keep: torch.Tensor | None = None,
    iters: int = 15,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Binarized:
    """Alternating refined binarization of each row of `w` [rows, cols] over the kept entries.

    `start` = (alpha, mu) warm-starts the refinement (SPBO reuses the previous step's scales); otherwise
    mu = mean of the kept entries and alpha = mean |w - mu|.
    """
    keep = torch.ones_like(w) if keep is None else keep.to(w.dtype)
    count = keep.sum(1).clamp_min(1.0)
    if start is None:
        mu = (keep * w).sum(1) / count
        alpha = (keep * (w - mu[:, None]).abs()).sum(1) / count
    else:
        alpha, mu = start
    b = sign_of(w - mu[:, None])
    for _ in range(max(1, iters)):
        alpha, mu = fit_scales(w, b, keep)
        new_b = sign_of(w - mu[:, None])
        if torch.equal(new_b, b):
            break
        b = new_b
    else:
        alpha, mu = fit_scales(w, b, keep)  # keep (alpha, mu) optimal for the signs returned
    return Binarized(alpha=alpha, mu=mu, signs=b > 0)


def error(w: torch.Tensor, q: torch.Tensor, col_weight: torch.Tensor | None = None) -> float:
    """Squared reconstruction error, each column weighted by `col_weight` (e.g. 1 / [U]_jj^2)."""
    diff = (w - q) ** 2
    if col_weight is not None:
        diff = diff * col_weight[None, :]
    return float(diff.sum())


def salient_residual(
    w: torch.Tensor, base: torch.Tensor, keep: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-order term on salient columns: residual R = w - base there, s2 = sign(R), alpha2 = mean |R|.

    alpha2 (one per row, shared by the group's salient columns) is the least-squares optimum for s2.
    Returns (alpha2 [rows], s2 bool [rows, len(cols)]).
    """
    resid = (w[:, cols] - base[:, cols]) * keep[:, cols]
    kept = keep[:, cols].sum(1)
    alpha2 = resid.abs().sum(1) / kept.clamp_min(1.0)
    return alpha2, resid >= 0
