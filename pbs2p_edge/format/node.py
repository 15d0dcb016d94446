"""The inputs and attributes of one SparseBinaryMatMul node carrying one or more packed weights (docs/FORMAT.md 5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.format.packed import PackedWeight

# Domain opset version of SparseBinaryMatMul graphs (= pbs2p_edge.ops.OP_VERSION, the library's op_version).
# 3: multi-block nodes (attribute `blocks`); one-block nodes are unchanged since version 2. 4: attribute
# `activation` (the swiglu epilogue; absent = "none", so graphs of versions 1-3 run unchanged).
OP_VERSION = 4
MAX_BLOCKS = 64  # the op refuses more (kMaxBlocks in custom_ops/ort/sparse_binary_matmul.cpp)
BLOCK_ATTRIBUTES = ("n", "m", "group_size", "rows", "salient", "has_bias", "has_col_scales")


def op_node_spec(weights: Sequence[PackedWeight]) -> tuple[list[tuple[str, np.ndarray]], dict[str, Any]]:
    """(initializer name suffix, array) pairs in input order after X, and the node's attributes.

    One weight gives exactly the one-block node (`PackedWeight.op_inputs()` / `op_attributes()`). Several
    weights with the same K give one node whose output is their outputs concatenated on the last axis, in
    order: inputs `b{i}.{array}` (9 arrays per block), attributes `blocks`, `rows` (the sum), `k` and one
    list per field, `block_n`, `block_m`, `block_group_size`, `block_rows`, `block_salient`, `block_has_bias`,
    `block_has_col_scales`. The graph's pbs2p.edge opset version must be at least OP_VERSION.
    """
    if len(weights) == 0:
        raise Pbs2pError("op_node_spec needs at least one packed weight")
    if len(weights) == 1:
        return weights[0].op_inputs(), dict(weights[0].op_attributes())
    if len(weights) > MAX_BLOCKS:
        raise Pbs2pError(
            f"one SparseBinaryMatMul node carries at most {MAX_BLOCKS} blocks, got {len(weights)}"
        )
    ks = {w.k for w in weights}
    if len(ks) != 1:
        raise Pbs2pError(f"blocks of one SparseBinaryMatMul node need the same K, got {sorted(ks)}")
    inputs = [(f"b{i}.{name}", array) for i, w in enumerate(weights) for name, array in w.op_inputs()]
    attrs: dict[str, Any] = {"blocks": len(weights), "rows": sum(w.rows for w in weights), "k": weights[0].k}
    for field in BLOCK_ATTRIBUTES:
        attrs[f"block_{field}"] = [int(w.op_attributes()[field]) for w in weights]
    return inputs, attrs
