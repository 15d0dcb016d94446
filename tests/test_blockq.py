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


def _hessian(k: int, seed: int):
    from pbs2p_edge.compress.gptq import HessianAccumulator

    gen = _gen(seed)
    acc = HessianAccumulator(k)
    mix = torch.randn(k, k, generator=gen) * 0.3 + torch.diag(torch.rand(k, generator=gen) * 3 + 0.2)
    acc.add(torch.randn(6 * k, k, generator=gen) @ mix)
    return acc


@pytest.mark.parametrize("binarizer,rc_mu", [("arbrc", False), ("arbrc", True), ("arbrcx", False)])
def test_rc_reconstruction_is_the_packed_formats_dense(binarizer: str, rc_mu: bool) -> None:
    """What the binarizer fitted (c_j times the row terms, salient term included) is what the packed format
    stores and reconstructs: SparseBinaryWeight -> pack -> unpack -> dense()."""
    import functools

    import numpy as np

    from pbs2p_edge.compress.gptq import quantize_matrix
    from pbs2p_edge.compress.pipeline import _to_weight
    from pbs2p_edge.config import PBS2PConfig
    from pbs2p_edge.format import pack, unpack

    rows, k, group = 16, 192, 64
    w = torch.randn(rows, k, generator=_gen(20)) * (torch.rand(k, generator=_gen(21)) * 3 + 0.1)
    u = inverse_factor(_hessian(k, 22).hessian(), 0.01)[0]
    fit = functools.partial(fit_block, n=6, m=8, steps=2)
    r = quantize_matrix(w, u, fit, group, 2, binarizer, rc_mu=rc_mu)
    assert r.col_scales is not None and not torch.all(r.col_scales == 1)
    config = PBS2PConfig(n=6, m=8, group_size=group, salient=2, binarizer=binarizer, rc_mu=rc_mu)
    dense = unpack(pack(_to_weight(r, 6, config, None))).dense()
    for g, start in enumerate(range(0, k, group)):
        sal = (r.salient_cols[g] - start).tolist()
        p = BlockParams(r.alpha[:, g], r.mu[:, g], r.col_scales[start : start + group], r.alpha2[:, g])
        keep = r.keep[:, start : start + group]
        q = reconstruct_block(p, r.signs[:, start : start + group], r.salient_signs[:, g], keep, sal)
        np.testing.assert_allclose(dense[:, start : start + group], q.numpy(), rtol=1e-6, atol=1e-7)
    if not rc_mu:
        assert np.all(r.mu.numpy() == 0)


def test_salient_search_never_does_worse_than_no_salient_columns() -> None:
    from pbs2p_edge.compress.pipeline import compress_linear, salient_score
    from pbs2p_edge.config import PBS2PConfig
    from pbs2p_edge.format import pack

    k = 128
    hessian = _hessian(k, 30)
    weight = torch.randn(24, k, generator=_gen(31)) * (torch.rand(k, generator=_gen(32)) * 3 + 0.1)
    config = PBS2PConfig(n=6, m=8, salient=4, salient_search=True, cfs=False, group_size=64)
    linear = torch.nn.Linear(k, 24, bias=False)
    linear.weight.data.copy_(weight)
    sbw, stats = compress_linear(linear, hessian, 6, config)
    tried = stats["salient_tried"]
    assert sorted(map(int, tried)) == [0, 1, 2, 3, 4]
    chosen = tried[str(sbw.salient)]
    assert chosen["score"] == min(t["score"] for t in tried.values()) <= tried["0"]["score"]
    # The bits it scored are the stored bits of that candidate, and S = 0 equals a fixed S = 0 run.
    fixed = torch.nn.Linear(k, 24, bias=False)
    fixed.weight.data.copy_(weight)
    zero, zero_stats = compress_linear(
        fixed, hessian, 6, PBS2PConfig(n=6, m=8, salient=0, cfs=False, group_size=64)
    )
    assert tried["0"]["bits"] == 8 * pack(zero).nbytes / zero.mask.size
    assert tried["0"]["score"] == salient_score(tried["0"]["loss"], tried["0"]["bits"], config.salient_rate)
    assert zero_stats["salient"] == 0 and zero_stats["loss"] > 0
    assert 8 * pack(sbw).nbytes / sbw.mask.size == chosen["bits"]
