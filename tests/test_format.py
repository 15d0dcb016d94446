"""pbs2p_edge.format: pack/unpack round trip, validation, sizes, and agreement with custom_ops/include/pbs2p/format.h."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tolerances import DENSE_ROUNDTRIP_MAX_ABS, KERNEL_VS_EXACT_NMSE

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.format import (
    ARRAY_ORDER,
    PackedWeight,
    SparseBinaryWeight,
    kernel_matmul,
    pack,
    random_weight,
    reference_matmul,
    unpack,
)
from pbs2p_edge.format import packed as fmt
from pbs2p_edge.format.reference import chunk_bounds

REPO = Path(__file__).resolve().parents[1]

SHAPES = [
    # rows, k, n, m, group_size, salient, bias
    (1, 8, 6, 8, 128, 0, False),
    (33, 200, 5, 8, 48, 2, True),
    (64, 576, 4, 8, 128, 0, False),
    (31, 64, 2, 4, 64, 1, True),
    (70, 640, 9, 16, 160, 3, False),
]


@pytest.mark.parametrize("rows,k,n,m,gs,salient,bias", SHAPES)
def test_pack_unpack_is_bit_exact(rows, k, n, m, gs, salient, bias):
    w = random_weight(rows, k, n, m, gs, salient=salient, bias=bias, seed=rows)
    p = pack(w)
    assert list(p.arrays) == list(ARRAY_ORDER)
    u = unpack(p)
    assert np.abs(u.dense() - w.dense()).max(initial=0.0) <= DENSE_ROUNDTRIP_MAX_ABS
    assert np.array_equal(u.mask, w.mask)
    assert np.array_equal(u.signs, w.signs & w.mask)  # pruned weights' signs are not stored
    again = pack(u)
    for name in ARRAY_ORDER:
        assert again.arrays[name].dtype == p.arrays[name].dtype
        assert np.array_equal(again.arrays[name], p.arrays[name]), name
    reloaded = PackedWeight.from_arrays({k2: v.copy() for k2, v in p.arrays.items()})
    assert reloaded.op_attributes() == p.op_attributes()


def test_dense_follows_the_formula_with_fp16_scales():
    w = random_weight(5, 16, 6, 8, 8, salient=1, seed=3)
    d = w.dense()
    a16 = w.alpha.astype(np.float16).astype(np.float32)
    mu16 = w.mu.astype(np.float16).astype(np.float32)
    a2 = w.alpha2.astype(np.float16).astype(np.float32)
    for r in range(5):
        for j in range(16):
            g = j // 8
            want = (a16[r, g] if w.signs[r, j] else -a16[r, g]) + mu16[r, g]
            if j == w.salient_cols[g, 0]:
                want += a2[r, g] if w.salient_signs[r, g, 0] else -a2[r, g]
            assert d[r, j] == (np.float32(want) if w.mask[r, j] else 0.0)


def test_bits_per_weight_counts_everything():
    for n, expected in ((6, 2.0), (5, 1.875), (4, 1.75)):
        p = pack(random_weight(256, 4096, n, 8, 128))
        header_bits = 64 * 8 / (256 * 4096)
        assert p.bits_per_weight == pytest.approx(expected + header_bits)
        assert p.nbytes == sum(a.nbytes for a in p.arrays.values())
        assert p.bits_breakdown()["paper_style_signs_only"] == n / 8
        assert p.bits_breakdown()["runtime_layout"] == pytest.approx(2.25)


def test_kernel_arithmetic_is_close_to_exact():
    p = pack(random_weight(96, 1000, 4, 8, 128, salient=1, bias=True, seed=5))
    x = np.random.default_rng(0).normal(size=(7, 1000)).astype(np.float32)
    exact, approx = reference_matmul(x, p), kernel_matmul(x, p)
    nmse = float(((approx - exact) ** 2).sum() / (exact**2).sum())
    assert 0.0 < nmse <= KERNEL_VS_EXACT_NMSE


def test_chunks_never_cross_groups():
    for k, gs in ((200, 48), (640, 160), (1000, 128), (8, 128)):
        bounds = chunk_bounds(k, gs)
        assert bounds[0][0] == 0 and bounds[-1][1] == k
        for (b, e, g), nxt in zip(bounds, bounds[1:] + [(k, k, -1)], strict=True):
            assert e == nxt[0] and b // gs == g and (e - 1) // gs == g and e - b <= fmt.CHUNK_COLS


def test_bad_weights_are_refused():
    w = random_weight(4, 16, 6, 8, 8)
    w.mask[0, 0] = not w.mask[0, 0]
    with pytest.raises(Pbs2pError, match="6:8 requires 6"):
        pack(w)
    with pytest.raises(Pbs2pError, match="not a multiple of M=8"):
        pack(
            SparseBinaryWeight(
                n=2,
                m=8,
                group_size=8,
                mask=np.ones((4, 12), bool),
                signs=np.ones((4, 12), bool),
                alpha=np.ones((4, 2), np.float32),
                mu=np.zeros((4, 2), np.float32),
            )
        )
    big = random_weight(4, 16, 6, 8, 8)
    big.alpha[0, 0] = 1e6
    with pytest.raises(Pbs2pError, match="fp16"):
        pack(big)
    sal = random_weight(4, 16, 6, 8, 8, salient=1)
    sal.salient_cols[1, 0] = 2  # group 1 covers columns 8..15
    with pytest.raises(Pbs2pError, match="outside its group"):
        pack(sal)


def test_from_arrays_validates():
    p = pack(random_weight(8, 64, 6, 8, 32, bias=True))

    def mutated(**changes):
        arrays = {k: v.copy() for k, v in p.arrays.items()}
        arrays.update(changes)
        return arrays

    header = p.arrays["header"].copy()
    header[fmt.HDR_MAGIC] = 7
    with pytest.raises(Pbs2pError, match="magic"):
        PackedWeight.from_arrays(mutated(header=header))
    header = p.arrays["header"].copy()
    header[fmt.HDR_VERSION] = 99
    with pytest.raises(Pbs2pError, match="version 99"):
        PackedWeight.from_arrays(mutated(header=header))
    with pytest.raises(Pbs2pError, match="signs has shape"):
        PackedWeight.from_arrays(mutated(signs=p.arrays["signs"][:, :-1]))
    with pytest.raises(Pbs2pError, match="dtype"):
        PackedWeight.from_arrays(mutated(scales=p.arrays["scales"].astype(np.float32)))
    with pytest.raises(Pbs2pError, match="lacks arrays"):
        PackedWeight.from_arrays({"header": p.arrays["header"]})


def test_constants_match_the_cpp_header():
    text = (REPO / "custom_ops/include/pbs2p/format.h").read_text()

    def const(name: str) -> int:
        match = re.search(rf"\b{name}\s*=\s*(0x[0-9a-fA-F]+|\d+)", text)
        assert match, name
        return int(match.group(1), 0)

    assert const("kMagic") == fmt.MAGIC
    assert fmt.MAGIC.to_bytes(4, "little") == b"PB2P"
    assert const("kVersion") == fmt.VERSION
    assert const("kHeaderLen") == fmt.HEADER_LEN
    assert const("kFlagSalient") == fmt.FLAG_SALIENT and const("kFlagBias") == fmt.FLAG_BIAS
    assert const("kTileRows") == fmt.TILE_ROWS
    assert const("kChunkCols") == fmt.CHUNK_COLS
    assert const("kActMax") == fmt.ACT_MAX
    for name, index in (("kHdrN", fmt.HDR_N), ("kHdrK", fmt.HDR_K), ("kHdrGroups", fmt.HDR_GROUPS)):
        assert const(name) == index


def test_format_and_ops_import_without_torch():
    code = "import sys; sys.modules['torch'] = None; import pbs2p_edge.format, pbs2p_edge.ops; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
