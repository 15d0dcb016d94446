"""One column block of GPTQ: the binarizers' parameters (ARB, ARB-X, ARB-RC, ARB-RC-X) and the column sweep.

Every binarizer reconstructs Q[r, j] = c[j] * keep[r, j] * (alpha[r] b[r, j] + mu[r] + [j salient] alpha2[r] s2[r, j])
(c = 1 and no column scale for ARB/ARB-X, mu = 0 for ARB-RC unless `rc_mu`). The parameters are fitted at
the block start; the sweep then takes the columns left to right, re-takes each sign from the column as updated
by the earlier columns' errors, and pushes each column's error (w - q) / U_jj into the block's later columns.

For any block quantization Q the GPTQ loss of the block (its output error after the optimal compensation of
all later columns) is ||(W_b - Q) U_bb^-1||^2 (W_b = the block at its start), and the error pushed into the
later blocks is E = (W_b - Q) U_bb^-1. The "X" binarizers minimize exactly that: they alternate a sweep (the
signs for fixed parameters, GPTQ's greedy choice) with the closed-form parameters for those signs under the
metric U_bb^-1 U_bb^-T, then keep the best (parameters, signs) found.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pbs2p_edge.compress.binarize import salient_residual, sign_of
from pbs2p_edge.compress.scales import pm, row_features, row_values, solve_cols, solve_rows, whitener

BINARIZERS = ("arb", "arbx", "arbrc", "arbrcx")


def uses_col_scales(binarizer: str) -> bool:
    return binarizer in ("arbrc", "arbrcx")


@dataclass
class BlockParams:
    alpha: torch.Tensor  # [rows] float32
    mu: torch.Tensor  # [rows]
    col: torch.Tensor | None = None  # [cols] column scales (RC binarizers)
    alpha2: torch.Tensor | None = None  # [rows] salient second-order scale

    def fp16(self) -> BlockParams:
        """Rounded to the fp16 values the packed format stores."""

        def r(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.float().half().float()

        return BlockParams(r(self.alpha), r(self.mu), r(self.col), r(self.alpha2))


@dataclass
class BlockQuant:
    params: BlockParams  # fp16-representable
    signs: torch.Tensor  # bool [rows, cols], False where pruned
    s2: torch.Tensor  # bool [rows, S] salient second signs, False where pruned
    errs: torch.Tensor  # [rows, cols] E = (W_b - Q) U_bb^-1, pushed into later blocks
    loss: float  # ||E||^2


def sweep(
    w0: torch.Tensor, u_block: torch.Tensor, keep: torch.Tensor, p: BlockParams, salient: list[int]
) -> BlockQuant:
    """GPTQ's column loop with fixed parameters; each sign minimizes its column entry's error given the
    compensation so far (the rule is sign-safe for negative scales)."""
    block = w0.clone()
    rows, cols = block.shape
    d = torch.diagonal(u_block)
    mask = keep.float()
    signs = torch.zeros(rows, cols, dtype=torch.bool)
    s2 = torch.zeros(rows, len(salient), dtype=torch.bool)
    errs = torch.zeros_like(block)
    position = {c: k for k, c in enumerate(salient)}
    for i in range(cols):
        col = block[:, i]
        scale, shift = p.alpha, p.mu
        if p.col is not None:
            scale, shift = scale * p.col[i], shift * p.col[i]
        s = (col >= shift) ^ (scale < 0)
        q = scale * torch.where(s, 1.0, -1.0) + shift
        k = position.get(i)
        if k is not None:
            a2 = p.alpha2 if p.col is None else p.alpha2 * p.col[i]
            t = (col >= q) ^ (a2 < 0)
            q = q + a2 * torch.where(t, 1.0, -1.0)
            s2[:, k] = t & keep[:, i]
        q = q * mask[:, i]
        signs[:, i] = s & keep[:, i]
        err = (col - q) / d[i]
        block[:, i:] -= err[:, None] * u_block[i, i:][None, :]
        errs[:, i] = err
    return BlockQuant(p, signs, s2, errs, float(errs.square().sum()))


def reconstruct_block(
    p: BlockParams, signs: torch.Tensor, s2: torch.Tensor, keep: torch.Tensor, salient: list[int]
) -> torch.Tensor:
    q = p.alpha.double()[:, None] * pm(signs) + p.mu.double()[:, None]
    if salient:
        q[:, salient] += p.alpha2.double()[:, None] * pm(s2)
    if p.col is not None:
        q = q * p.col.double()[None, :]
    return q * keep.double()


def quantize_block(
    w0: torch.Tensor,
    u_block: torch.Tensor,
    keep: torch.Tensor,
    alpha: torch.Tensor,
    mu: torch.Tensor,
    salient: list[int],
    binarizer: str = "arb",
    *,
    rc_mu: bool = False,
    x_iters: int = 2,
    rc_iters: int = 15,
) -> BlockQuant:
    """Quantize block `w0` [rows, cols] (mask `keep` and ARB (alpha, mu) from SPBO) with `binarizer`."""
    if binarizer not in BINARIZERS:
        raise ValueError(f"unknown binarizer {binarizer!r}")
    rc = uses_col_scales(binarizer)
    with_mu = not rc or rc_mu
    if rc:
        p = fit_rc(w0, keep, rc_iters, with_mu, (alpha, mu)).fp16()
    else:
        p = BlockParams(alpha, mu).fp16()
    if salient:
        p.alpha2 = salient_init(w0, keep, p, salient).float().half().float()
    if binarizer in ("arb", "arbrc"):
        return sweep(w0, u_block, keep, p, salient)
    return _refine_x(w0, u_block, keep, p, salient, rc, with_mu, x_iters)


def salient_init(w0: torch.Tensor, keep: torch.Tensor, p: BlockParams, salient: list[int]) -> torch.Tensor:
    """alpha2 at the block start: least-squares scale of sign(residual) on the salient columns."""
    cols = torch.tensor(salient)
    if p.col is None:
        base = p.alpha[:, None] * sign_of(w0 - p.mu[:, None]) + p.mu[:, None]
        return salient_residual(w0, base, keep.float(), cols)[0]
    c = p.col[cols][None, :]
    ws = w0[:, cols]
    b = (ws >= p.mu[:, None] * c) ^ (p.alpha[:, None] * c < 0)
    resid = (ws - c * (p.alpha[:, None] * torch.where(b, 1.0, -1.0) + p.mu[:, None])) * keep[:, cols]
    return (resid.abs() * c.abs()).sum(1) / (c.square() * keep[:, cols]).sum(1).clamp_min(1e-30)


def fit_rc(
    w: torch.Tensor,
    keep: torch.Tensor,
    iters: int,
    with_mu: bool,
    start: tuple[torch.Tensor, torch.Tensor],
) -> BlockParams:
    """ARB-RC on the kept entries: W ~ c_j (alpha_r b + mu_r), alternating the optimal signs, the closed-form
    row parameters and the closed-form column scales (each step lowers ||keep o (W - Q)||^2). With mu off it
    starts from alpha = mean |w|; with mu on from SPBO's (alpha, mu). c is normalized to RMS 1."""
    w64 = w.double()
    mask = keep.double()
    count = mask.sum(1).clamp_min(1.0)
    col = torch.ones(w.shape[1], dtype=torch.float64)
    if with_mu:
        alpha, mu = start[0].double(), start[1].double()
    else:
        alpha = (mask * w64.abs()).sum(1) / count
        mu = torch.zeros_like(alpha)
    previous = None
    for _ in range(max(1, iters)):
        signs = (w64 >= mu[:, None] * col[None, :]) ^ (alpha[:, None] * col[None, :] < 0)
        if previous is not None and torch.equal(signs, previous):
            break
        previous = signs
        theta = solve_rows(w64, row_features(signs, keep, col, [], None, with_mu))
        col = solve_cols(w64, row_values(theta, signs, keep, [], None, with_mu))
        col, theta = _normalize(col, theta)
        alpha = theta[:, 0]
        mu = theta[:, 1] if with_mu else torch.zeros_like(alpha)
    return BlockParams(alpha.float(), mu.float(), col.float())


