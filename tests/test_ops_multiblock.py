"""Multi-block SparseBinaryMatMul (op version 3): one node, several packed weights with the same K, outputs
concatenated on the last axis; built by pbs2p_edge.format.op_node_spec and run through onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_ops_ort import ALL_KERNELS, force_kernel, rel_err, session
from tolerances import OP_VS_KERNEL_REFERENCE_REL, THREADS_AGREE_REL

from pbs2p_edge import ops
from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.format import PackedWeight, kernel_matmul, op_node_spec, pack, random_weight


def node_model(
    weights: list[PackedWeight],
    *,
    attrs: dict | None = None,
    inputs: list | None = None,
    weights_as_inputs: bool = False,
) -> bytes:
    spec_inputs, spec_attrs = op_node_spec(weights)
    inputs = spec_inputs if inputs is None else inputs
    names = [f"w.{name}" for name, _ in inputs]
    node = helper.make_node(
        ops.OP_TYPE, ["X", *names], ["Y"], domain=ops.OP_DOMAIN, **(spec_attrs if attrs is None else attrs)
    )
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["a", weights[0].k])]
    inits = []
    for name, (_, arr) in zip(names, inputs, strict=True):
        if weights_as_inputs:
            dims = [f"{name}.{i}" for i in range(arr.ndim)]
            graph_inputs.append(
                helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), dims)
            )
        else:
            inits.append(numpy_helper.from_array(arr, name))
    graph = helper.make_graph(
        [node], "mb", graph_inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.OP_DOMAIN, ops.OP_VERSION)]
    )
    model.ir_version = 9
    return model.SerializeToString()


def _blocks() -> list[PackedWeight]:
    # q/k/v-like: different rows, N, group sizes, salient, bias, column scales; K shared
    return [
        pack(random_weight(33, 256, 6, 8, 128, salient=1, bias=True, seed=1)),
        pack(random_weight(16, 256, 4, 8, 64, seed=2, col_scales=True)),
        pack(random_weight(70, 256, 2, 4, 48, salient=2, bias=True, seed=3, col_scales=True)),
    ]


def test_one_weight_gives_todays_node() -> None:
    p = pack(random_weight(8, 64, 6, 8, 32, seed=4))
    inputs, attrs = op_node_spec([p])
    assert [n for n, _ in inputs] == [n for n, _ in p.op_inputs()] and attrs == p.op_attributes()


@pytest.mark.parametrize("kernel", ["default", *ALL_KERNELS])
@pytest.mark.parametrize("tokens", [1, 5, 37])
def test_multi_block_node_is_the_concatenation(monkeypatch, kernel: str, tokens: int) -> None:
    force_kernel(monkeypatch, kernel)
    weights = _blocks()
    x = np.random.default_rng(tokens).normal(size=(tokens, 256)).astype(np.float32)
    (y,) = session(node_model(weights)).run(None, {"X": x})
    want = np.concatenate([kernel_matmul(x, w) for w in weights], axis=-1)
    assert y.shape == (tokens, sum(w.rows for w in weights))
    assert rel_err(y, want) <= OP_VS_KERNEL_REFERENCE_REL
    for i, w in enumerate(weights):  # each block equals the same weight run alone, bit for bit
        off = sum(v.rows for v in weights[:i])
        (alone,) = session(node_model([w])).run(None, {"X": x})
        np.testing.assert_array_equal(y[:, off : off + w.rows], alone)


def _blocks_sharing_tables() -> list[PackedWeight]:
    # a fused q/k/v or gate/up as exported: one group size, no column scales (one-token decode builds the
    # activation tables once for all blocks and runs them in one parallel loop)
    return [
        pack(random_weight(45, 256, 6, 8, 128, salient=1, bias=True, seed=6)),
        pack(random_weight(16, 256, 6, 8, 128, seed=7)),
        pack(random_weight(130, 256, 5, 8, 128, salient=2, bias=True, seed=8)),
    ]


@pytest.mark.parametrize("kernel", ["default", *ALL_KERNELS])
@pytest.mark.parametrize("threads", [1, 2])
def test_blocks_sharing_tables_equal_each_block_alone(monkeypatch, kernel: str, threads: int) -> None:
    force_kernel(monkeypatch, kernel)
    weights = _blocks_sharing_tables()
    for tokens in (1, 2):
        x = np.random.default_rng(tokens).normal(size=(tokens, 256)).astype(np.float32)
        (y,) = session(node_model(weights), threads=threads).run(None, {"X": x})
        for i, w in enumerate(weights):
            off = sum(v.rows for v in weights[:i])
            (alone,) = session(node_model([w]), threads=threads).run(None, {"X": x})
            np.testing.assert_array_equal(y[:, off : off + w.rows], alone)


def test_multi_block_threads_and_graph_inputs_agree() -> None:
    weights = _blocks()
    x = np.random.default_rng(5).normal(size=(9, 256)).astype(np.float32)
    (y1,) = session(node_model(weights), threads=1).run(None, {"X": x})
    (y2,) = session(node_model(weights), threads=2).run(None, {"X": x})
    assert rel_err(y2, y1) <= THREADS_AGREE_REL
    feeds = {"X": x, **{f"w.{name}": arr for name, arr in op_node_spec(weights)[0]}}
    (y3,) = session(node_model(weights, weights_as_inputs=True)).run(None, feeds)
    np.testing.assert_array_equal(y3, y1)


def _error(model: bytes, k: int = 256) -> str:
    with pytest.raises(Exception) as info:  # noqa: B017 - onnxruntime raises several exception types
        session(model).run(None, {"X": np.ones((1, k), np.float32)})
    return str(info.value)


def test_multi_block_errors() -> None:
    weights = _blocks()
    inputs, attrs = op_node_spec(weights)
    assert "block_rows sum to" in _error(node_model(weights, attrs={**attrs, "rows": attrs["rows"] + 1}))
    assert "needs 28 inputs" in _error(node_model(weights, attrs={**attrs, "blocks": 3}, inputs=inputs[:-1]))
    bad = dict(attrs, block_n=[6, 4, 3])
    assert "block 2: attribute n=3" in _error(node_model(weights, attrs=bad))
    assert "has 2 entries" in _error(node_model(weights, attrs=dict(attrs, block_m=[8, 8])))
    typed = list(inputs)
    typed[9 + 3] = (typed[9 + 3][0], typed[9 + 3][1].astype(np.float32))  # block 1 scales as float32
    assert "block 1 input scales has element type" in _error(node_model(weights, inputs=typed))
    assert "blocks=0" in _error(node_model(weights, attrs=dict(attrs, blocks=0)))
    with pytest.raises(Pbs2pError, match="same K"):
        op_node_spec([weights[0], pack(random_weight(8, 64, 6, 8, 32))])
    with pytest.raises(Pbs2pError, match="at least one"):
        op_node_spec([])


def test_op_versions_agree() -> None:
    from pbs2p_edge.format import OP_VERSION

    assert ops.OP_VERSION == OP_VERSION == 4
