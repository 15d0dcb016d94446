"""Baseline formats exported from the original fp32 model, for side-by-side runs with the PBS2P bundle.

- `fp32`: every projection a plain MatMul on fp32 weights (the reference size and speed), stored transposed
  ([in, out], what MatMul reads) in place of the model's [out, in] weight, so no second copy exists;
- `int4`: every projection ONNX Runtime's `MatMulNBits`, 4-bit symmetric blocks of 32 made by onnxruntime's
  own quantizer (the usual int4 CPU deployment).
Both use the same decoder graph, inputs, outputs and head choices as the PBS2P bundle.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pbs2p_edge.export.configs import ATTENTION_PROJECTIONS, MLP_PROJECTIONS
from pbs2p_edge.export.nbits import NBitsLinear
from pbs2p_edge.export.patch import EmittingModule, Factory

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


class FloatLinear(EmittingModule):
    """`x @ weight_t (+ bias)` with weight_t = W.T held contiguous: the graph's MatMul reads it as it is.

    Left to the exporter, a linear becomes MatMul over a transposed copy its constant folding makes of W, and
    both copies live until the graph is written (twice the model's weights in memory). Here each weight is
    transposed once when the module is made, and the linear's own weight is released (`release`).
    """

    def __init__(self, linear: nn.Linear, release: bool = False) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.register_buffer("weight_t", linear.weight.detach().T.contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        if release:
            linear.to("meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


def fp32_factory(release: bool = False, store: Any = None) -> Factory:
    """Every projection -> FloatLinear. `release`: free each linear's [out, in] weight once transposed;
    `store`: a projection still on the meta device is read from it first (as for int4)."""

    def make(name: str, linear: nn.Linear) -> nn.Module | None:
        if not is_projection(name):
            return None
        if store is not None and linear.weight.is_meta:
            store.materialize(linear, f"{name}.")
        return FloatLinear(linear, release=release)

    return make


def release_weights(*modules: nn.Module) -> None:
    """Put every parameter and buffer of `modules` (and their submodules) on the meta device, in place, so
    their memory is freed once nothing else holds it (the exported graph has them; validation is done with
    PyTorch)."""
    for root in modules:
        for module in root.modules():
            for table in (module._parameters, module._buffers):
                for key, tensor in table.items():
                    if tensor is None or tensor.is_meta:
                        continue
                    meta = torch.empty_like(tensor, device="meta")
                    table[key] = (
                        nn.Parameter(meta, requires_grad=False) if key in module._parameters else meta
                    )
            for key, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor) and not value.is_meta and not key.startswith("_"):
                    setattr(module, key, torch.empty_like(value, device="meta"))