def _normalize(col: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rms = col.square().mean().sqrt()
    if not torch.isfinite(rms) or rms <= 0:
        return col, theta
    return col / rms, theta * rms


def _params(theta: torch.Tensor, col: torch.Tensor | None, with_mu: bool, salient: list[int]) -> BlockParams:
    alpha = theta[:, 0].float()
    mu = theta[:, 1].float() if with_mu else torch.zeros_like(alpha)
    alpha2 = theta[:, -1].float() if salient else None
    return BlockParams(alpha, mu, None if col is None else col.float(), alpha2)


def refit(
    w0: torch.Tensor,
    a: torch.Tensor,
    keep: torch.Tensor,
    bq: BlockQuant,
    salient: list[int],
    rc: bool,
    with_mu: bool,
) -> BlockParams:
    """Closed-form parameters for the signs of `bq` under ||(W_b - Q) A||^2 (rows, then columns for RC)."""
    col = bq.params.col
    theta = solve_rows(w0, row_features(bq.signs, keep, col, salient, bq.s2, with_mu), a)
    if rc:
        v = row_values(theta, bq.signs, keep, salient, bq.s2, with_mu)
        col64, theta = _normalize(solve_cols(w0, v, a), theta)
        col = col64
        theta = solve_rows(w0, row_features(bq.signs, keep, col, salient, bq.s2, with_mu), a)
    return _params(theta, col, with_mu, salient)


def _exact(
    w0: torch.Tensor, a: torch.Tensor, keep: torch.Tensor, p: BlockParams, bq: BlockQuant, salient: list[int]
) -> BlockQuant:
    errs = (w0.double() - reconstruct_block(p, bq.signs, bq.s2, keep, salient)) @ a
    return BlockQuant(p, bq.signs, bq.s2, errs.float(), float(errs.square().sum()))


def _refine_x(
    w0: torch.Tensor,
    u_block: torch.Tensor,
    keep: torch.Tensor,
    p: BlockParams,
    salient: list[int],
    rc: bool,
    with_mu: bool,
    iters: int,
) -> BlockQuant:
    a = whitener(u_block)
    current = _exact(w0, a, keep, p, sweep(w0, u_block, keep, p, salient), salient)
    best = current
    for step in range(max(1, iters)):
        fitted = _exact(w0, a, keep, refit(w0, a, keep, current, salient, rc, with_mu), current, salient)
        best = min(best, fitted, key=_loss)
        if step + 1 < iters:
            current = _exact(
                w0, a, keep, fitted.params, sweep(w0, u_block, keep, fitted.params, salient), salient
            )
            best = min(best, current, key=_loss)
    # The deployed values are fp16: the best (parameters, signs) found, on the fp16 grid.
    return _exact(w0, a, keep, best.params.fp16(), best, salient)


def _loss(bq: BlockQuant) -> float:
    return bq.loss
