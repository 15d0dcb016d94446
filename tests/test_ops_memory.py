"""No second copy of the weights: the compact kernels read ONNX Runtime's initializers in place, while the tile
kernels (and the hybrid default, for decode) keep a repacked 2.25-bit copy besides them.

Measured on one large layer as the growth of live heap bytes (glibc mallinfo2) over creating a session and
running decode + prefill. RSS is no clean signal here: onnxruntime frees its parsed copy of the model while the
session is built, and the allocator hands those pages to the repack, so RSS grows the same either way."""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np
import pytest
from test_ops_ort import build_model, session, usable_kernels

from pbs2p_edge import ops
from pbs2p_edge.format import PackedWeight
from pbs2p_edge.format import packed as fmt

ROWS, K, GROUP = 8192, 8192, 128


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
        )
    ] + [("keepcost", ctypes.c_size_t)]


def _live_heap_bytes() -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc mallinfo2 unavailable (needs glibc >= 2.33)")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _large_weight() -> PackedWeight:
    """A valid 6:8 weight built directly (every mask byte keeps its low 6 columns): fast at 67 M weights."""
    rng = np.random.default_rng(0)
    groups = K // GROUP
    header = np.zeros(fmt.HEADER_LEN, np.int32)
    header[[fmt.HDR_MAGIC, fmt.HDR_VERSION, fmt.HDR_N, fmt.HDR_M, fmt.HDR_GROUP_SIZE]] = [
        fmt.MAGIC,
        2,
        6,
        8,
        GROUP,
    ]
    header[[fmt.HDR_ROWS, fmt.HDR_K, fmt.HDR_GROUPS]] = [ROWS, K, groups]
    arrays = {
        "header": header,
        "mask": np.full((ROWS, K // 8), 0x3F, np.uint8),
        "signs": rng.integers(0, 256, (ROWS, K * 6 // 64), dtype=np.uint8),
        "scales": np.full((ROWS, groups, 2), 0.01, np.float16),
        "salient_cols": np.zeros(0, np.int32),
        "salient_signs": np.zeros(0, np.uint8),
        "alpha2": np.zeros(0, np.float16),
        "bias": np.zeros(0, np.float32),
        "col_scales": np.zeros(0, np.float16),
    }
    return PackedWeight.from_arrays(arrays)


def _session_growth(monkeypatch, kernel: str, model: bytes) -> int:
    monkeypatch.setenv(ops.ENV_KERNEL, kernel)
    before = _live_heap_bytes()
    sess = session(model)
    sess.run(None, {"X": np.ones((1, K), np.float32)})
    sess.run(None, {"X": np.ones((8, K), np.float32)})  # prefill too: the hybrid's compact half
    grown = _live_heap_bytes() - before
    del sess
    return grown


def test_compact_kernels_keep_no_copy_of_the_weights(monkeypatch) -> None:
    usable = usable_kernels()
    compact = next((k for k in ("avx512-vnni", "sdot") if k in usable), "generic")
    tiles = [
        k
        for k in (
            "avx512-vnni+avx2",
            "avx512-vbmi-tile",
            "avx512-vnni-tile",
            "avxvnni-tile",
            "avx2",
            "sdot+neon",
            "neon",
        )
        if k in usable
    ]
    p = _large_weight()
    model = build_model(p, x_shape=["a", K])
    disk = p.nbytes
    runtime_copy = fmt.runtime_bits_per_weight(p) * ROWS * K / 8
    compact_growth = _session_growth(monkeypatch, compact, model)
    # compact: onnxruntime's own copy of the initializers and little else (no repacked layout)
    assert disk <= compact_growth < 1.25 * disk, (compact_growth, disk)
    if not tiles:
        pytest.skip(f"no tile kernel on this CPU to compare with (kernels: {usable})")
    for tile in tiles:  # tile / hybrid: the repacked layout on top
        growth = _session_growth(monkeypatch, tile, model)
        assert growth > compact_growth + 0.8 * runtime_copy, (tile, growth, compact_growth, runtime_copy)
