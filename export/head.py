"""The token embedding and the LM head, stored as fp32 or compactly as 8/4-bit blocks.

PBS2P binarizes only the decoder's projections; in SmolLM2-135M the tied embedding/head matrix (49152 x 576)
is a fifth of the parameters and, read once per decoded token, most of the decode bytes. Choices:
- `fp32`: Gather + Gemm(transB) over one shared float matrix (tied models keep a single copy);
- `int8` / `int4`: the head is ONNX Runtime's `MatMulNBits` (quantized by onnxruntime's own quantizer), and a
  tied embedding is a `GatherBlockQuantized` over the same quantized bytes, so the matrix is stored once.
- `int4s`: a 4-bit head like `int4` but with per-block zero points, blocks of up to 128 (the largest power of two
  dividing K: 64 for SmolLM2's 576, 128 for Qwen2.5-1.5B's 1536; 4.56 / 4.28 bits per weight against 5.0) and the
  error-aware search below; the embedding keeps its own int4 copy, as for `int2`.
- `int2`: the head is a 2-bit `MatMulNBits` with per-block zero points, blocks of 64 where K allows (2.53 bits
  per weight with the fp32 scales, against 5.0 for `int4` at block 32), quantized by `export/lowbit.py`'s
  error-aware search weighted by the final norm's gain. It always runs at accuracy_level 4 (ORT's 2-bit fp32
  path dequantizes the whole matrix per call); the PyTorch reference rounds the head's input the same way
  (`reference_input`). The embedding stays an int4 `GatherBlockQuantized`: a token reads one row, so a narrower
  embedding saves no per-token bytes; a tied model therefore stores the matrix twice (int4 for the gather,
  2-bit for the head), which costs disk bytes, not bytes read per token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.export.nbits import (
    BlockQuantized,
    int8_activations,
    matmul_nbits,
    quantize_rows,
    quantize_rows_searched,
)
from pbs2p_edge.export.patch import EmittingModule

HEAD_CHOICES = ("fp32", "int8", "int4", "int4s", "int2")
HEAD_BITS = {"int8": 8, "int4": 4, "int2": 2, "int4s": 4}
# Narrow heads keep an int4 embedding for the gather (GatherBlockQuantized, one row per token).
EMBED_BITS = {"int8": 8, "int4": 4, "int2": 4, "int4s": 4}
# Searched heads (zero points, lowbit.py) and their largest block (the largest power of two dividing K, <= it).
SEARCHED = {"int2": 64, "int4s": 128}
# MatMulNBits' int8-activation path: forced where its fp32 path would decode the matrix per call.
FORCED_ACCURACY = {"int2": 4}


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

    def reference_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's input as the graph's head node sees it (fp32: unchanged)."""
        return hidden


class QuantizedHead(EmittingModule):
    """Embedding as GatherBlockQuantized, head as MatMulNBits; `head_q` may be given pre-quantized (int2).

    The tied embedding shares the head's bytes when both have the same width (`embed_bits is None`);
    otherwise it gets its own `embed_bits` copy.
    """

    def __init__(
        self,
        embed_weight: torch.Tensor,
        head_weight: torch.Tensor | None,
        bits: int,
        block_size: int,
        accuracy_level: int,
        head_q: BlockQuantized | None = None,
        embed_bits: int | None = None,
    ) -> None:
        super().__init__()
        self.tied = head_weight is None and embed_bits is None
        self.accuracy_level = accuracy_level
        source = embed_weight if head_weight is None else head_weight
        self.head_q = head_q or quantize_rows(source.detach().float().numpy(), bits, block_size)
        self.register_buffer("head_weight_q", torch.from_numpy(self.head_q.packed))
        self.register_buffer("head_weight_scales", torch.from_numpy(self.head_q.scales))
        zero = self.head_q.packed_zero_points()
        self.head_weight_zero = None if zero is None else nn.Buffer(torch.from_numpy(zero))
        self.head_eager = torch.from_numpy(self.head_q.dequantize())
        if self.tied:
            self.embed_q: BlockQuantized = self.head_q
            self.embed_eager = self.head_eager
        else:
            self.embed_q = quantize_rows(
                embed_weight.detach().float().numpy(),
                embed_bits or bits,
                pick_block_size(embed_weight.shape[1]),
            )
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
            return nn.functional.linear(self.reference_input(hidden), self.head_eager)
        return matmul_nbits(
            hidden,
            self.head_weight_q,
            self.head_weight_scales,
            self.head_q,
            self.accuracy_level,
            self.head_weight_zero,
        )

    def reference_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_eager, self.head_eager

    def reference_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's input as MatMulNBits uses it: int8-rounded per block at accuracy_level 4."""
        if self.accuracy_level == 4:
            return int8_activations(hidden, self.head_q.block_size)
        return hidden


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
    width = int(embed.shape[1])
    if choice not in SEARCHED:
        return QuantizedHead(
            embed, None if tied else head, HEAD_BITS[choice], pick_block_size(width), accuracy_level
        )
    bits, block = HEAD_BITS[choice], pick_block_size(width, preferred=SEARCHED[choice])
    head_q = quantize_rows_searched(head.detach().float().numpy(), bits, block, head_importance(hf_model))
    return QuantizedHead(
        embed,
        None if tied else head,
        bits,
        block,
        FORCED_ACCURACY.get(choice, accuracy_level),
        head_q=head_q,
        embed_bits=EMBED_BITS[choice],
    )


