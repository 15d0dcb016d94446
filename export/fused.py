"""The fused decoder graph: onnxruntime's com.microsoft contrib ops, a shared fixed-length KV buffer.

Per layer (7 nodes when gate/up are SparseBinaryMatMul layers, 11 otherwise; docs/ARCHITECTURE.md §3):

    SkipSimplifiedLayerNormalization(mlp_out of the previous layer, residual) -> x, residual
    q|k|v projection -> GroupQueryAttention(qkv, -, -, past_k, past_v, seqlens_k, total_seq_len, cos, sin)
        (do_rotary=1: the rotary embedding runs inside the attention op; past and present share one buffer)
    o projection -> SkipSimplifiedLayerNormalization(o_out, residual) -> x, residual
    gate|up projection with the swiglu epilogue (silu(gate) * up inside the node) -> down projection
        (int4 or fp32 gate|up: gate|up projection -> Split -> SiLU(gate) (Sigmoid, Mul) * up (Mul) -> down)

q/k/v and gate/up run as one node when their formats allow: one multi-block SparseBinaryMatMul
(`pbs2p_edge.format.op_node_spec`, its layers named in node metadata so validation checks each block against
its own layer; gate|up with attribute activation=swiglu, docs/FORMAT.md "Epilogue"), or one MatMulNBits over the concatenated rows of int4 layers. Otherwise (mixed formats, fp32)
each projection is the node its swapped module emits, as in the unfused graph (`export/decoder.py`).
Graph interface:

    input_ids [B, S], attention_mask [B, T] (T = past + S tokens; only its row sums and width are read),
    past_key_values.{i}.key|value [B, kv_heads, L, head_dim] (L = the buffer length, fixed by the caller),
    logits_to_keep int64 [] (optional, default 0 = logits of every position; 1 = the last position only)
    -> logits [B, S or 1, V], present.{i}.key|value [B, kv_heads, L, head_dim]

A caller that binds present.{i} to the same memory as past_key_values.{i} (onnxruntime IO binding, or
onnxruntime-genai with past_present_share_buffer) never copies the cache; with separate buffers the op copies
the valid rows of past into present first. The layout of positions is right-padded: row b's tokens occupy
slots 0 .. seqlens_k[b], which is what GroupQueryAttention computes positions from (no position_ids input).

The graph is traced from this module like the unfused one; the contrib ops are emitted with
`torch.onnx.ops.symbolic` (their eager value is never used: validation compares the graph with the HF model).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx
import torch
from torch import nn

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.export.configs import ExportConfig
from pbs2p_edge.export.decoder import Decoder, rms_norm
from pbs2p_edge.export.forcing import LAYERS_KEY
from pbs2p_edge.export.nbits import BlockQuantized, NBitsLinear, matmul_nbits
from pbs2p_edge.export.patch import PBS2P_OP, PBS2P_OP_VERSION, SparseBinaryLinear

MS = "com.microsoft"
LOGITS_TO_KEEP = "logits_to_keep"
# Tagged on the final norm's node so `finish_graph` can cut the hidden rows before the head.
ROLE_KEY = "pbs2p_edge.role"
FINAL_NORM_ROLE = "final_norm"
# The epilogue of a SparseBinaryMatMul gate|up node (docs/FORMAT.md "Epilogue"; "none" writes the graph of
# op version 3 and earlier: the node's [.., 2F] output, then Split, Sigmoid, Mul, Mul).
GATE_UP_ACTIVATION = "swiglu"


def fused_unsupported(config: ExportConfig) -> str | None:
    """Why the fused graph cannot express `config` (None when it can)."""
    family = config.family
    reasons = [
        (family.qk_norm, "per-head q/k norms"),
        (family.sandwich_norms, "sandwich norms"),
        (family.norm_offset != 0.0, "offset norms"),
        (family.embed_scale, "scaled embeddings"),
        (family.fused, "pre-fused qkv/gate_up weights"),
        (family.activation != "silu", f"the {family.activation} activation"),
        (any(w is not None for w in config.layer_windows), "local sliding-window layers"),
        (any(key != "" for key in config.layer_rope), "per-layer rotary tables or NoPE layers"),
        (config.attn_softcap is not None or config.final_softcap is not None, "logit soft-capping"),
    ]
    for present, what in reasons:
        if present:
            return what
    return None


class FusedNBits(nn.Module):
    """Several MatMulNBits linears with the same input, width and block format as one node: their rows
    concatenated (each row is quantized on its own, so this is exact), outputs in module order."""

    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__()
        first = modules[0].quantized
        self.quantized = BlockQuantized(
            packed=np.concatenate([m.quantized.packed for m in modules]),
            scales=np.concatenate([m.quantized.scales for m in modules]),
            bits=first.bits,
            block_size=first.block_size,
            k=first.k,
        )
        self.accuracy_level = modules[0].accuracy_level
        named = all(m.layer_name is not None for m in modules)
        self.layers = {m.layer_name: m.out_features for m in modules} if named else None
        self.register_buffer("weight_q", torch.from_numpy(self.quantized.packed))
        self.register_buffer("weight_scales", torch.from_numpy(self.quantized.scales))
        # The layers keep working eagerly (validation's reference) on views of the fused arrays: no second copy.
        start = 0
        for module in modules:
            stop = start + module.quantized.packed.shape[0]
            module.quantized = dataclasses.replace(
                module.quantized,
                packed=self.quantized.packed[start:stop],
                scales=self.quantized.scales[start:stop],
            )
            module.weight_q = torch.from_numpy(module.quantized.packed)
            module.weight_scales = torch.from_numpy(module.quantized.scales)
            start = stop
        biases = [m.bias for m in modules]
        bias = None
        if any(b is not None for b in biases):
            rows = [m.quantized.packed.shape[0] for m in modules]
            parts = [torch.zeros(r) if b is None else b.detach() for b, r in zip(biases, rows, strict=True)]
            bias = torch.cat(parts)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul_nbits(
            x,
            self.weight_q,
            self.weight_scales,
            self.quantized,
            self.accuracy_level,
            layers=self.layers,
            bias=self.bias,  # MatMulNBits adds it itself
        )


class FusedSparseBinary(nn.Module):
    """Several SparseBinaryMatMul layers with the same input as one multi-block node (`op_node_spec`); the node
    names its layers in metadata so validation checks each block against its own layer (export/forcing.py)."""

    def __init__(self, names: list[str], modules: list[nn.Module], activation: str = "none") -> None:
        super().__init__()
        from pbs2p_edge.format import op_node_spec

        inputs, attributes = op_node_spec([m.packed for m in modules])
        self.activation = activation
        self.rows = int(attributes["rows"])
        if activation != "none":  # the op's epilogue: [.., rows] -> [.., rows / 2] (gate rows, then up rows)
            attributes["activation"] = activation
            self.rows //= 2
        self.attributes = attributes
        self.names = names
        self.input_names = []
        for name, array in inputs:  # the packed arrays themselves (read-only ones copied), not copies
            buffer = name.replace(".", "_")
            tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
            self.register_buffer(buffer, tensor)
            self.input_names.append(buffer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.onnx.ops.symbolic(
            PBS2P_OP,
            [x, *(getattr(self, name) for name in self.input_names)],
            self.attributes,
            dtype=x.dtype,
            shape=(*x.shape[:-1], self.rows),
            version=PBS2P_OP_VERSION,
            metadata_props={LAYERS_KEY: ",".join(self.names)},
        )


def multi_block_supported() -> bool:
    """Whether this install's op takes multi-block nodes (pbs2p_edge.format.op_node_spec, op version >= 3)."""
    try:
        from pbs2p_edge.format import op_node_spec  # noqa: F401
    except ImportError:
        return False
    return True


