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

V1_FIXTURE = REPO / "tests/data/packed_v1_9x96.npz"

SHAPES = [
    # rows, k, n, m, group_size, salient, bias, col_scales
    (1, 8, 6, 8, 128, 0, False, False),
    (33, 200, 5, 8, 48, 2, True, False),
    (64, 576, 4, 8, 128, 0, False, False),
    (31, 64, 2, 4, 64, 1, True, False),
    (70, 640, 9, 16, 160, 3, False, False),
    (1, 8, 6, 8, 128, 0, False, True),
    (33, 200, 5, 8, 48, 2, True, True),
    (70, 640, 9, 16, 160, 3, False, True),
]


@pytest.mark.parametrize("rows,k,n,m,gs,salient,bias,col_scales", SHAPES)
def test_pack_unpack_is_bit_exact(rows, k, n, m, gs, salient, bias, col_scales):
    w = random_weight(rows, k, n, m, gs, salient=salient, bias=bias, seed=rows, col_scales=col_scales)
    p = pack(w)
    assert list(p.arrays) == list(ARRAY_ORDER)
    assert p.version == fmt.VERSION == 2 and p.has_col_scales == col_scales
    assert p.arrays["col_scales"].shape == ((k,) if col_scales else (0,))
    u = unpack(p)
    assert np.abs(u.dense() - w.dense()).max(initial=0.0) <= DENSE_ROUNDTRIP_MAX_ABS
    assert (u.col_scales is None) == (not col_scales)
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


def test_col_scales_scale_the_columns_of_dense():
    w = random_weight(12, 96, 6, 8, 32, salient=1, bias=True, seed=2)
    plain = w.dense()
    w.col_scales = np.exp2(np.random.default_rng(1).uniform(-2, 2, 96)).astype(np.float32)
    c16 = w.col_scales.astype(np.float16).astype(np.float32)
    assert np.array_equal(w.dense(), plain * c16[None, :])  # c rounded to fp16, one float32 product
    p = pack(w)
    assert np.array_equal(p.arrays["col_scales"], w.col_scales.astype(np.float16))
    assert p.header[fmt.HDR_FLAGS] & fmt.FLAG_COL_SCALES
    x = np.random.default_rng(3).normal(size=(4, 96)).astype(np.float32)
    exact = reference_matmul(x, p)
    want = x.astype(np.float64) @ (plain * c16[None, :]).astype(np.float64).T + w.bias
    np.testing.assert_allclose(exact, want.astype(np.float32), rtol=1e-6, atol=1e-6)
    w.col_scales = np.ones(95, np.float32)
    with pytest.raises(Pbs2pError, match="col_scales has shape"):
        pack(w)
    w.col_scales = np.full(96, 1e6, np.float32)
    with pytest.raises(Pbs2pError, match="col_scales has values"):
        pack(w)


def test_kernel_arithmetic_scales_activations_before_quantizing():
    w = random_weight(40, 256, 6, 8, 64, salient=2, bias=True, seed=8, col_scales=True)
    p = pack(w)
    x = np.random.default_rng(4).normal(size=(3, 256)).astype(np.float32)
    # kernel_matmul(x, W with c) is exactly kernel_matmul(x * c, W without c)
    w_plain = unpack(p)
    c = w_plain.col_scales
    w_plain.col_scales = None
    assert np.array_equal(kernel_matmul(x, p), kernel_matmul(x * c[None, :], pack(w_plain)))
    exact, approx = reference_matmul(x, p), kernel_matmul(x, p)
    nmse = float(((approx - exact) ** 2).sum() / (exact**2).sum())
    assert 0.0 < nmse <= KERNEL_VS_EXACT_NMSE


