"""Block-wise 4/8-bit weights in ONNX Runtime's `MatMulNBits` layout, made by onnxruntime's own quantizer.

Layout (com.microsoft MatMulNBits, symmetric, no zero-point input): for a weight W [N, K] (out, in), the
quantizer packs B uint8 [N, K/block, block*bits/8] and scales float32 [N, K/block];
W[n, k] = (q[n, k] - 2^(bits-1)) * scale[n, k // block], with 4-bit values two per byte, low nibble first.
`GatherBlockQuantized` reads the same bytes (reshaped to [N, K*bits/8]), which lets a tied embedding
share the LM head's quantized matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.export.patch import EmittingModule


@dataclass
class BlockQuantized:
    packed: np.ndarray  # uint8 [N, K/block, block*bits/8]
    scales: np.ndarray  # float32 [N, K/block]
    bits: int
    block_size: int
    k: int

    def dequantize(self) -> np.ndarray:
        """float32 [N, K], exactly what ONNX Runtime computes with (checked in tests)."""
        n, blocks, _ = self.packed.shape
        if self.bits == 4:
            q = np.stack((self.packed & 0x0F, self.packed >> 4), axis=-1).reshape(n, blocks, self.block_size)
        else:
            q = self.packed
        values = (q.astype(np.float32) - float(1 << (self.bits - 1))) * self.scales[:, :, None]
        return values.reshape(n, blocks * self.block_size)[:, : self.k].astype(np.float32)


def quantize_rows(weight: np.ndarray, bits: int, block_size: int) -> BlockQuantized:
    """Quantize W [N, K] along K with onnxruntime's MatMulNBits quantizer (symmetric, RTN)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    if bits not in (4, 8):
        raise Pbs2pError(f"unsupported quantization width {bits} bits (choose 4 or 8)")
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits)
    # The quantizer takes the MatMul's B input, i.e. W transposed to [K, N].
    packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(weight.T, dtype=np.float32)
    )
    return BlockQuantized(
        packed=packed, scales=scales.astype(np.float32), bits=bits, block_size=block_size, k=weight.shape[1]
    )


def matmul_nbits(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, q: BlockQuantized, accuracy_level: int
) -> torch.Tensor:
    """Emit one com.microsoft MatMulNBits node (export mode only)."""
    n = packed.shape[0]
    attributes = {"K": q.k, "N": n, "bits": q.bits, "block_size": q.block_size}
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    return torch.onnx.ops.symbolic(
        "com.microsoft::MatMulNBits",
        [x, packed, scales],
        attributes,
        dtype=x.dtype,
        shape=(*x.shape[:-1], n),
        version=1,
    )


class NBitsLinear(EmittingModule):
    """A linear stored as MatMulNBits: eagerly `x @ dequant(W).T + b`, one MatMulNBits (+ Add) when exported."""

    def __init__(
        self,
        linear: nn.Linear,
        bits: int,
        block_size: int,
        accuracy_level: int,
        quantized: BlockQuantized | None = None,
    ) -> None:
        super().__init__()
        if quantized is None:
            quantized = quantize_rows(linear.weight.detach().float().numpy(), bits, block_size)
        self.quantized = quantized
        self.accuracy_level = accuracy_level
        self.register_buffer("weight_q", torch.from_numpy(self.quantized.packed))
        self.register_buffer("weight_scales", torch.from_numpy(self.quantized.scales))
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )
        # Decoded per eager call (not cached): a large model would otherwise hold an fp32 copy of every layer.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.emit_onnx:
            return nn.functional.linear(x, torch.from_numpy(self.quantized.dequantize()), self.bias)
        y = matmul_nbits(x, self.weight_q, self.weight_scales, self.quantized, self.accuracy_level)
        return y if self.bias is None else y + self.bias