def _fused_projection(names: list[str], modules: list[nn.Module], activation: str = "none") -> nn.Module:
    """One node for `modules` (same input) when their formats allow it, else Identity (one node each).
    `activation`: the epilogue a SparseBinaryMatMul node applies to its output (MatMulNBits has none)."""
    if fusable_nbits(modules):
        return FusedNBits(modules)
    if all(isinstance(m, SparseBinaryLinear) for m in modules) and multi_block_supported():
        return FusedSparseBinary(names, modules, activation)
    return nn.Identity()


def fusable_nbits(modules: list[nn.Module]) -> bool:
    """Whether `modules` (e.g. q, k, v) can run as one MatMulNBits node (FusedNBits)."""
    if not all(isinstance(m, NBitsLinear) for m in modules):
        return False
    first = modules[0]
    same = ("bits", "block_size", "k")
    return all(
        m.accuracy_level == first.accuracy_level
        and all(getattr(m.quantized, f) == getattr(first.quantized, f) for f in same)
        for m in modules
    )


class FusedDecoder(Decoder):
    """Decoder graph of contrib ops over `hf_model`'s layers (export only: its eager output is not the model's)."""

    def __init__(self, hf_model: nn.Module, config: ExportConfig, head: nn.Module) -> None:
        reason = fused_unsupported(config)
        if reason is not None:
            raise Pbs2pError(f"the fused graph does not support {config.model_type} with {reason}")
        super().__init__(hf_model, config, head)
        inv_freq = self.inv_freq_model
        rotary = inv_freq.shape[0] * 2
        if rotary != config.head_dim:
            raise Pbs2pError("the fused graph does not support partial rotary embeddings")
        # transformers: freqs = position (fp32) * inv_freq (fp32), cos/sin times the attention scaling.
        positions = torch.arange(config.context_length, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        scale = self.rope_scale[""]
        self.register_buffer("cos_cache", (freqs.cos() * scale).contiguous(), persistent=False)
        self.register_buffer("sin_cache", (freqs.sin() * scale).contiguous(), persistent=False)
        for index, layer in enumerate(self.layers):  # int4 layers name their nodes for validation's forcing
            for name, module in layer.named_modules():
                if isinstance(module, NBitsLinear):
                    module.layer_name = f"layers.{index}.{name}"
        # Projections that share their input and format run as one node (q/k/v; gate/up).
        self.qkv_proj = nn.ModuleList()
        self.gate_up_proj = nn.ModuleList()
        for index, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            names = [f"layers.{index}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
            self.qkv_proj.append(_fused_projection(names, [attn.q_proj, attn.k_proj, attn.v_proj]))
            names = [f"layers.{index}.mlp.{p}" for p in ("gate_proj", "up_proj")]
            self.gate_up_proj.append(
                _fused_projection(names, [mlp.gate_proj, mlp.up_proj], GATE_UP_ACTIVATION)
            )

    def _skip_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, role: str = ""
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) as one SkipSimplifiedLayerNormalization."""
        outputs = torch.onnx.ops.symbolic_multi_out(
            f"{MS}::SkipSimplifiedLayerNormalization",
            [x, residual, weight],
            {"epsilon": float(self.config.rms_norm_eps)},
            dtypes=[x.dtype] * 4,
            shapes=[x.shape, (*x.shape[:-1], 1), (*x.shape[:-1], 1), x.shape],
            version=1,
            metadata_props={ROLE_KEY: role} if role else None,
        )
        return outputs[0], outputs[3]

    def _layer_mlp(self, index: int, x: torch.Tensor) -> torch.Tensor:
        fused, mlp = self.gate_up_proj[index], self.layers[index].mlp
        if isinstance(fused, nn.Identity):
            return self._mlp(mlp, x)
        if getattr(fused, "activation", "none") == "swiglu":  # silu(gate) * up inside the node
            return mlp.down_proj(fused(x))
        gate, up = fused(x).chunk(2, dim=-1)
        return mlp.down_proj(nn.functional.silu(gate) * up)

    def _gqa(
        self,
        index: int,
        x: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        seqlens_k: torch.Tensor,
        total: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        attn, fused = self.layers[index].self_attn, self.qkv_proj[index]
        if isinstance(fused, nn.Identity):
            q, k, v = self._qkv(attn, x)
        else:  # packed q|k|v as the query input, key and value absent
            q, k, v = fused(x), None, None
        out, present_key, present_value = torch.onnx.ops.symbolic_multi_out(
            f"{MS}::GroupQueryAttention",
            [q, k, v, past_key, past_value, seqlens_k, total, self.cos_cache, self.sin_cache],
            {
                "num_heads": cfg.num_heads,
                "kv_num_heads": cfg.num_kv_heads,
                "scale": float(cfg.attention_scale),
                "do_rotary": 1,
                "rotary_interleaved": 0,
                "local_window_size": -1,
            },
            dtypes=[x.dtype] * 3,
            shapes=[(*x.shape[:-1], cfg.num_heads * cfg.head_dim), past_key.shape, past_value.shape],
            version=1,
        )
        return attn.o_proj(out), present_key, present_value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cfg = self.config
        hidden = self.head.embed(input_ids)
        # GroupQueryAttention's inputs: per row, the index of its last valid slot; the total length.
        seqlens_k = (attention_mask.sum(dim=1) - 1).to(torch.int32)
        total = torch.ones_like(attention_mask[0]).sum().to(torch.int32)
        presents: list[torch.Tensor] = []
        residual = hidden
        x = rms_norm(hidden, self.layers[0].input_layernorm.weight, cfg.rms_norm_eps)
        mlp_out = None
        for i, layer in enumerate(self.layers):
            if mlp_out is not None:
                x, residual = self._skip_norm(mlp_out, residual, layer.input_layernorm.weight)
            out, key, value = self._gqa(i, x, past[2 * i], past[2 * i + 1], seqlens_k, total)
            presents += [key, value]
            x, residual = self._skip_norm(out, residual, layer.post_attention_layernorm.weight)
            mlp_out = self._layer_mlp(i, x)
        hidden, _ = self._skip_norm(mlp_out, residual, self.norm.weight, role=FINAL_NORM_ROLE)
        return (self.head.logits(hidden), *presents)


def input_names(config: ExportConfig) -> list[str]:
    return ["input_ids", "attention_mask", *config.past_names()]


def example_inputs(config: ExportConfig, batch: int, seq_len: int, past_len: int) -> tuple[torch.Tensor, ...]:
    """Trace inputs: a KV buffer longer than past + new tokens, so its length is its own axis."""
    input_ids = torch.randint(0, config.vocab_size, (batch, seq_len), dtype=torch.int64)
    attention_mask = torch.ones(batch, past_len + seq_len, dtype=torch.int64)
    buffer = past_len + seq_len + 4
    past = [torch.zeros(batch, config.num_kv_heads, buffer, config.head_dim) for _ in config.past_names()]
    return (input_ids, attention_mask, *past)


def dynamic_shapes(config: ExportConfig) -> dict[str, object]:
    dim = torch.export.Dim.DYNAMIC
    return {
        "input_ids": {0: dim, 1: dim},
        "attention_mask": {0: dim, 1: dim},
        "past": tuple({0: dim, 2: dim} for _ in config.past_names()),
    }


def axis_names(config: ExportConfig) -> dict[str, list[str | int]]:
    axes: dict[str, list[str | int]] = {
        "input_ids": ["batch_size", "sequence_length"],
        "attention_mask": ["batch_size", "total_sequence_length"],
        "logits": ["batch_size", "logits_length", config.vocab_size],
    }
    for name in [*config.past_names(), *config.present_names()]:
        axes[name] = ["batch_size", config.num_kv_heads, "max_sequence_length", config.head_dim]
    return axes


def finish_graph(model: onnx.ModelProto) -> None:
    """After tracing: drop the norms' unused statistics outputs, and keep only the last `logits_to_keep`
    rows of the final norm's output (0 = all) before the head, through an optional int64 input."""
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    final = None
    for node in graph.node:
        if node.domain == MS and node.op_type == "SkipSimplifiedLayerNormalization":
            for index in (1, 2, 3):
                if index < len(node.output) and node.output[index] not in used:
                    node.output[index] = ""
            while node.output and node.output[-1] == "":
                node.output.pop()
            if any(p.key == ROLE_KEY and p.value == FINAL_NORM_ROLE for p in node.metadata_props):
                final = node
    if final is None:
        raise Pbs2pError("fused export: the final norm is missing from the traced graph")
    _name_block_inputs(graph)
    hidden = final.output[0]
    position = list(graph.node).index(final) + 1
    if _reads_other_shapes(graph, hidden):
        # The head's nodes also read shapes computed from other inputs (a Gemm head reshapes to [B, S, V]
        # from input_ids' shape): cutting its input would break them, so the logits are cut instead.
        hidden, kept, position = _rename_output(graph, "logits"), "logits", len(graph.node)
    else:
        kept = f"{hidden}__kept"
        for node in graph.node:
            for index, name in enumerate(node.input):
                if name == hidden:
                    node.input[index] = kept
    graph.input.append(onnx.helper.make_tensor_value_info(LOGITS_TO_KEEP, onnx.TensorProto.INT64, []))
    graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.array(0, dtype=np.int64), LOGITS_TO_KEEP),
            onnx.numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), "keep__end"),
            onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "keep__axis"),
            onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), "keep__shape"),
        ]
    )
    # Slice(hidden, starts=[-k], ends=[max], axes=[1]): k = 0 starts at 0 (every row), k = 1 at the last.
    nodes = [
        onnx.helper.make_node("Neg", [LOGITS_TO_KEEP], ["keep__neg"], name="keep/Neg"),
        onnx.helper.make_node("Reshape", ["keep__neg", "keep__shape"], ["keep__start"], name="keep/Reshape"),
        onnx.helper.make_node(
            "Slice", [hidden, "keep__start", "keep__end", "keep__axis"], [kept], name="keep/Slice"
        ),
    ]
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    # Shapes downstream of the cut changed: let onnxruntime infer them again.
    downstream = _downstream(graph, kept)
    keep_info = [v for v in graph.value_info if v.name not in downstream]
    del graph.value_info[:]
    graph.value_info.extend(keep_info)


