"""Teacher-forced comparison of a graph with its PyTorch model: every custom node checked on identical inputs.

Why: the kernels round activations to int7, a discontinuous function. A compressed model run free in ONNX
Runtime and in PyTorch sees activations that differ by float summation order (~1e-7 relative); a few of them
sit on a rounding tie and round to neighbouring int7 levels, and over 30 binarized layers those flips compound
into logits that differ by tens of percent although every operation is correct (the PyTorch model, perturbed
by 1e-6 relative noise at its input, diverges from itself just as much: `noise_floor` in the validation).

So the graph is instrumented: the input and output of every `SparseBinaryMatMul` node become extra graph
outputs. PyTorch then runs the same steps with each compressed linear's output replaced by the graph's
(forward hooks), which stops any divergence from compounding while still recomputing everything else (norms,
rotary, attention over the KV cache, residual stream, head). Three checks follow, each on identical inputs:

- `ops`: each node's output against PyTorch's kernel arithmetic applied to the node's own graph input (a
  gate|up node with the swiglu epilogue: against silu(gate) * up of its two layers' kernel outputs, through the
  epilogue's numpy twin `pbs2p_edge.format.swiglu`);
- `wiring`: each node's graph input against the input PyTorch computes from the forced outputs, i.e. all the
  float code between the custom nodes, KV cache and positions included;
- `logits`: graph logits against PyTorch's logits from the forced outputs (final norm and head).

The body's int4 layers (the bit budget's, MatMulNBits at accuracy_level 4) round their input to int8, the same
kind of discontinuity: their nodes name their layers too (`NBITS_LAYERS_KEY`), and their outputs are forced
and their inputs checked as the custom nodes' are. Their outputs are onnxruntime's own kernel, so they are not
part of the `ops` check.

A swiglu node's gate and up outputs are not graph values: while forced, those two layers return PyTorch's
kernel arithmetic on the node's graph input instead, and the down projection after them is forced as usual.

A defect anywhere (a packing or kernel bug, a wrong cache slot, position or mask, a misplaced norm) shows up
in one of them at the layer where it happens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.export.configs import ExportConfig
from pbs2p_edge.export.nbits import NBITS_LAYERS_KEY, NBITS_ROWS_KEY, NBitsLinear
from pbs2p_edge.export.patch import PBS2P_OP, SparseBinaryLinear
from pbs2p_edge.format import ACTIVATIONS

INSTRUMENTED_FILE = "validate.onnx"
_DOMAIN, _, _OP_TYPE = PBS2P_OP.partition("::")
# The packed input that names the node's layer: scales are fp16 data, never byte-identical between layers,
# so the exporter's initializer deduplication never renames them (it does merge equal headers and biases).
_NAMING_INPUT = "scales"


# A multi-block node (q|k|v or gate|up in one node, export/fused.py) names its layers in this metadata entry,
# comma-separated in block order; its output is their outputs side by side (attribute block_rows).
LAYERS_KEY = "pbs2p_edge.layers"


@dataclass(frozen=True)
class Tap:
    """One model layer computed by a custom node: the graph values of the node's activation input and output,
    and the columns [start, stop) of the node's matmul output that are this layer's (all of them for a
    one-block node). With `activation` "swiglu" the node outputs silu(gate) * up, not the matmul."""

    layer: str
    input: str
    output: str
    start: int = 0
    stop: int | None = None
    node: str = ""
    activation: str = "none"
    nbits: bool = False  # a MatMulNBits node (onnxruntime's kernel), not a custom node


def _node_taps(node: onnx.NodeProto) -> list[Tap]:
    layers = next((p.value.split(",") for p in node.metadata_props if p.key == LAYERS_KEY), None)
    activation = next((a.s.decode() for a in node.attribute if a.name == "activation"), "none")
    if activation not in ACTIVATIONS or (activation != "none" and layers is None):
        raise Pbs2pError(
            f"validation cannot check custom node {node.name} with activation {activation!r} "
            "(known: none, and swiglu on a node naming its gate and up layers)"
        )
    if layers is None:
        return [Tap(_node_layer(node), node.input[0], node.output[0], node=node.name)]
    rows = next((list(a.ints) for a in node.attribute if a.name == "block_rows"), [])
    return _split_taps(node, "custom node", layers, rows, activation=activation)


def _nbits_taps(node: onnx.NodeProto) -> list[Tap]:
    meta = {p.key: p.value for p in node.metadata_props}
    if NBITS_LAYERS_KEY not in meta:
        return []  # the head, or a layer whose node does not output its whole result
    layers = meta[NBITS_LAYERS_KEY].split(",")
    rows = [int(r) for r in meta.get(NBITS_ROWS_KEY, "").split(",") if r]
    return _split_taps(node, "MatMulNBits node", layers, rows, nbits=True)


def _split_taps(
    node: onnx.NodeProto, what: str, layers: list[str], rows: list[int], **kind: Any
) -> list[Tap]:
    """One tap per layer of a node whose output is its layers' outputs side by side, `rows` columns each."""
    if len(rows) != len(layers):
        raise Pbs2pError(f"{what} {node.name} names {len(layers)} layers for {len(rows)} blocks")
    bounds = np.cumsum([0, *rows])
    return [
        Tap(layer, node.input[0], node.output[0], int(begin), int(end), node.name, **kind)
        for layer, begin, end in zip(layers, bounds[:-1], bounds[1:], strict=True)
    ]


