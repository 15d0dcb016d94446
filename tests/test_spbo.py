"""SPBO block fitting and the GPTQ loop: N:M invariant, per-step error, compensation."""

from __future__ import annotations

import functools

import pytest
import torch

from pbs2p_edge.compress.binarize import Binarized, reconstruct
from pbs2p_edge.compress.gptq import HessianAccumulator, inverse_factor, quantize_matrix
from pbs2p_edge.compress.spbo import fit_block, step_sizes


def _gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _assert_nm(keep: torch.Tensor, n: int, m: int) -> None:
    rows, cols = keep.shape
    assert keep.dtype == torch.bool
    counts = keep.view(rows, cols // m, m).sum(-1)
    assert torch.all(counts == n), f"some group of {m} does not keep exactly {n}"


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize(
    "progressive,rescore,metric",
    [(False, False, "obs"), (False, False, "magnitude"), (True, False, "obs"), (True, True, "obs")],
)
def test_every_mask_is_n_of_m(n: int, progressive: bool, rescore: bool, metric: str) -> None:
    w = _gaussian(16, 64, n)
    d = torch.rand(64, generator=torch.Generator().manual_seed(0)) + 0.5
    fit = fit_block(w, d, n, 8, steps=max(1, 8 - n), progressive=progressive, rescore=rescore, metric=metric)
    _assert_nm(fit.keep, n, 8)


@pytest.mark.parametrize("n,rescore", [(6, True), (6, False), (5, True), (5, False)])
def test_spbo_error_falls_at_every_step(n: int, rescore: bool) -> None:
    """On a Gaussian layer, zeroing the cheapest weights and re-binarizing lowers the error at each step,
    ending below binarization without pruning (the SPBO claim, at 6:8 and 5:8)."""
    w = _gaussian(256, 128, 11)
    fit = fit_block(w, torch.ones(128), n, 8, steps=8 - n, progressive=True, rescore=rescore)
    assert len(fit.step_errors) == 8 - n + 1
    for before, after in zip(fit.step_errors, fit.step_errors[1:], strict=False):
        assert after < before


def test_spbo_with_rescoring_is_not_worse_than_one_shot() -> None:
    w = _gaussian(256, 128, 12)
    ones = torch.ones(128)
    naive = fit_block(w, ones, 6, 8, progressive=False)
    spbo = fit_block(w, ones, 6, 8, steps=2, progressive=True, rescore=True)
    assert spbo.step_errors[-1] <= naive.step_errors[-1]


def test_step_sizes() -> None:
    assert step_sizes(2, 2) == [1, 1]
    assert step_sizes(4, 3) == [2, 1, 1]
    assert step_sizes(3, 1) == [3]


def _fit(n: int):
    return functools.partial(fit_block, n=n, m=8, steps=8 - n if n < 8 else 1, progressive=True, rescore=True)


def test_identity_hessian_reduces_to_the_block_fit() -> None:
    """With U = I nothing is propagated: W_hat is exactly the block fit with fp16-rounded scales."""
    w = _gaussian(8, 96, 13)
    result = quantize_matrix(w, torch.eye(96), _fit(6), group_size=64)
    _assert_nm(result.keep, 6, 8)
    for g, start in enumerate((0, 64)):
        block = w[:, start : start + 64]
        fit = _fit(6)(block, torch.ones(block.shape[1]))
        expected = Binarized(
            fit.alpha.half().float(), fit.mu.half().float(), block >= fit.mu.half().float()[:, None]
        )
        got = Binarized(result.alpha[:, g], result.mu[:, g], result.signs[:, start : start + 64])
        keep = result.keep[:, start : start + 64].float()
        torch.testing.assert_close(reconstruct(got, keep), reconstruct(expected, keep))


def test_error_compensation_lowers_the_output_error() -> None:
    gen = torch.Generator().manual_seed(14)
    mixing = torch.randn(64, 64, generator=gen) / 8 + torch.eye(64)
    x = torch.randn(2048, 64, generator=gen) @ mixing  # correlated inputs
    w = torch.randn(32, 64, generator=gen)
    acc = HessianAccumulator(64)
    acc.add(x)
    u, dead = inverse_factor(acc.hessian(), 0.01)
    assert not dead.any()

    def output_error(u_matrix: torch.Tensor) -> float:
        r = quantize_matrix(w, u_matrix, _fit(6), group_size=32)
        q = torch.where(r.signs, r.alpha.repeat_interleave(32, 1), -r.alpha.repeat_interleave(32, 1))
        q = (q + r.mu.repeat_interleave(32, 1)) * r.keep
        return float(((x @ w.T - x @ q.T) ** 2).sum())

    assert output_error(u) < 0.9 * output_error(torch.eye(64))


def test_salient_columns_are_recorded_per_group() -> None:
    w = _gaussian(8, 128, 15)
    r = quantize_matrix(w, torch.eye(128), _fit(6), group_size=64, salient=2)
    assert r.salient_cols.shape == (2, 2)
    assert torch.all((r.salient_cols[0] < 64) & (r.salient_cols[1] >= 64))
    assert r.salient_signs.shape == (8, 2, 2) and r.alpha2.shape == (8, 2)
