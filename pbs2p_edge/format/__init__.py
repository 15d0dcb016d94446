"""Packed sparse-binary weight format (numpy only): see docs/FORMAT.md."""

from pbs2p_edge.format.node import OP_VERSION, op_node_spec
from pbs2p_edge.format.packed import (
    ARRAY_ORDER,
    FLAG_COL_SCALES,
    MAGIC,
    READ_VERSIONS,
    VERSION,
    PackedWeight,
    SparseBinaryWeight,
    information_floor_bits,
    pack,
    runtime_bits_per_weight,
    unpack,
)
from pbs2p_edge.format.random import random_weight
from pbs2p_edge.format.reference import ACTIVATIONS, apply_activation, kernel_matmul, reference_matmul, swiglu

__all__ = [
    "ACTIVATIONS",
    "ARRAY_ORDER",
    "FLAG_COL_SCALES",
    "MAGIC",
    "OP_VERSION",
    "READ_VERSIONS",
    "VERSION",
    "apply_activation",
    "PackedWeight",
    "SparseBinaryWeight",
    "information_floor_bits",
    "kernel_matmul",
    "op_node_spec",
    "pack",
    "random_weight",
    "reference_matmul",
    "runtime_bits_per_weight",
    "swiglu",
    "unpack",
]
