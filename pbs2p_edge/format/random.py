"""Random valid sparse-binary layers, for tests and benchmarks."""

from __future__ import annotations

import numpy as np

from pbs2p_edge.format.packed import SparseBinaryWeight


def random_weight(
    rows: int,
    k: int,
    n: int = 6,
    m: int = 8,
    group_size: int = 128,
    salient: int = 0,
    bias: bool = False,
    seed: int = 0,
    col_scales: bool = False,
) -> SparseBinaryWeight:
    """A random N:M sparse-binary layer with plausible scales (alpha ~ 0.02, |mu| << alpha; column scales,
    if asked for, log-uniform in [0.25, 4])."""
    rng = np.random.default_rng(seed)
    runs = rng.random((rows, k // m, m)).argsort(axis=-1) < n  # exactly n kept per run
    mask = runs.reshape(rows, k)
    g = -(-k // group_size)
    w = SparseBinaryWeight(
        n=n,
        m=m,
        group_size=group_size,
        mask=mask,
        signs=rng.random((rows, k)) < 0.5,
        alpha=rng.uniform(0.01, 0.03, (rows, g)).astype(np.float32),
        mu=rng.normal(0.0, 0.003, (rows, g)).astype(np.float32),
    )
    if salient:
        starts = np.arange(g) * group_size
        widths = np.minimum(group_size, k - starts)
        w.salient_cols = np.stack(
            [starts[i] + rng.choice(widths[i], size=salient, replace=False) for i in range(g)]
        ).astype(np.int64)
        w.salient_signs = rng.random((rows, g, salient)) < 0.5
        w.alpha2 = rng.uniform(0.005, 0.015, (rows, g)).astype(np.float32)
    if bias:
        w.bias = rng.normal(0.0, 0.1, rows).astype(np.float32)
    if col_scales:
        c = np.exp2(rng.uniform(-2.0, 2.0, k)).astype(np.float16).astype(np.float32)
        w.col_scales = c
    return w
