"""The op's epilogue (attribute `activation`, op version 4): swiglu turns the [T, 2F] matmul output of a
gate|up node into silu(gate) * up [T, F], bit for bit as `pbs2p_edge.format.swiglu` computes it, on every kernel
path; graphs without the attribute (every bundle exported before) are unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_ops_multiblock import node_model
from test_ops_ort import ALL_KERNELS, force_kernel, rel_err, session
from tolerances import OP_VS_KERNEL_REFERENCE_REL

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.format import (
    PackedWeight,
    apply_activation,
    kernel_matmul,
    op_node_spec,
    pack,
    random_weight,
    swiglu,
)

K = 192


def _gate_up(f: int) -> list[PackedWeight]:
    """A gate and an up weight of F rows each (different formats, as a bit budget may give them)."""
    return [
        pack(random_weight(f, K, 6, 8, 64, salient=1, bias=True, seed=f)),
        pack(random_weight(f, K, 4, 8, 48, seed=f + 1, col_scales=True)),
    ]


def _swiglu_model(weights: list[PackedWeight], activation: object = "swiglu") -> bytes:
    _, attrs = op_node_spec(weights)
    return node_model(weights, attrs={**attrs, "activation": activation})


def _run(model: bytes, x: np.ndarray, threads: int = 1) -> np.ndarray:
    return session(model, threads).run(None, {"X": x})[0]


@pytest.mark.parametrize("kernel", ["default", *ALL_KERNELS])
@pytest.mark.parametrize("f,tokens", [(1, 1), (37, 1), (37, 3), (70, 16), (37, 17), (64, 70)])
def test_swiglu_node_is_the_twin_of_its_matmul(monkeypatch, kernel: str, f: int, tokens: int) -> None:
    """Odd F, one token (decode, inline epilogue) to several work items (prefill, parallel epilogue)."""
    force_kernel(monkeypatch, kernel)
    weights = _gate_up(f)
    x = np.random.default_rng(tokens).normal(size=(tokens, K)).astype(np.float32)
    x[0] *= 300.0  # large gate values: the exp clamp and silu's linear tail
    plain = _run(node_model(weights), x)
    fused = _run(_swiglu_model(weights), x)
    assert fused.shape == (tokens, f)
    np.testing.assert_array_equal(fused, swiglu(plain))  # the epilogue itself: bit for bit
    want = swiglu(np.concatenate([kernel_matmul(x, w) for w in weights], axis=-1))
    assert rel_err(fused, want) <= OP_VS_KERNEL_REFERENCE_REL


def test_swiglu_threads_nan_and_one_block() -> None:
    weights = _gate_up(40)
    x = np.random.default_rng(9).normal(size=(42, K)).astype(np.float32)
    x[24, 5] = np.nan  # that token's outputs are NaN, the others finite
    one = _run(_swiglu_model(weights), x, threads=1)
    two = _run(_swiglu_model(weights), x, threads=2)
    assert one.shape == (42, 40)
    np.testing.assert_array_equal(two, swiglu(_run(node_model(weights), x, threads=2)))
    assert rel_err(np.nan_to_num(two), np.nan_to_num(one)) <= OP_VS_KERNEL_REFERENCE_REL
    assert np.isnan(one[24]).all() and np.isfinite(np.delete(one, 24, axis=0)).all()
    both = pack(random_weight(2 * 9, K, 6, 8, 64, seed=3))  # one block of 2F rows is a gate|up node too
    single = _run(_swiglu_model([both]), x[:5])
    np.testing.assert_array_equal(single, swiglu(_run(node_model([both]), x[:5])))


def test_activation_none_and_absent_are_todays_node() -> None:
    weights = _gate_up(12)
    x = np.random.default_rng(2).normal(size=(5, K)).astype(np.float32)
    np.testing.assert_array_equal(_run(_swiglu_model(weights, "none"), x), _run(node_model(weights), x))
    assert session(_swiglu_model(weights)).get_outputs()[0].shape == ["a", 12]  # shape inference: F
    assert session(node_model(weights)).get_outputs()[0].shape == ["a", 24]


def _error(model: bytes) -> str:
    with pytest.raises(Exception) as info:  # noqa: B017 - onnxruntime raises several exception types
        session(model).run(None, {"X": np.ones((1, K), np.float32)})
    return str(info.value)


def test_activation_errors() -> None:
    weights = _gate_up(12)
    assert "activation='gelu' is not supported (expected 'none' or 'swiglu')" in _error(
        _swiglu_model(weights, "gelu")
    )
    assert "attribute activation must be a string" in _error(_swiglu_model(weights, 1))
    odd = [pack(random_weight(7, K, 6, 8, 64, seed=1))]
    assert "activation='swiglu' needs an even row count" in _error(_swiglu_model(odd))
    assert "rows=7" in _error(_swiglu_model(odd))


def test_numpy_twin() -> None:
    y = np.array([[0.0, 1.0, 100.0, -100.0, np.nan, 2.0, 3.0, 1.0, 1.0, 1.0]], np.float32)
    out = swiglu(y)
    assert out.shape == (1, 5) and out.dtype == np.float32
    assert out[0, 0] == 0.0 and out[0, 2] == 100.0 and abs(out[0, 3]) < 1e-30 and np.isnan(out[0, 4])
    g = np.linspace(-30, 30, 2001, dtype=np.float32)
    silu = g.astype(np.float64) / (1.0 + np.exp(-g.astype(np.float64)))
    np.testing.assert_allclose(
        swiglu(np.concatenate([g, np.ones_like(g)]))[: g.size], silu, rtol=4e-7, atol=1e-30
    )
    np.testing.assert_array_equal(apply_activation(y, "none"), y)
    with pytest.raises(Pbs2pError, match="even last dimension"):
        swiglu(np.ones((2, 3), np.float32))
    with pytest.raises(Pbs2pError, match="unknown activation"):
        apply_activation(y, "relu")


def test_native_kernel_test_hashes_the_twin() -> None:
    """custom_ops/tests/kernel_tests.cpp checks the C++ epilogue's bits (native and aarch64 under qemu) against
    a hash of this twin's output on the same fixed inputs; the hash is recomputed here from the twin."""
    f, i = 509, np.arange(3 * 509, dtype=np.int64)
    g = ((i * 7919) % 4001 - 2000).astype(np.float32) / np.float32(16)
    u = ((i * 104729) % 2001 - 1000).astype(np.float32) / np.float32(64)
    specials = [0, -0.0, np.nan, np.inf, -np.inf, 87, -87, 88, -88, 1e-30, -1e-38, 3e38]
    g[:12] = np.array(specials, dtype=np.float32)
    with np.errstate(all="ignore"):
        out = swiglu(np.concatenate([g.reshape(3, f), u.reshape(3, f)], axis=1)).reshape(-1)
    bits = out.view(np.uint32).copy()
    bits[np.isnan(out)] = 0x7FC00000
    h = 0xCBF29CE484222325
    for b in bits.tolist():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    source = (Path(__file__).parents[1] / "custom_ops/tests/kernel_tests.cpp").read_text()
    assert f"h == {h:#x}ull" in source
