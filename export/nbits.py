"""Block-wise 2/4/8-bit weights in ONNX Runtime's `MatMulNBits` layout.

Layout (com.microsoft MatMulNBits): for a weight W [N, K] (out, in), B uint8 [N, K/block, block*bits/8] and
scales float32 [N, K/block]; W[n, k] = (q[n, k] - z[n, k // block]) * scale[n, k // block], values `8/bits` per
byte, lowest bits first. Without a zero-point input z = 2^(bits-1) (symmetric; the 4/8-bit layers and heads,
quantized by onnxruntime's own RTN quantizer); with one (uint8, `8/bits` per byte) z is stored per block
(the 2-bit head, quantized by `export/lowbit.py`'s error-aware search).
`GatherBlockQuantized` reads the same bytes (reshaped to [N, K*bits/8]), which lets a tied embedding
share the LM head's quantized matrix.

ONNX Runtime 1.32's CPU MatMulNBits takes bits 2, 4 and 8 (3 is refused at session creation); at
accuracy_level 0 its 2-bit (and 8-bit) path dequantizes the whole matrix to fp32 on every call, so a 2-bit
node is only worth its bytes at accuracy_level 4 (int8 activations, quantized per block: `int8_activations`
reproduces that rounding in PyTorch).
"""

from __future__ import annotations

from collections.abc import Callable
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
    zero: np.ndarray | None = None  # uint8 [N, K/block] per-block zero points (None: 2^(bits-1))

    def dequantize(self) -> np.ndarray:
        """float32 [N, K], exactly what ONNX Runtime computes with (checked in tests)."""
        from pbs2p_edge.export.lowbit import unpack_codes

        n, blocks, _ = self.packed.shape
        q = unpack_codes(self.packed, self.bits).reshape(n, blocks, self.block_size)
        zero = (
            np.float32(1 << (self.bits - 1))
            if self.zero is None
            else self.zero[:, :, None].astype(np.float32)
        )
        values = (q.astype(np.float32) - zero) * self.scales[:, :, None]
        return values.reshape(n, blocks * self.block_size)[:, : self.k].astype(np.float32)

    def packed_zero_points(self) -> np.ndarray | None:
        """The zero points as MatMulNBits' 4th input (uint8 [N, ceil(blocks * bits / 8)]), or None."""
        from pbs2p_edge.export.lowbit import pack_zero_points

        return None if self.zero is None else pack_zero_points(self.zero, self.bits)

    def nbytes(self) -> int:
        """Bytes a MatMulNBits node reads for this matrix per call (codes, scales, zero points)."""
        zero = self.packed_zero_points()
        return self.packed.nbytes + self.scales.nbytes + (0 if zero is None else zero.nbytes)


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


def quantize_rows_searched(
    weight: np.ndarray, bits: int, block_size: int, importance: np.ndarray | None = None
) -> BlockQuantized:
    """Quantize W [N, K] along K with per-block zero points and an error-aware scale search (lowbit.py)."""
    from pbs2p_edge.export.lowbit import search_quantize

    packed, scales, zero = search_quantize(weight, bits, block_size, importance)
    return BlockQuantized(
        packed=packed, scales=scales, bits=bits, block_size=block_size, k=weight.shape[1], zero=zero
    )


def int8_activations(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x rounded as MatMulNBits at accuracy_level 4 rounds it: int8 per block of K, scale max|x| / 127.

    A ragged last block is rounded on its own (as if zero-padded, which leaves its max unchanged)."""
    shape = x.shape
    width = shape[-1]
    padded = -(-width // block_size) * block_size
    flat = x if padded == width else nn.functional.pad(x, (0, padded - width))
    blocks = flat.reshape(*shape[:-1], padded // block_size, block_size)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    reciprocal = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    rounded = (torch.round(blocks * reciprocal) * scale).reshape(*shape[:-1], padded)
    return rounded[..., :width]


def matmul_nbits(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    q: BlockQuantized,
    accuracy_level: int,
    zero_points: torch.Tensor | None = None,
    layers: dict[str, int] | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Emit one com.microsoft MatMulNBits node (export mode only). `layers` (decoder layer name -> rows, in
    output order) names the layers the node computes, for validation's teacher forcing (export/forcing.py);
    `bias` is the node's own bias input (input 5; no g_idx)."""
    n = packed.shape[0]
    attributes = {"K": q.k, "N": n, "bits": q.bits, "block_size": q.block_size}
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    inputs = [x, packed, scales] if zero_points is None else [x, packed, scales, zero_points]
    if bias is not None:
        inputs = [*inputs, *[None] * (5 - len(inputs)), bias]
    return torch.onnx.ops.symbolic(
        "com.microsoft::MatMulNBits",
        inputs,
        attributes,
        dtype=x.dtype,
        shape=(*x.shape[:-1], n),
        version=1,
        metadata_props=nbits_layers_metadata(layers) if layers else None,
    )


# A body MatMulNBits node names its decoder layers and their rows in these metadata entries (comma-separated,
# output order), so validation forces its output as it forces the custom nodes'.
NBITS_LAYERS_KEY = "pbs2p_edge.nbits_layers"
NBITS_ROWS_KEY = "pbs2p_edge.nbits_rows"


def nbits_layers_metadata(layers: dict[str, int]) -> dict[str, str]:
    return {NBITS_LAYERS_KEY: ",".join(layers), NBITS_ROWS_KEY: ",".join(str(r) for r in layers.values())}


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
        # A decoder layer's name (set by the fused graph), emitted so that validation can force this node.
        self.layer_name: str | None = None
        # Set by validation (export/forcing.py): the output to return instead of computing one.
        self.replace_output: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.emit_onnx:
            if self.replace_output is not None:
                return self.replace_output(x)
            return self._kernel_forward(x)
        # Only a node without a separate bias Add outputs the layer's whole result: only that one is named.
        named = self.layer_name is not None and self.bias is None
        layers = {self.layer_name: self.out_features} if named else None
        y = matmul_nbits(
            x, self.weight_q, self.weight_scales, self.quantized, self.accuracy_level, layers=layers
        )
        return y if self.bias is None else y + self.bias

    @property
    def out_features(self) -> int:
        return int(self.quantized.packed.shape[0])

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What MatMulNBits computes: the dequantized weight, on int8-rounded inputs at accuracy_level 4."""
        if self.accuracy_level == 4:
            x = int8_activations(x, self.quantized.block_size)
        return nn.functional.linear(x, torch.from_numpy(self.quantized.dequantize()), self.bias)