def test_version_1_arrays_from_the_old_packer_still_read():
    """tests/data/packed_v1_9x96.npz was written by the version 1 packer (`git show e24bdaa:pbs2p_edge/format/
    packed.py`, random_weight(9, 96, 5, 8, 40, salient=2, bias=True, seed=7)): 8 arrays, no col_scales key."""
    data = dict(np.load(V1_FIXTURE))
    w_dense = data.pop("w_dense")
    assert "col_scales" not in data and int(data["header"][fmt.HDR_VERSION]) == 1
    p = PackedWeight.from_arrays(data)
    assert p.version == 1 and not p.has_col_scales and p.arrays["col_scales"].shape == (0,)
    assert np.array_equal(unpack(p).dense(), w_dense)
    assert p.op_attributes()["has_col_scales"] == 0 and [n for n, _ in p.op_inputs()] == list(ARRAY_ORDER)
    x = np.random.default_rng(0).normal(size=(2, 96)).astype(np.float32)
    np.testing.assert_allclose(reference_matmul(x, p), x @ w_dense.T + data["bias"], rtol=1e-5, atol=1e-5)
    # an empty col_scales array is as good as an absent key; a version 1 header with the flag is refused
    assert PackedWeight.from_arrays({**data, "col_scales": np.zeros(0, np.float16)}).version == 1
    header = data["header"].copy()
    header[fmt.HDR_FLAGS] |= fmt.FLAG_COL_SCALES
    with pytest.raises(Pbs2pError, match="unknown to format version 1"):
        PackedWeight.from_arrays({**data, "header": header, "col_scales": np.ones(96, np.float16)})
    # re-packing a version 1 weight writes version 2 with the same bytes otherwise
    again = pack(unpack(p))
    assert again.version == 2
    for name in fmt.ARRAY_ORDER_V1[1:]:
        assert np.array_equal(again.arrays[name], data[name]), name


def test_other_versions_are_refused_with_one_message():
    p = pack(random_weight(8, 64, 6, 8, 32))
    for version in (0, 3, -1, 2**31 - 1):
        header = p.arrays["header"].copy()
        header[fmt.HDR_VERSION] = version
        with pytest.raises(Pbs2pError, match=rf"^unsupported packed format version {version} "):
            PackedWeight.from_arrays({**p.arrays, "header": header})


def test_bits_per_weight_counts_everything():
    for n, expected in ((6, 2.0), (5, 1.875), (4, 1.75)):
        p = pack(random_weight(256, 4096, n, 8, 128))
        header_bits = 64 * 8 / (256 * 4096)
        assert p.bits_per_weight == pytest.approx(expected + header_bits)
        assert p.nbytes == sum(a.nbytes for a in p.arrays.values())
        assert p.bits_breakdown()["paper_style_signs_only"] == n / 8
        assert p.bits_breakdown()["runtime_layout"] == pytest.approx(2.25)
        assert p.bits_breakdown()["col_scales"] == 0.0
    p = pack(random_weight(256, 4096, 6, 8, 128, col_scales=True))
    assert p.bits_breakdown()["col_scales"] == pytest.approx(16 / 256)  # fp16 per column = 16 / rows bpw
    assert p.bits_per_weight == pytest.approx(2.0 + 16 / 256 + 64 * 8 / (256 * 4096))


def test_information_floor_replaces_the_mask_by_its_entropy():
    header_bits = 64 * 8 / (256 * 4096)
    # log2 C(8, 6) = log2 28 bits per 8 weights, against the layout's 8: at 6:8 the floor is 0.399 bpw lower
    p = pack(random_weight(256, 4096, 6, 8, 128))
    assert fmt.information_floor_bits(p) == pytest.approx(np.log2(28) / 8 + 0.75 + 0.25 + header_bits)
    assert p.bits_breakdown()["information_floor"] == fmt.information_floor_bits(p)
    # a salient column per group is stored as it is (S sign bits + fp16 alpha2 per row and group, 32-bit index)
    s1 = pack(random_weight(256, 4096, 6, 8, 128, salient=1))
    assert fmt.information_floor_bits(s1) - fmt.information_floor_bits(p) == pytest.approx(
        s1.bits_per_weight - p.bits_per_weight
    )
    # 2:4 keeps log2 6 bits of pattern per 4 weights
    q = pack(random_weight(256, 4096, 2, 4, 128))
    assert fmt.information_floor_bits(q) == pytest.approx(np.log2(6) / 4 + 0.5 + 0.25 + header_bits)
    # the bound behind issue 12's GEMV goal: MatMulNBits 4-bit reads 5.0 bpw, so 3x is out of reach at S = 1
    assert 2.87 < 5.0 / fmt.information_floor_bits(s1) < 2.89


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
    assert const("kFlagColScales") == fmt.FLAG_COL_SCALES
    assert (const("kMinVersion"), const("kVersion")) == (min(fmt.READ_VERSIONS), max(fmt.READ_VERSIONS))
    assert const("kTileRows") == fmt.TILE_ROWS
    assert const("kChunkCols") == fmt.CHUNK_COLS
    assert const("kActMax") == fmt.ACT_MAX
    for name, index in (("kHdrN", fmt.HDR_N), ("kHdrK", fmt.HDR_K), ("kHdrGroups", fmt.HDR_GROUPS)):
        assert const(name) == index


def test_format_and_ops_import_without_torch():
    code = "import sys; sys.modules['torch'] = None; import pbs2p_edge.format, pbs2p_edge.ops; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
