"""Block binarizers: closed-form parameters against least squares, the GPTQ-loss identity, ARB-X vs ARB."""

from __future__ import annotations

import pytest
import torch

from pbs2p_edge.compress.blockq import (
    BlockParams,
    fit_rc,
    quantize_block,
    reconstruct_block,
    refit,
    sweep,
)
from pbs2p_edge.compress.gptq import inverse_factor
from pbs2p_edge.compress.scales import pm, row_features, row_values, solve_cols, solve_rows, whitener
from pbs2p_edge.compress.spbo import fit_block


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_u(cols: int, seed: int) -> torch.Tensor:
    """U (upper Cholesky factor of H^-1) for a non-identity H with correlated, unequal input features."""
    gen = _gen(seed)
    mix = torch.randn(cols, cols, generator=gen) * 0.4 + torch.diag(torch.rand(cols, generator=gen) * 3 + 0.2)
    x = torch.randn(4 * cols, cols, generator=gen) @ mix
    h = 2 * x.T.double() @ x.double() / x.shape[0]
    return inverse_factor(h, 0.01)[0]


def _mask(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A 6:8 mask: 2 random entries of every 8 pruned."""
    order = torch.rand(rows, cols // 8, 8, generator=_gen(seed)).argsort(-1)
    keep = torch.ones(rows, cols // 8, 8, dtype=torch.bool)
    keep.scatter_(-1, order[..., :2], False)
    return keep.view(rows, cols)


@pytest.mark.parametrize("metric", ["identity", "hessian"])
@pytest.mark.parametrize("col_scaled,with_mu", [(False, True), (True, False), (True, True)])
def test_row_parameters_match_lstsq(metric: str, col_scaled: bool, with_mu: bool) -> None:
    rows, cols, salient = 5, 16, [3, 11]
    gen = _gen(1)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    signs = torch.rand(rows, cols, generator=gen) > 0.5
    s2 = torch.rand(rows, len(salient), generator=gen) > 0.5
    keep = _mask(rows, cols, 2)
    col = torch.rand(cols, generator=gen, dtype=torch.float64) + 0.5 if col_scaled else None
    a = whitener(_correlated_u(cols, 3)) if metric == "hessian" else None
    feats = row_features(signs, keep, col, salient, s2, with_mu)
    theta = solve_rows(w, feats, a)
    eye = torch.eye(cols, dtype=torch.float64)
    for r in range(rows):
        mat = eye if a is None else a
        design = (feats[r] @ mat).T  # [cols, p]
        ref = torch.linalg.lstsq(design, (w[r] @ mat)[:, None]).solution[:, 0]
        assert torch.allclose(theta[r], ref, atol=1e-8)


@pytest.mark.parametrize("metric", ["identity", "hessian"])
def test_column_scales_match_lstsq(metric: str) -> None:
    rows, cols = 6, 8
    gen = _gen(4)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    v = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * _mask(rows, cols, 5)
    a = whitener(_correlated_u(cols, 6)) if metric == "hessian" else torch.eye(cols, dtype=torch.float64)
    c = solve_cols(w, v, None if metric == "identity" else a)
    # vec((W - V diag(c)) A) is linear in c: column j of the design is vec(V[:, j] e_j^T A).
    design = torch.stack([(v[:, j : j + 1] * a[j : j + 1, :]).reshape(-1) for j in range(cols)], dim=1)
    ref = torch.linalg.lstsq(design, (w @ a).reshape(-1, 1)).solution[:, 0]
    assert torch.allclose(c, ref, atol=1e-8)


def test_sweep_loss_is_the_whitened_block_error() -> None:
    """GPTQ identity: the sweep's summed squared errors equal ||(W_b - Q) U_bb^-1||^2 for the Q it builds."""
    rows, cols = 12, 64
    u = _correlated_u(cols, 7)
    w = torch.randn(rows, cols, generator=_gen(8))
    keep = _mask(rows, cols, 9)
    fit = fit_block(w, torch.diagonal(u), 6, 8, steps=2)
    p = BlockParams(fit.alpha, fit.mu, None, torch.full((rows,), 0.3))
    result = sweep(w, u, keep, p, [5, 40])
    q = reconstruct_block(p, result.signs, result.s2, keep, [5, 40])
    exact = ((w.double() - q) @ whitener(u)).square().sum()
    assert result.loss == pytest.approx(float(exact), rel=1e-4)


@pytest.mark.parametrize("salient", [[], [2, 30]])
def test_arbx_lowers_the_gptq_error_of_arb(salient: list[int]) -> None:
    rows, cols = 32, 128
    u = _correlated_u(cols, 10)
    w = torch.randn(rows, cols, generator=_gen(11)) * (torch.rand(cols, generator=_gen(12)) + 0.3)
    fit = fit_block(w, torch.diagonal(u), 6, 8, steps=2)
    base = quantize_block(w, u, fit.keep, fit.alpha, fit.mu, salient, "arb")
    refined = quantize_block(w, u, fit.keep, fit.alpha, fit.mu, salient, "arbx", x_iters=2)
    a = whitener(u)
    for bq in (base, refined):
        q = reconstruct_block(bq.params, bq.signs, bq.s2, fit.keep, salient)
        assert bq.loss == pytest.approx(float(((w.double() - q) @ a).square().sum()), rel=1e-4)
        assert torch.equal(bq.params.alpha, bq.params.alpha.half().float())  # stored values are fp16
    assert refined.loss < 0.99 * base.loss


@pytest.mark.parametrize("with_mu", [False, True])
def test_arbrc_fit_never_increases_the_error_and_refit_is_optimal(with_mu: bool) -> None:
    rows, cols = 24, 64
    gen = _gen(13)
    # Columns of very different magnitude: what a column scale is for.
    w = torch.randn(rows, cols, generator=gen) * (torch.rand(cols, generator=gen) * 4 + 0.1)
    keep = _mask(rows, cols, 14)

    def err(p: BlockParams) -> float:
        signs = (w >= p.mu[:, None] * p.col[None, :]) ^ (p.alpha[:, None] * p.col[None, :] < 0)
        return float(
            (keep * (w.double() - reconstruct_block(p, signs, signs[:, :0], keep, []))).square().sum()
        )

    start = (torch.ones(rows), torch.zeros(rows))
    errors = [err(fit_rc(w, keep, iters, with_mu, start)) for iters in (1, 2, 4, 8)]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:], strict=False))
    row_only = fit_block(w, torch.ones(cols), 8, 8)
    arb_err = float(
        (
            keep
            * (w - (row_only.alpha[:, None] * pm(w >= row_only.mu[:, None]).float() + row_only.mu[:, None]))
        )
        .square()
        .sum()
    )
    assert errors[-1] < arb_err  # column scales fit unequal columns better than row scales alone
    # refit: the row parameters it returns are least-squares optimal for the signs and column scales.
    u = _correlated_u(cols, 15)
    bq = quantize_block(w, u, keep, torch.ones(rows), torch.zeros(rows), [], "arbrc", rc_mu=with_mu)
    p = refit(w, whitener(u), keep, bq, [], rc=False, with_mu=with_mu)
    theta = torch.stack([p.alpha, p.mu], 1) if with_mu else p.alpha[:, None]
    feats = row_features(bq.signs, keep, bq.params.col, [], None, with_mu)
    assert torch.allclose(theta.double(), solve_rows(w, feats, whitener(u)), atol=1e-5)
    v = row_values(theta.double(), bq.signs, keep, [], None, with_mu)
    assert torch.all(torch.isfinite(v))