def _node_layer(node: onnx.NodeProto) -> str:
    from pbs2p_edge.format.packed import ARRAY_ORDER

    name = node.input[1 + ARRAY_ORDER.index(_NAMING_INPUT)]
    suffix = f".{_NAMING_INPUT}"
    if not name.endswith(suffix):
        raise Pbs2pError(
            f"validation cannot tell which layer custom node {node.name} computes (input {name})"
        )
    return name[: -len(suffix)]


def tapped_values(taps: Sequence[Tap]) -> list[str]:
    """The graph values the taps read (activations shared by q/k/v or gate/up appear once)."""
    return list(dict.fromkeys(name for tap in taps for name in (tap.input, tap.output)))


def instrument(model_path: Path) -> tuple[Path, list[Tap]]:
    """Write a copy of the graph beside `model_path` that also outputs every custom node's input and output.

    The copy shares the external data file (same directory); the caller removes it. Returns (path, taps).
    """
    model = onnx.load(str(model_path), load_external_data=False)
    taps = [
        tap
        for node in model.graph.node
        if node.domain == _DOMAIN and node.op_type == _OP_TYPE
        for tap in _node_taps(node)
    ]
    taps += [tap for node in model.graph.node if node.op_type == "MatMulNBits" for tap in _nbits_taps(node)]
    outputs = {value.name for value in model.graph.output}
    for name in tapped_values(taps):
        if name not in outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    path = model_path.with_name(INSTRUMENTED_FILE)
    onnx.save_model(model, str(path))
    return path, taps


def match_layers(taps: Sequence[Tap], hf_model: nn.Module) -> dict[str, nn.Module]:
    """Map each tap's layer (named from the decoder, e.g. `layers.3.mlp.up_proj`) to the HF model's module:
    a SparseBinaryLinear for a custom node, an NBitsLinear for a MatMulNBits node."""
    modules = {
        name: m for name, m in hf_model.named_modules() if isinstance(m, (SparseBinaryLinear, NBitsLinear))
    }
    matched: dict[str, nn.Module] = {}
    for tap in taps:
        kind = NBitsLinear if tap.nbits else SparseBinaryLinear
        found = [
            m
            for name, m in modules.items()
            if isinstance(m, kind) and (name == tap.layer or name.endswith(f".{tap.layer}"))
        ]
        if len(found) != 1:
            what = "MatMulNBits node" if tap.nbits else "custom node"
            raise Pbs2pError(f"validation cannot match {what} for {tap.layer} to one layer of the model")
        matched[tap.layer] = found[0]
    custom = sum(not tap.nbits for tap in taps)
    compressed = sum(isinstance(m, SparseBinaryLinear) for m in modules.values())
    if len(matched) != len(taps) or custom != compressed:
        raise Pbs2pError(
            f"graph has {custom} custom nodes for {len(matched)} layers, the model {compressed} "
            "compressed layers"
        )
    return matched


@dataclass
class _Record:
    """Per layer and step: the graph's output and input, PyTorch's input and PyTorch's kernel output."""

    graph_out: list[np.ndarray]
    graph_in: list[np.ndarray]
    torch_in: list[np.ndarray]
    kernel_out: list[np.ndarray]


