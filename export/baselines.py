"""Baseline formats exported from the original fp32 model, for side-by-side runs with the PBS2P bundle.

- `fp32`: every projection a plain MatMul on fp32 weights (the reference size and speed);
- `int4`: every projection ONNX Runtime's `MatMulNBits`, 4-bit symmetric blocks of 32 made by onnxruntime's
  own quantizer (the usual int4 CPU deployment).
Both use the same decoder graph, inputs, outputs and head choices as the PBS2P bundle.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pbs2p_edge.export.configs import ATTENTION_PROJECTIONS, MLP_PROJECTIONS
from pbs2p_edge.export.nbits import NBitsLinear
from pbs2p_edge.export.patch import Factory

INT4_BLOCK_SIZE = 32
_PROJECTIONS = set(ATTENTION_PROJECTIONS + MLP_PROJECTIONS)


def is_projection(name: str) -> bool:
    """True for a decoder layer's attention/MLP projection (not the LM head)."""
    return ".layers." in f".{name}" and name.rpartition(".")[2] in _PROJECTIONS


def int4_factory(
    block_size: int = INT4_BLOCK_SIZE, accuracy_level: int = 0, release: bool = False, store: Any = None
) -> Factory:
    """`release`: free each fp32 weight once quantized (the export needs only the quantized layer; a large
    model would otherwise hold the fp32 and the dequantized copy of every projection at once). `store` (a
    `lowmem.LayerStore`): a projection still on the meta device is read from it just before quantizing."""

    def make(name: str, linear: nn.Linear) -> nn.Module | None:
        if not is_projection(name):
            return None
        if store is not None and linear.weight.is_meta:
            store.materialize(linear, f"{name}.")
        module = NBitsLinear(linear, bits=4, block_size=block_size, accuracy_level=accuracy_level)
        if release:
            linear.to("meta")
        return module

    return make
