"""GPTQ-style error compensation: Hessian of a linear layer's inputs, its inverse Cholesky factor, and the
block loop that quantizes one weight matrix column block by column block.

H = (2/n) sum_x x x^T, damped by `damping * mean(diag H)`; U = upper Cholesky factor of H^-1. A block's mask
and scales are fitted once at the block start (`fit`); its columns are then quantized one at a time and each
column's error (w - q) / U_jj is pushed into the block's later columns, and at the block end into all later
columns (lazy batch update).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pbs2p_edge.compress.blockq import quantize_block, uses_col_scales
from pbs2p_edge.compress.spbo import BlockFit


class HessianAccumulator:
    """Running H = (2/n) sum x x^T over every input row seen by a linear layer (fp64 accumulator)."""

    def __init__(self, features: int) -> None:
        self.sum = torch.zeros(features, features, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum += (x.T @ x).double()
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return 2.0 * self.sum / max(self.count, 1)


def inverse_factor(h: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U = upper Cholesky factor of (H + damping * mean diag H * I)^-1 in fp32; `dead` marks
    input features that never fired (their H row is set to identity; their weights should be zeroed)."""
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    diag_mean = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(6):
        damp = damping * (10.0**attempt) * diag_mean
        try:
            lower = torch.linalg.cholesky(h + damp * eye)
            h_inv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(h_inv, upper=True).float(), dead
        except torch.linalg.LinAlgError:
            continue
    raise RuntimeError("Hessian is not positive definite even with 1e5 x damping")


@dataclass
class MatrixResult:
    keep: torch.Tensor  # bool [rows, K]
    signs: torch.Tensor  # bool [rows, K] (False where pruned)
    alpha: torch.Tensor  # fp16-representable float32 [rows, G]
    mu: torch.Tensor
    salient_cols: torch.Tensor | None  # int64 [G, S] absolute columns
    salient_signs: torch.Tensor | None  # bool [rows, G, S]
    alpha2: torch.Tensor | None  # [rows, G]
    step_errors: list[float] = field(default_factory=list)  # summed over blocks, per SPBO step
    loss: float = 0.0  # sum of ((w - q) / U_jj)^2, the GPTQ proxy of the output error
    col_scales: torch.Tensor | None = None  # [K] per-input-column scales (RC binarizers), fp16-representable
    probe_losses: dict[int, float] = field(default_factory=dict)  # S -> summed block loss (salient search)


def to_fp16_grid(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back: the values the packed format stores."""
    return x.half().float()


def quantize_matrix(
    w: torch.Tensor,
    u: torch.Tensor,
    fit: Callable[[torch.Tensor, torch.Tensor], BlockFit],
    group_size: int,
    salient: int = 0,
    binarizer: str = "arb",
    *,
    rc_mu: bool = False,
    x_iters: int = 2,
    rc_iters: int = 15,
    probe: tuple[int, ...] = (),
) -> MatrixResult:
    """Quantize `w` [rows, K] with error compensation through `u` (U of H^-1); `fit(block, d)` picks the
    block's mask and ARB scales, `binarizer` (compress/blockq.py) its final parameters and signs. `salient`
    columns per block get the second-order residual term. For each S in `probe` (S <= salient) every block is
    also quantized with its top-S salient columns from the same block state (the compensation follows
    `salient`), and the summed block losses are returned in `probe_losses`."""
    w = w.float().clone()
    rows, k = w.shape
    n_groups = (k + group_size - 1) // group_size
    keep = torch.zeros(rows, k, dtype=torch.bool)
    signs = torch.zeros(rows, k, dtype=torch.bool)
    alpha = torch.zeros(rows, n_groups)
    mu = torch.zeros(rows, n_groups)
    col_scales = torch.ones(k) if uses_col_scales(binarizer) else None
    sal_cols = torch.zeros(n_groups, salient, dtype=torch.int64) if salient else None
    sal_signs = torch.zeros(rows, n_groups, salient, dtype=torch.bool) if salient else None
    alpha2 = torch.zeros(rows, n_groups) if salient else None
    step_errors: list[float] = []
    loss = 0.0
    probe_losses: dict[int, float] = {}
    for g, start in enumerate(range(0, k, group_size)):
        end = min(start + group_size, k)
        block = w[:, start:end].clone()
        u_block = u[start:end, start:end]
        d = torch.diagonal(u_block)
        fitted = fit(block, d)
        if step_errors:
            step_errors = [a + b for a, b in zip(step_errors, fitted.step_errors, strict=True)]
        else:
            step_errors = list(fitted.step_errors)
        keep[:, start:end] = fitted.keep
        salient_local: list[int] = []
        if salient:
            # Salient columns: the largest OBS column scores sum_i w_ij^2 / U_jj^2 in this block.
            score = (block.square() * fitted.keep.float()).sum(0) / d.square()
            ranking = score.topk(min(salient, end - start)).indices.tolist()
            salient_local = sorted(ranking)
        for count in probe:
            sal = sorted(ranking[:count]) if count else []
            kwargs = {"rc_mu": rc_mu, "x_iters": x_iters, "rc_iters": rc_iters}
            trial = quantize_block(
                block, u_block, fitted.keep, fitted.alpha, fitted.mu, sal, binarizer, **kwargs
            )
            probe_losses[count] = probe_losses.get(count, 0.0) + trial.loss
        bq = quantize_block(
            block,
            u_block,
            fitted.keep,
            fitted.alpha,
            fitted.mu,
            salient_local,
            binarizer,
            rc_mu=rc_mu,
            x_iters=x_iters,
            rc_iters=rc_iters,
        )
        alpha[:, g], mu[:, g] = bq.params.alpha, bq.params.mu
        signs[:, start:end] = bq.signs
        if col_scales is not None:
            col_scales[start:end] = bq.params.col
        if salient:
            alpha2[:, g] = bq.params.alpha2
            sal_cols[g] = torch.tensor(salient_local) + start
            sal_signs[:, g] = bq.s2
        loss += bq.loss
        w[:, end:] -= bq.errs @ u[start:end, end:]
    return MatrixResult(
        keep, signs, alpha, mu, sal_cols, sal_signs, alpha2, step_errors, loss, col_scales, probe_losses
    )