@contextlib.contextmanager
def forced_outputs(
    modules: Mapping[str, nn.Module],
    taps: Sequence[Tap],
    graph_values: Sequence[Mapping[str, np.ndarray]],
) -> Iterator[dict[str, _Record]]:
    """While active, each compressed layer returns the graph's outputs of all steps, joined along the token
    axis (PyTorch runs the whole sequence in one pass), without computing its own
    (`SparseBinaryLinear.replace_output`); a second call is refused.

    The call also records PyTorch's own input and the kernel arithmetic applied to the graph's input.
    """
    records: dict[str, _Record] = {}

    def joined(name: str) -> np.ndarray:
        return np.concatenate([values[name] for values in graph_values], axis=-2)

    def replacement(tap: Tap, module: Any) -> Any:
        record = records.setdefault(tap.layer, _Record([], [], [], []))

        def forced(x: torch.Tensor) -> torch.Tensor:
            if record.kernel_out:
                raise Pbs2pError(f"validation: layer {tap.layer} ran more often than the graph")
            graph_in = joined(tap.input)
            record.graph_in.append(graph_in)
            record.torch_in.append(x.detach().float().numpy().reshape(graph_in.shape))
            kernel = module._kernel_forward(torch.from_numpy(np.ascontiguousarray(graph_in)))
            record.kernel_out.append(kernel.numpy())
            shape = (*x.shape[:-1], module.out_features)
            if tap.activation != "none":
                # The node outputs silu(gate) * up: this layer's own output is no graph value.
                return kernel.reshape(shape).to(x.dtype)
            graph_out = joined(tap.output)[..., tap.start : tap.stop]
            record.graph_out.append(graph_out)
            return torch.from_numpy(np.ascontiguousarray(graph_out)).reshape(shape).to(x.dtype)

        return forced

    try:
        for tap in taps:
            module = modules[tap.layer]
            module.replace_output = replacement(tap, module)
        yield records
    finally:
        for module in modules.values():
            module.replace_output = None


def node_records(
    records: Mapping[str, _Record], taps: Sequence[Tap], graph_values: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, _Record]:
    """The records of the `ops` check, one per node output: a layer's own record, or for a node with an
    epilogue (gate|up, swiglu) one record named `gate+up` holding the node's graph output and the epilogue's
    numpy twin applied to its layers' kernel outputs, side by side as the node computes them."""
    from pbs2p_edge.format import apply_activation

    out: dict[str, _Record] = {}
    nodes: dict[str, list[Tap]] = {}
    for tap in taps:
        if tap.nbits:
            continue  # onnxruntime's kernel: forced and its input checked, not part of the ops check
        if tap.activation == "none":
            out[tap.layer] = records[tap.layer]
        else:
            nodes.setdefault(tap.node, []).append(tap)
    for node_taps in nodes.values():
        parts = [records[tap.layer].kernel_out for tap in node_taps]
        if any(len(p) != 1 for p in parts):
            raise Pbs2pError(
                f"validation: the layers of custom node {node_taps[0].node} did not run once each"
            )
        matmul = np.concatenate([p[0] for p in parts], axis=-1)
        graph_out = np.concatenate([values[node_taps[0].output] for values in graph_values], axis=-2)
        name = "+".join(tap.layer for tap in node_taps)
        reference = apply_activation(matmul, node_taps[0].activation).reshape(graph_out.shape)
        out[name] = _Record([graph_out], [], [], [reference])
    return out


def ort_steps(
    session: Any, config: ExportConfig, ids: Sequence[int], tokens: Sequence[int], extra: Sequence[str] = ()
) -> tuple[list[np.ndarray], list[dict[str, np.ndarray]]]:
    """Run the prefill of `ids` then one decode step per token through the graph's KV cache.

    Returns the logits of each step and, per step, the values of the `extra` graph outputs.
    """
    names = [output.name for output in session.get_outputs()]
    # An unfused graph grows its cache from length 0; a fused one (export/fused.py) takes buffers of a fixed
    # length, here the whole sequence, and reads the valid length from attention_mask.
    fused = "position_ids" not in {i.name for i in session.get_inputs()}
    length = len(ids) + len(tokens) if fused else 0
    empty = np.zeros((1, config.num_kv_heads, length, config.head_dim), dtype=np.float32)
    past = dict.fromkeys(config.past_names(), empty)
    step_ids, total = list(ids), 0
    logits: list[np.ndarray] = []
    values: list[dict[str, np.ndarray]] = []
    for token in [None, *tokens]:
        if token is not None:
            step_ids = [token]
        start = total
        total += len(step_ids)
        feeds = {
            "input_ids": np.array([step_ids], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            **past,
        }
        if not fused:
            feeds["position_ids"] = np.arange(start, total, dtype=np.int64)[None, :]
        outputs = dict(zip(names, session.run(None, feeds), strict=True))
        logits.append(outputs["logits"][0])
        past = {
            name: outputs[present]
            for name, present in zip(config.past_names(), config.present_names(), strict=True)
        }
        values.append({name: outputs[name] for name in extra})
    return logits, values


def worst_layer(records: Mapping[str, _Record], reference: str, test: str) -> tuple[float, str]:
    """The lowest per-layer SQNR of `test` against `reference` (fields of _Record) and the layer it occurs in."""
    from pbs2p_edge.export.validate import sqnr_db

    scores = {
        layer: sqnr_db(
            np.concatenate([a.reshape(-1) for a in getattr(record, reference)]),
            np.concatenate([a.reshape(-1) for a in getattr(record, test)]),
        )
        for layer, record in records.items()
    }
    layer = min(scores, key=scores.__getitem__)
    return round(scores[layer], 2), layer