def _name_block_inputs(graph: onnx.GraphProto) -> None:
    """Give a multi-block node's packed initializers their layer's name (`qkv_proj.3.b1_scales` ->
    `layers.3.self_attn.k_proj.scales`, as in the unfused graph), unless the exporter shares one initializer
    between several inputs (byte-identical headers or placeholders), which keep the exporter's name."""
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    renames: dict[str, str] = {}
    for node in graph.node:
        layers = next((p.value.split(",") for p in node.metadata_props if p.key == LAYERS_KEY), None)
        if layers is None:
            continue
        for name in node.input[1:]:
            match = re.search(r"\.b(\d+)_(\w+)$", name)
            if match and uses.get(name) == 1 and int(match.group(1)) < len(layers):
                renames[name] = f"{layers[int(match.group(1))]}.{match.group(2)}"
    taken = {t.name for t in graph.initializer}
    renames = {old: new for old, new in renames.items() if new not in taken}
    for tensor in graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in renames:
                node.input[index] = renames[name]


def _reads_other_shapes(graph: onnx.GraphProto, start: str) -> bool:
    """Whether a node downstream of `start` reads a value computed from anything but `start` and constants."""
    constants = {t.name for t in graph.initializer}
    constants |= {o for node in graph.node if node.op_type == "Constant" for o in node.output}
    reached = _downstream(graph, start)
    return any(
        name and name not in reached and name not in constants
        for node in graph.node
        if any(name in reached for name in node.input)
        for name in node.input
    )


def _rename_output(graph: onnx.GraphProto, name: str) -> str:
    """Make the node producing graph output `name` write `{name}__all` instead; returns the new name."""
    renamed = f"{name}__all"
    for node in graph.node:
        for index, output in enumerate(node.output):
            if output == name:
                node.output[index] = renamed
    for node in graph.node:
        for index, value in enumerate(node.input):
            if value == name:
                node.input[index] = renamed
    return renamed


def _downstream(graph: onnx.GraphProto, start: str) -> set[str]:
    reached = {start}
    for node in graph.node:  # topological order
        if any(name in reached for name in node.input):
            reached.update(name for name in node.output if name)
    return reached
