"""Dynamo export of the decoder to one ONNX graph with KV cache, external data and the ONNX checker."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxscript import ir

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.export.configs import ExportConfig
from pbs2p_edge.export.decoder import Decoder
from pbs2p_edge.export.patch import onnx_emission

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
OPSET = 18
# Initializers above this many bytes go to DATA_FILE, smaller ones stay in the graph.
EXTERNAL_THRESHOLD = 1024
# Example shapes for tracing: all different and > 1 so no axis is specialised to a constant.
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST = 2, 3, 5


def example_inputs(config: ExportConfig) -> tuple[torch.Tensor, ...]:
    batch, seq_len, past_len = _TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST
    input_ids = torch.randint(0, config.vocab_size, (batch, seq_len), dtype=torch.int64)
    attention_mask = torch.ones(batch, past_len + seq_len, dtype=torch.int64)
    position_ids = torch.arange(past_len, past_len + seq_len, dtype=torch.int64).expand(batch, seq_len)
    past = [
        torch.zeros(batch, config.num_kv_heads, past_len, config.head_dim)
        for _ in range(2 * config.num_layers)
    ]
    return (input_ids, attention_mask, position_ids.contiguous(), *past)


def _dynamic_shapes(config: ExportConfig) -> dict[str, object]:
    batch = torch.export.Dim.DYNAMIC
    seq = torch.export.Dim.DYNAMIC
    past_axes = {0: batch, 2: torch.export.Dim.DYNAMIC}
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: torch.export.Dim.DYNAMIC},
        "position_ids": {0: batch, 1: seq},
        "past": tuple(past_axes for _ in range(2 * config.num_layers)),
    }


def _name_axes(model: onnx.ModelProto, config: ExportConfig, fused: bool = False) -> None:
    """Give the dynamic axes the names optimum and onnxruntime-genai use."""
    from pbs2p_edge.export import fused as fused_graph

    axes: dict[str, list[str | int]] = {
        "input_ids": ["batch_size", "sequence_length"],
        "attention_mask": ["batch_size", "total_sequence_length"],
        "position_ids": ["batch_size", "sequence_length"],
        "logits": ["batch_size", "sequence_length", config.vocab_size],
    }
    for name in config.past_names():
        axes[name] = ["batch_size", config.num_kv_heads, "past_sequence_length", config.head_dim]
    for name in config.present_names():
        axes[name] = ["batch_size", config.num_kv_heads, "total_sequence_length", config.head_dim]
    if fused:
        axes = fused_graph.axis_names(config)
    for value in [*model.graph.input, *model.graph.output]:
        names = axes.get(value.name)
        if names is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, label in zip(dims, names, strict=True):
            if isinstance(label, str):
                dim.ClearField("dim_value")
                dim.dim_param = label
            else:
                dim.ClearField("dim_param")
                dim.dim_value = label


def _share_reshaped_initializers(model: ir.Model) -> None:
    """Replace initializers that are byte-identical reshaped copies of another one by a Reshape node.

    The tied quantized embedding gathers from the LM head's quantized matrix viewed as 2-D; the exporter's
    constant folding turns that view into a second copy, which would store the matrix twice. Only folded
    constants (numpy tensors, not the module's own torch tensors) can be such copies, so only byte counts
    they share are hashed.
    """
    graph = model.graph
    values = [v for v in graph.initializers.values() if v.const_value is not None]
    sizes = {_nbytes(v) for v in values if _nbytes(v) >= 4096 and not _is_module_tensor(v.const_value)}
    originals: dict[tuple[Any, bytes], ir.Value] = {}
    first = next(iter(graph), None)
    for value in values:
        if _nbytes(value) not in sizes:
            continue
        key = (value.const_value.dtype, hashlib.sha256(memoryview(_contiguous(value.const_value))).digest())
        original = originals.setdefault(key, value)
        if original is value:
            continue
        name, dims = value.name, list(value.shape)
        graph.initializers.pop(name)
        shape = ir.Value(name=f"{name}__shape", const_value=ir.tensor(np.array(dims, dtype=np.int64)))
        graph.register_initializer(shape)
        value.const_value = None
        node = ir.Node("", "Reshape", [original, shape], outputs=[value], name=f"{name}__reshape")
        if first is None:
            graph.append(node)
        else:
            graph.insert_before(first, node)


def _drop_tensors(program: Any) -> None:
    """Cut the exported program's links to the module's tensors once they are on disk: the exporter's objects
    outlive the call (module-level caches keep its graph reachable), and with them every weight the caller
    wants to free before validation loads the bundle."""
    for value in program.model.graph.initializers.values():
        value.const_value = None
    program.model.graph.initializers.clear()
    program.exported_program = None


def _nbytes(value: ir.Value) -> int:
    return int(value.const_value.nbytes)


def _is_module_tensor(tensor: Any) -> bool:
    return type(tensor).__name__ == "TorchTensor"


def _contiguous(tensor: Any) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array (a view where the layout allows)."""
    array = np.ascontiguousarray(tensor.numpy())
    return array.reshape(-1).view(np.uint8)


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    """Silence the exporter's per-pass INFO logs (onnxruntime's quantizer sets the root logger to INFO)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(decoder: Decoder, config: ExportConfig, out_dir: Path) -> Path:
    """Export `decoder` to out_dir/model.onnx (+ model.onnx.data) and run the ONNX checker on it.

    A `FusedDecoder` (export/fused.py) gets its own interface (shared KV buffers, `logits_to_keep`)."""
    from pbs2p_edge.export import fused as fused_graph

    path = out_dir / MODEL_FILE
    fused = isinstance(decoder, fused_graph.FusedDecoder)
    inputs = example_inputs(config)
    input_names, dynamic = config.input_names(), _dynamic_shapes(config)
    if fused:
        inputs = fused_graph.example_inputs(config, _TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST)
        input_names, dynamic = fused_graph.input_names(config), fused_graph.dynamic_shapes(config)
    with warnings.catch_warnings(), _quiet_loggers(), onnx_emission(decoder), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                decoder,
                inputs,
                dynamo=True,
                opset_version=OPSET,
                input_names=input_names,
                output_names=config.output_names(),
                dynamic_shapes=dynamic,
                optimize=True,
                verbose=False,
            )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise Pbs2pError(f"ONNX export failed: {first}") from exc
    # The initializers stream from the exporter's tensors (the module's own, and folded constants) to the
    # external data file one at a time: no serialized copy of the whole graph is ever held in memory.
    _share_reshaped_initializers(program.model)
    ir.save(program.model, str(path), external_data=DATA_FILE, size_threshold_bytes=EXTERNAL_THRESHOLD)
    _drop_tensors(program)
    del program
    gc.collect()
    model = onnx.load(str(path), load_external_data=False)  # the graph only
    if fused:
        fused_graph.finish_graph(model)
    _name_axes(model, config, fused)
    onnx.save_model(model, str(path))  # large initializers keep their place in DATA_FILE
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise Pbs2pError(f"exported graph fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    return path
