"""The token embedding and the LM head, stored as fp32 or compactly as 8/4-bit blocks.

PBS2P binarizes only the decoder's projections; in SmolLM2-135M the tied embedding/head matrix (49152 x 576)
is a fifth of the parameters and, read once per decoded token, most of the decode bytes. Choices:
- `fp32`: Gather + Gemm(transB) over one shared float matrix (tied models keep a single copy);
- `int8` / `int4`: the head is ONNX Runtime's `MatMulNBits` (quantized by onnxruntime's own quantizer), and a
  tied embedding is a `GatherBlockQuantized` over the same quantized bytes, so the matrix is stored once.
"""

from __future__ import annotations

import torch
from torch import nn

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.export.nbits import BlockQuantized, matmul_nbits, quantize_rows
from pbs2p_edge.export.patch import EmittingModule

HEAD_CHOICES = ("fp32", "int8", "int4")
HEAD_BITS = {"int8": 8, "int4": 4}


def _float_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # A 2-D linear exports as Gemm(transB=1) reading the [V, H] matrix directly (no transposed copy).
    batch, seq_len, width = hidden.shape
    return nn.functional.linear(hidden.reshape(-1, width), weight).reshape(batch, seq_len, -1)


class FloatHead(nn.Module):
    def __init__(self, embed_weight: nn.Parameter, head_weight: nn.Parameter | None) -> None:
        super().__init__()
        self.embed_weight = embed_weight
        self.head_weight = head_weight  # None when tied to the embedding

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.embed_weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return _float_logits(hidden, self.embed_weight if self.head_weight is None else self.head_weight)

    def reference_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding, head) as the graph computes with them, to plug into the PyTorch reference model."""
        head = self.embed_weight if self.head_weight is None else self.head_weight
        return self.embed_weight, head


class QuantizedHead(EmittingModule):
    def __init__(
        self,
        embed_weight: torch.Tensor,
        head_weight: torch.Tensor | None,
        bits: int,
        block_size: int,
        accuracy_level: int,
    ) -> None:
        super().__init__()
        self.tied = head_weight is None
        self.accuracy_level = accuracy_level
        source = embed_weight if head_weight is None else head_weight
        self.head_q = quantize_rows(source.detach().float().numpy(), bits, block_size)
        self.register_buffer("head_weight_q", torch.from_numpy(self.head_q.packed))
        self.register_buffer("head_weight_scales", torch.from_numpy(self.head_q.scales))
        self.head_eager = torch.from_numpy(self.head_q.dequantize())
        if self.tied:
            self.embed_q: BlockQuantized = self.head_q
            self.embed_eager = self.head_eager
        else:
            self.embed_q = quantize_rows(embed_weight.detach().float().numpy(), bits, block_size)
            self.register_buffer("embed_weight_q", torch.from_numpy(self.embed_q.packed))
            self.register_buffer("embed_weight_scales", torch.from_numpy(self.embed_q.scales))
            self.embed_eager = torch.from_numpy(self.embed_q.dequantize())

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.emit_onnx:
            return nn.functional.embedding(input_ids, self.embed_eager)
        packed = self.head_weight_q if self.tied else self.embed_weight_q
        scales = self.head_weight_scales if self.tied else self.embed_weight_scales
        q = self.embed_q
        # GatherBlockQuantized wants the rows flat: [V, K*bits/8]; export/onnx_export.py makes the reshape
        # read the head's initializer instead of a folded copy.
        flat = packed.reshape(packed.shape[0], -1)
        return torch.onnx.ops.symbolic(
            "com.microsoft::GatherBlockQuantized",
            [flat, input_ids, scales],
            {"bits": q.bits, "block_size": q.block_size, "gather_axis": 0, "quantize_axis": 1},
            dtype=torch.float32,
            shape=(*input_ids.shape, q.k),
            version=1,
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.emit_onnx:
            return nn.functional.linear(hidden, self.head_eager)
        return matmul_nbits(
            hidden, self.head_weight_q, self.head_weight_scales, self.head_q, self.accuracy_level
        )

    def reference_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_eager, self.head_eager


def pick_block_size(width: int, preferred: int = 32) -> int:
    """Largest power-of-two block <= preferred (>= 16, GatherBlockQuantized's minimum) that divides width."""
    block = preferred
    while block >= 16:
        if width % block == 0:
            return block
        block //= 2
    raise Pbs2pError(f"cannot quantize the embedding: hidden size {width} is not a multiple of 16")


def make_head(hf_model: nn.Module, choice: str, accuracy_level: int = 0) -> nn.Module:
    """Build the embedding/head module for `choice` from the HF model's (possibly tied) weights."""
    if choice not in HEAD_CHOICES:
        raise Pbs2pError(f"unknown head format {choice!r} (choose from {', '.join(HEAD_CHOICES)})")
    embed = hf_model.get_input_embeddings().weight
    head = hf_model.get_output_embeddings().weight
    if getattr(hf_model.get_output_embeddings(), "bias", None) is not None:
        raise Pbs2pError("cannot export an LM head with a bias")
    tied = head is embed or (head.data_ptr() == embed.data_ptr() and head.shape == embed.shape)
    if choice == "fp32":
        return FloatHead(embed, None if tied else head)
    block = pick_block_size(int(embed.shape[1]))
    return QuantizedHead(embed, None if tied else head, HEAD_BITS[choice], block, accuracy_level)