def head_importance(hf_model: nn.Module) -> np.ndarray | None:
    """Squared gain of the final norm (the head's input is normalized * gain), or None if not found.

    Gemma's RMSNorm multiplies by (1 + weight); every other supported family by weight.
    """
    base = getattr(hf_model, getattr(hf_model, "base_model_prefix", "model"), None)
    norm = getattr(base, "norm", None)
    weight = getattr(norm, "weight", None)
    width = hf_model.get_output_embeddings().weight.shape[1]
    if weight is None or tuple(weight.shape) != (width,):
        return None
    gain = weight.detach().float().numpy().astype(np.float64)
    if type(norm).__name__.startswith("Gemma"):
        gain = 1.0 + gain
    importance = gain**2
    if not np.all(np.isfinite(importance)) or importance.sum() <= 0:
        return None
    return importance.astype(np.float32)


def head_read_bytes(model_path: Path) -> dict[str, int]:
    """Bytes of the embedding and head that one decoded token reads, from an exported graph's initializers.

    `head`: every `head.*` initializer the logits matmul reads (the whole matrix, scales, zero points);
    `embedding_row`: one row of the gathered matrix (its bytes over its rows); `total`: their sum.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    sizes, rows = {}, {}
    for tensor in model.graph.initializer:
        length = next((int(e.value) for e in tensor.external_data if e.key == "length"), len(tensor.raw_data))
        sizes[tensor.name], rows[tensor.name] = length, int(tensor.dims[0]) if tensor.dims else 1
    # The tied quantized embedding gathers from a Reshape of the head's initializer.
    alias = {
        n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Reshape" and n.input[0] in sizes
    }
    head = embedding_row = 0
    for node in model.graph.node:
        names = [alias.get(name, name) for name in node.input]
        read = [name for name in names if name in sizes and name.startswith("head.")]
        if not read or node.op_type == "Reshape":
            continue
        if node.op_type in ("Gather", "GatherBlockQuantized"):
            embedding_row += sum(sizes[name] for name in read) // max(1, rows[names[0]])
        else:
            head += sum(sizes[name] for name in read)
    return {"head": head, "embedding_row": embedding_row, "total": head + embedding_row}


def predicted_read_bytes(choice: str, vocab: int, width: int) -> dict[str, int]:
    """What `head_read_bytes` measures on a bundle with this head, from the shapes alone (tests check both agree).

    Untied models read the same per token as tied ones (the embedding is one row either way); only disk differs.
    """
    if choice not in HEAD_CHOICES:
        raise Pbs2pError(f"unknown head format {choice!r} (choose from {', '.join(HEAD_CHOICES)})")
    if choice == "fp32":
        return {"head": vocab * width * 4, "embedding_row": width * 4, "total": vocab * width * 4 + width * 4}

    def row_bytes(bits: int, block: int, zero_points: bool) -> int:
        blocks = width // block
        return width * bits // 8 + 4 * blocks + (-(-blocks * bits // 8) if zero_points else 0)

    bits = HEAD_BITS[choice]
    head_block = pick_block_size(width, preferred=SEARCHED.get(choice, 32))
    head = vocab * row_bytes(bits, head_block, choice in SEARCHED)
    embedding_row = row_bytes(EMBED_BITS[choice], pick_block_size(width), False)
    return {"head": head, "embedding_row": embedding_row, "total": head + embedding_row}
