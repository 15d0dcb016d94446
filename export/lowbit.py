"""Calibration-free, error-aware group quantization in MatMulNBits' asymmetric layout (2/4/8 bits).

For each block of `block_size` weights along K of one row, the stored value is `s * (q - z)` with integer
`q, z in [0, 2^bits)` (uint8 zero points, MatMulNBits' optional 4th input) and a float32 scale `s`. Instead of
round-to-nearest over the block's min/max, the (z, s) pair is searched to minimise the *weighted* squared error
`sum_j h_j (w_j - s (q_j - z))^2`, where `h_j` is the importance of input column j: for an LM head, the squared
gain of the final RMSNorm (the head's input is `normalized * gain`, so an error in column j is scaled by
gain_j). The search tries every zero point and a grid of scales shrunk from the block's range, then refines the
best scale by weighted least squares on its codes (`REFINE_STEPS` times). Nothing depends on data.

Packing (checked bit for bit against ONNX Runtime in tests/test_head_formats.py): codes of a block are packed
`8 / bits` per byte, lowest bits first; zero points likewise, flattened over the row's blocks, per row
`ceil(blocks * bits / 8)` bytes.
"""

from __future__ import annotations

import numpy as np

from pbs2p_edge.errors import Pbs2pError

SCALE_GRID = np.linspace(0.5, 1.0, 11)
REFINE_STEPS = 2
ROWS_PER_CHUNK = 2048
PROGRESS_ROWS = 65536  # larger matrices show a progress bar


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes [..., L] (L a multiple of 8/bits) `8/bits` per byte, lowest bits first."""
    per_byte = 8 // bits
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte).astype(np.uint8)
    packed = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for i in range(per_byte):
        packed |= (grouped[..., i] << (bits * i)).astype(np.uint8)
    return packed


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack_codes`: uint8 [..., B] -> uint8 [..., B * 8 / bits]."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def pack_zero_points(zero: np.ndarray, bits: int) -> np.ndarray:
    """Zero points uint8 [N, blocks] -> MatMulNBits' [N, ceil(blocks * bits / 8)] (padded with 0)."""
    per_byte = 8 // bits
    n, blocks = zero.shape
    padded = np.zeros((n, -(-blocks // per_byte) * per_byte), dtype=np.uint8)
    padded[:, :blocks] = zero
    return pack_codes(padded, bits)


def _search_chunk(w: np.ndarray, h: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best (codes, scale, zero) for blocks w [R, G, B] with column importance h [G, B]."""
    top = w.max(axis=-1)
    bottom = w.min(axis=-1)
    best_err = np.full(w.shape[:2], np.inf, dtype=np.float64)
    best_s = np.zeros(w.shape[:2], dtype=np.float32)
    best_z = np.zeros(w.shape[:2], dtype=np.uint8)
    for z in range(levels):
        # The smallest scale that reaches both ends of the block on the grid {-z .. levels-1-z} * s.
        reach = np.zeros(w.shape[:2], dtype=np.float32)
        if levels - 1 - z > 0:
            reach = np.maximum(reach, np.maximum(top, 0.0) / (levels - 1 - z))
        if z > 0:
            reach = np.maximum(reach, np.maximum(-bottom, 0.0) / z)
        reach = np.where(reach > 0, reach, 1.0).astype(np.float32)
        for ratio in SCALE_GRID:
            s = (reach * ratio)[..., None]
            q = np.clip(np.rint(w / s) + z, 0, levels - 1)
            err = (h * (w - s * (q - z)) ** 2).sum(axis=-1, dtype=np.float64)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, s[..., 0], best_s)
            best_z = np.where(better, np.uint8(z), best_z)
    for _ in range(REFINE_STEPS):
        s = best_s[..., None]
        zf = best_z[..., None].astype(np.float32)
        q = np.clip(np.rint(w / s) + zf, 0, levels - 1) - zf
        denominator = (h * q * q).sum(axis=-1)
        refit = np.where(denominator > 0, (h * w * q).sum(axis=-1) / np.maximum(denominator, 1e-30), best_s)
        refit = np.where(refit > 0, refit, best_s).astype(np.float32)
        q2 = np.clip(np.rint(w / refit[..., None]) + zf, 0, levels - 1) - zf
        err = (h * (w - refit[..., None] * q2) ** 2).sum(axis=-1, dtype=np.float64)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, refit, best_s)
    s = best_s[..., None]
    zf = best_z[..., None].astype(np.float32)
    codes = np.clip(np.rint(w / s) + zf, 0, levels - 1).astype(np.uint8)
    return codes, best_s.astype(np.float32), best_z


def search_quantize(
    weight: np.ndarray, bits: int, block_size: int, importance: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize W [N, K] along K: (packed uint8 [N, K/block, block*bits/8], scales f32 [N, K/block], zero u8).

    `importance` [K] (>= 0) weights each input column's squared error; None = uniform.
    """
    if bits not in (2, 4, 8):
        raise Pbs2pError(f"unsupported quantization width {bits} bits (MatMulNBits takes 2, 4 or 8)")
    n, k = weight.shape
    if k % block_size:
        raise Pbs2pError(f"cannot quantize: K={k} is not a multiple of the block size {block_size}")
    blocks = k // block_size
    h = np.ones(k, np.float32) if importance is None else np.asarray(importance, np.float32)
    if h.shape != (k,) or not np.all(np.isfinite(h)) or np.any(h < 0):
        raise Pbs2pError(f"importance must be {k} finite non-negative values")
    h = (h / max(float(h.mean()), 1e-30)).reshape(blocks, block_size)
    codes = np.empty((n, blocks, block_size), np.uint8)
    scales = np.empty((n, blocks), np.float32)
    zero = np.empty((n, blocks), np.uint8)
    w_all = np.asarray(weight, np.float32).reshape(n, blocks, block_size)
    from tqdm.auto import tqdm

    # minutes for a 151,936-row head: a bar with ETA on a terminal (tqdm turns itself off elsewhere)
    with tqdm(
        total=n, desc=f"{bits}-bit scale search", unit="row", disable=None if n > PROGRESS_ROWS else True
    ) as bar:
        for start in range(0, n, ROWS_PER_CHUNK):
            stop = min(n, start + ROWS_PER_CHUNK)
            codes[start:stop], scales[start:stop], zero[start:stop] = _search_chunk(
                w_all[start:stop], h, 1 << bits
            )
            bar.update(stop - start)
    return pack_codes(codes, bits), scales, zero
