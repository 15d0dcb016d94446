"""bench/kernels.py's pure parts: the bytes ceilings of a pbs2p row against a baseline, and their table cells."""

from __future__ import annotations

import pytest
from cli_helpers import load_bench_script

from pbs2p_edge.format import information_floor_bits, pack, random_weight, runtime_bits_per_weight


@pytest.fixture(scope="module")
def kernels():
    return load_bench_script("kernels")


def test_ceilings_are_bytes_ratios(kernels) -> None:
    p = pack(random_weight(4096, 512, 6, 8, 128, salient=1, seed=3))
    info = {"read_bpw": runtime_bits_per_weight(p), "floor_bpw": information_floor_bits(p)}
    layout, floor = kernels.ceilings(5.0, info)  # MatMulNBits 4-bit, block 32, fp32 scales
    assert layout == pytest.approx(5.0 / 2.4375, rel=1e-3)  # the tile copy: 2-bit codes, scales, salient
    assert floor == pytest.approx(5.0 / information_floor_bits(p))
    assert layout < floor < 3.0  # issue 12's GEMV goal is above what any layout of these values allows


def test_row_cells(kernels) -> None:
    row = {"speedup_vs_nbits4": 1.84, "spread_vs_nbits4": [1.45, 2.47], "ceiling_vs_nbits4": [2.05, 2.88]}
    assert kernels._versus(row, "nbits4") == "1.84x [1.45-2.47] | 2.05x / 2.88x"
    assert kernels._versus({}, "nbits4") == " | "  # the baseline's own row
    old = {k: v for k, v in row.items() if not k.startswith("ceiling")}  # results from before the column
    assert kernels._versus(old, "nbits4") == "1.84x [1.45-2.47] | "
