"""CFS coarse stage: per-layer N from layer importance, under an exact parameter-weighted budget.

Importance of decoder layer l: 1 / max(cos(x_in, x_out), 0.5), cos averaged over calibration tokens, divided by its mean
over layers (a layer that changes its input a lot matters more). N_l = clip(round(N + (imp_l - 1) * delta),
N_low, N_high), then greedily adjusted (least important layers give up a weight first, most important gain
first) until sum_l params_l * N_l equals N * sum_l params_l. The fine stage (which weights inside each group
of M) is the Hessian-metric selection of `spbo.fit_block`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pbs2p_edge.errors import Pbs2pError

# A layer whose output is nearly orthogonal to its input (typically layer 0, fed the raw embeddings) would
# get an unbounded 1 / cos; flooring cos at 0.5 caps any layer at twice the importance of an identity layer.
COSINE_FLOOR = 0.5


def importance_from_cosine(cosines: Sequence[float]) -> list[float]:
    inverse = [1.0 / max(c, COSINE_FLOOR) for c in cosines]
    mean = sum(inverse) / len(inverse)
    return [v / mean for v in inverse]


def allocate(
    importance: Sequence[float],
    params: Sequence[int],
    n: int,
    n_low: int,
    n_high: int,
    delta: float,
) -> list[int]:
    """Per-layer N with sum(params * N) == n * sum(params) (exact when every layer has the same size)."""
    if len(importance) != len(params) or not importance:
        raise Pbs2pError("CFS needs one importance and one parameter count per layer")
    alloc = [min(n_high, max(n_low, math.floor(n + (imp - 1.0) * delta + 0.5))) for imp in importance]
    target = n * sum(params)
    current = sum(p * a for p, a in zip(params, alloc, strict=True))
    by_importance = sorted(range(len(alloc)), key=lambda i: (importance[i], i))
    while current > target:
        donor = next((i for i in by_importance if alloc[i] > n_low), None)
        if donor is None:
            break
        alloc[donor] -= 1
        current -= params[donor]
    while current < target:
        gainer = next(
            (i for i in reversed(by_importance) if alloc[i] < n_high and params[i] <= target - current), None
        )
        if gainer is None:
            break
        alloc[gainer] += 1
        current += params[gainer]
    return alloc
