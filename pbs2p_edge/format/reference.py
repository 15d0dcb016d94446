"""Numpy reference matmuls: the oracle every C++ kernel is tested against."""

from __future__ import annotations

import numpy as np

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.format.packed import ACT_MAX, CHUNK_COLS, PackedWeight, unpack


def _check_x(x: np.ndarray, p: PackedWeight) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 1 or x.shape[-1] != p.k:
        raise Pbs2pError(f"x has shape {list(x.shape)} but the weight is [{p.rows}, {p.k}]")
    return x


def reference_matmul(x: np.ndarray, p: PackedWeight) -> np.ndarray:
    """x [..., K] @ W_hat.T (+ bias) -> float32 [..., rows], exact (float64 accumulation)."""
    x = _check_x(x, p)
    w = unpack(p)
    y = x.astype(np.float64) @ w.dense().astype(np.float64).T
    if w.bias is not None:
        y += w.bias.astype(np.float64)
    return y.astype(np.float32)


def chunk_bounds(k: int, group_size: int) -> list[tuple[int, int, int]]:
    """(begin, end, group) of every activation-quantization chunk, as the kernels cut them."""
    out = []
    for g, g0 in enumerate(range(0, k, group_size)):
        g1 = min(k, g0 + group_size)
        out.extend((c, min(g1, c + CHUNK_COLS), g) for c in range(g0, g1, CHUNK_COLS))
    return out


def kernel_matmul(x: np.ndarray, p: PackedWeight) -> np.ndarray:
    """What the C++ kernels compute: activations scaled by the column scales c (if any, float32 product),
    quantized to int7 per chunk of <= 64 columns of a group (scale = max|x| / 63, round half to even), exact
    integer sums, then scaled by fp16 alpha/mu; the salient term uses the scaled float activations."""
    x = _check_x(x, p)
    w = unpack(p)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.k)
    if w.col_scales is not None:  # y = W_hat_v1 @ (x * c): one float32 product per activation, as in C++
        x2 = x2 * w.col_scales.astype(np.float32)[None, :]
    ternary = np.where(w.mask, np.where(w.signs, 1, -1), 0).astype(np.int64)
    kept = w.mask.astype(np.int64)
    y = np.zeros((x2.shape[0], p.rows), dtype=np.float64)
    for b, e, g in chunk_bounds(p.k, p.group_size):
        xc = x2[:, b:e]
        finite = np.isfinite(xc).all(axis=1)  # a NaN/inf activation makes the token's outputs NaN, as in C++
        amax = np.where(finite, np.abs(np.where(np.isfinite(xc), xc, 0)).max(axis=1), np.float32(0.0))
        safe = np.where(amax > 0, amax, np.float32(1.0)).astype(np.float32)
        inv = np.where(amax > 0, np.float32(ACT_MAX) / safe, np.float32(0.0)).astype(np.float32)
        xq = np.where(finite[:, None], xc, np.float32(0.0)) * inv[:, None]
        q = np.clip(np.rint(xq), -ACT_MAX, ACT_MAX).astype(np.int64)
        d = q @ ternary[:, b:e].T
        s = q @ kept[:, b:e].T
        scale = np.where(finite, (amax / np.float32(ACT_MAX)).astype(np.float32), np.nan).astype(np.float64)
        y += scale[:, None] * (w.alpha[:, g].astype(np.float64) * d + w.mu[:, g].astype(np.float64) * s)
    if w.salient_cols is not None:
        for g, cols in enumerate(w.salient_cols):
            for s_idx, col in enumerate(cols):
                coef = np.where(w.mask[:, col], np.where(w.salient_signs[:, g, s_idx], 1.0, -1.0), 0.0)
                y += (
                    x2[:, col : col + 1].astype(np.float64)
                    * (w.alpha2[:, g].astype(np.float64) * coef)[None, :]
                )
    if w.bias is not None:
        y += w.bias.astype(np.float64)
    return y.astype(np.float32).reshape(*lead, p.rows)


# The op's epilogues (attribute `activation`, docs/FORMAT.md "Epilogue"): float32 operations in the order of
# custom_ops/kernels/generic/epilogue.cpp, so the op and this twin agree bit for bit.
ACTIVATIONS = ("none", "swiglu")
_EXP_CLAMP = np.float32(87.0)
_LOG2E = np.float32(1.44269504088896341)
_ROUND_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23
_ROUND_BITS = np.uint32(0x4B400000)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_POLY = tuple(
    np.float32(c)
    for c in (
        1.9875691500e-4,
        1.3981999507e-3,
        8.3334519073e-3,
        4.1665795894e-2,
        1.6666665459e-1,
        5.0000001201e-1,
    )
)


def swiglu(y: np.ndarray) -> np.ndarray:
    """The `swiglu` epilogue: y [..., 2F] (gate = columns [0, F), up = [F, 2F)) -> silu(gate) * up [..., F],
    float32, with the op's own exp (Cody-Waite reduction, a degree-7 polynomial, |argument| clamped to 87)."""
    y = np.asarray(y, dtype=np.float32)
    if y.ndim < 1 or y.shape[-1] % 2:
        raise Pbs2pError(f"swiglu needs an even last dimension (gate then up), got shape {list(y.shape)}")
    f = y.shape[-1] // 2
    gate, up = y[..., :f], y[..., f:]
    with np.errstate(all="ignore"):
        x = -gate
        x = np.where(x < -_EXP_CLAMP, -_EXP_CLAMP, x)
        x = np.where(x > _EXP_CLAMP, _EXP_CLAMP, x)
        t = x * _LOG2E + _ROUND_MAGIC
        n = t - _ROUND_MAGIC
        r = x - n * _LN2_HI
        r = r - n * _LN2_LO
        z = r * r
        p = np.full_like(r, _EXP_POLY[0])
        for c in _EXP_POLY[1:]:
            p = p * r + c
        p = p * z + r + np.float32(1.0)
        bits = (t.view(np.uint32) - _ROUND_BITS + np.uint32(127)) << np.uint32(23)
        return (gate / (np.float32(1.0) + p * bits.view(np.float32)) * up).astype(np.float32)


def apply_activation(y: np.ndarray, activation: str) -> np.ndarray:
    """The op's output from its matmul output `y` for attribute `activation` ("none" or "swiglu")."""
    if activation == "none":
        return np.asarray(y, dtype=np.float32)
    if activation == "swiglu":
        return swiglu(y)
    raise Pbs2pError(f"unknown activation {activation!r} (expected one of {', '.join(ACTIVATIONS)})")
