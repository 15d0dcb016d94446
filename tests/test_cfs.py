"""CFS coarse stage: importance normalization and the exact parameter-weighted budget."""

from __future__ import annotations

import random

import pytest

from pbs2p_edge.compress.cfs import COSINE_FLOOR, allocate, importance_from_cosine


def test_importance_is_normalized_and_floors_orthogonal_layers() -> None:
    imp = importance_from_cosine([-0.2, 0.9, 0.95, 0.99])
    assert sum(imp) / len(imp) == pytest.approx(1.0)
    assert imp[0] == pytest.approx(
        (1 / COSINE_FLOOR) / ((1 / COSINE_FLOOR + 1 / 0.9 + 1 / 0.95 + 1 / 0.99) / 4)
    )
    assert imp[0] > imp[1] > imp[2] > imp[3]


@pytest.mark.parametrize("n,low,high", [(6, 5, 7), (5, 4, 6), (4, 2, 6), (6, 6, 8), (4, 3, 4)])
@pytest.mark.parametrize("seed", range(5))
def test_equal_layers_meet_the_budget_exactly(n: int, low: int, high: int, seed: int) -> None:
    rng = random.Random(seed)
    cosines = [rng.uniform(-0.1, 1.0) for _ in range(rng.randint(2, 30))]
    imp = importance_from_cosine(cosines)
    alloc = allocate(imp, [1000] * len(imp), n, low, high, delta=rng.uniform(0, 10))
    assert sum(alloc) == n * len(alloc)
    assert all(low <= a <= high for a in alloc)
    # A more important layer never keeps fewer weights than a less important one.
    ranked = [alloc[i] for i in sorted(range(len(imp)), key=lambda i: imp[i])]
    assert ranked == sorted(ranked)


def test_unequal_layers_never_exceed_the_budget() -> None:
    imp = [2.0, 0.5, 0.5, 1.0]
    params = [300, 100, 100, 500]
    alloc = allocate(imp, params, 6, 4, 8, delta=4.0)
    spent = sum(p * a for p, a in zip(params, alloc, strict=True))
    assert spent <= 6 * sum(params)
    assert 6 * sum(params) - spent < min(params)


def test_zero_delta_gives_every_layer_the_target() -> None:
    assert allocate([3.0, 0.1, 1.0], [1, 1, 1], 5, 4, 6, delta=0.0) == [5, 5, 5]
