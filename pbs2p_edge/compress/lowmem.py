"""Low-memory compression: the decoder layers stay in the safetensors files until their turn.

`skeleton_model(folder)` builds the causal LM on the meta device and materializes only what the layer loop
needs beside the working layer: the embeddings (and an untied head, for the checkpoint), the final norm and the
rotary tables. `LayerStore` reads one decoder layer's tensors from the memory-mapped safetensors files
(`load`), and after the layer is compressed drops its linears back to meta (`release`): their compressed
form lives in the packed arrays, and the layer's norms (small) stay for the checkpoint. No fp32 copy of the
whole model ever exists, so peak memory is the embeddings + one layer + its Hessians + the calibration
activations. The values loaded are the same fp32 tensors `from_pretrained` would load, so the packed result
is bit-identical to compressing the fully loaded model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pbs2p_edge.config import SUPPORTED_MODEL_TYPES
from pbs2p_edge.errors import Pbs2pError


class UnpackedWeights(Mapping):
    """{linear name: SparseBinaryWeight} decoded from the packed form on each access (bit-exact round trip),
    so the summary and callers see the weights without all of them being held unpacked."""

    def __init__(self, packed: dict[str, Any]) -> None:
        self._packed = packed

    def __getitem__(self, name: str) -> Any:
        from pbs2p_edge.format import unpack

        return unpack(self._packed[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def clear(self) -> None:
        """Nothing is held unpacked (the compress command clears the weights before saving)."""


class LayerStore:
    """Tensors of a safetensors model folder (single file or sharded), read lazily by name."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            weight_map = {}
            with safe_open(folder / "model.safetensors", framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise Pbs2pError(f"{folder} has no safetensors weights (model.safetensors or its index)")
        self.folder = folder
        self.weight_map = weight_map
        self.packed: dict[str, Any] = {}  # linear name -> PackedWeight of finished layers

    def pack_layer(self, weights: dict[str, Any], index: int, linear_names: tuple[str, ...]) -> None:
        """Move a finished layer's SparseBinaryWeights (a byte per weight for the mask, another for the
        signs) to their packed form (about 2 bits per weight)."""
        from pbs2p_edge.format import pack

        for name in linear_names:
            full = f"model.layers.{index}.{name}"
            self.packed[full] = pack(weights.pop(full))

    def unpacked_view(self) -> UnpackedWeights:
        return UnpackedWeights(self.packed)

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """{name: fp32 tensor}. Each file is mapped only while its tensors are copied out: a mapping kept open
        would count every page read so far in the process's RSS."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            file = self.weight_map.get(name)
            if file is None:
                raise Pbs2pError(f"{self.folder}: tensor {name} is missing from the safetensors files")
            by_file.setdefault(file, []).append(name)
        result = {}
        for file, file_names in by_file.items():
            with safe_open(self.folder / file, framework="pt") as f:
                for name in file_names:
                    result[name] = f.get_tensor(name).float().clone()
        return result

    def materialize(self, module: torch.nn.Module, prefix: str) -> None:
        """Give every parameter and persistent buffer of `module` its stored fp32 value (strict)."""
        names = list(module.state_dict())
        loaded = self.tensors([f"{prefix}{name}" for name in names])
        state = {name: loaded[f"{prefix}{name}"] for name in names}
        module.load_state_dict(state, strict=True, assign=True)

    def load(self, index: int, layer: torch.nn.Module) -> None:
        self.materialize(layer, f"model.layers.{index}.")

    def release(self, index: int, layer: torch.nn.Module, linear_names: tuple[str, ...]) -> None:
        """Drop the (compressed) linears of a finished layer to meta; its norms stay for the checkpoint."""
        for name in linear_names:
            layer.get_submodule(name).to("meta")

    def release_weights(self, layer: torch.nn.Module, linear_names: tuple[str, ...]) -> None:
        """Drop only the weights of a layer the bit budget keeps in int4 (the checkpoint's `nbits` hold them);
        their biases stay, the checkpoint stores those densely."""
        for name in linear_names:
            drop_weight(layer.get_submodule(name))

    def release_embeddings(self, model: Any) -> None:
        """Once decoder layer 0's inputs are captured the layer loop needs neither the embeddings nor the
        head (a GiB each for a 150k vocabulary): drop them to meta until `restore`."""
        model.get_input_embeddings().to("meta")
        model.get_output_embeddings().to("meta")

    def restore(self, model: Any, linear_names: tuple[str, ...]) -> None:
        """Read back everything on meta except the compressed linears (for the checkpoint)."""
        materialize_except(
            model, self, lambda name: name.rpartition(".layers.")[2].partition(".")[2] in linear_names
        )
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        rebuild_computed_buffers(model)  # Gemma's embedding scale went to meta with the embeddings


def skeleton_model(folder: str | os.PathLike) -> tuple[Any, LayerStore]:
    """(causal LM with meta decoder layers and real embeddings/norm/head/rotary, its LayerStore)."""
    from transformers import AutoModelForCausalLM

    from pbs2p_edge.sources import causal_lm_config

    folder = Path(folder)
    config = causal_lm_config(folder)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise Pbs2pError(
            f"model type {config.model_type} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    config.name_or_path = str(folder)
    store = LayerStore(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    layers = model.model.layers
    for name, module in model.named_children():
        if name != "model":
            _materialize_or_tie(model, module, name, store)
    for name, module in model.model.named_children():
        if module is layers:
            continue
        if name != "rotary_emb":  # computed from the config, rebuilt below
            _materialize_or_tie(model, module, f"model.{name}", store)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    rebuild_computed_buffers(model)
    return model, store


def rebuild_computed_buffers(model: Any) -> None:
    """Recreate on the CPU the modules whose only state is computed from the config (the rotary tables) of a
    model built on the meta device; refuse if anything else was left on meta."""
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None and any(b.is_meta for b in rotary.buffers()):
        model.model.rotary_emb = type(rotary)(config=model.config)
    for module in model.modules():  # Gemma's scaled embeddings keep their scale as a non-persistent buffer
        scale = getattr(module, "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.is_meta and hasattr(module, "scalar_embed_scale"):
            module.embed_scale = torch.tensor(float(module.scalar_embed_scale))
    left = [n for n, t in [*model.named_buffers(), *model.named_parameters()] if t.is_meta]
    left = [n for n in left if ".layers." not in f".{n}"]  # decoder layers may wait for their turn
    if left:
        raise Pbs2pError(f"model weights missing after loading: {', '.join(left[:3])}")


def _materialize_or_tie(model: Any, module: torch.nn.Module, prefix: str, store: LayerStore) -> None:
    names = list(module.state_dict())
    if not names:
        return
    if prefix == "lm_head" and getattr(model.config, "tie_word_embeddings", False):
        return  # tied to the embeddings below
    store.materialize(module, f"{prefix}.")


def layer_cosines_streaming(
    model: Any, store: LayerStore, calib_ids: torch.Tensor, batch_size: int, progress: bool = True
) -> list[float]:
    """`pipeline.layer_cosines` one layer at a time: the same batches through the same layers, same sums."""
    from tqdm.auto import tqdm

    from pbs2p_edge.compress.families import layer_kwargs, layers_differ
    from pbs2p_edge.compress.pipeline import _run_layer, capture_layer_inputs

    chunks = capture_layer_inputs(model, calib_ids, batch_size)
    per_layer = layer_kwargs(model, calib_ids, batch_size) if layers_differ(model) else None
    cosines = []
    layers = tqdm(
        list(enumerate(model.model.layers)), desc="cfs (dense pass)", unit="layer", disable=not progress
    )
    for index, layer in layers:
        store.load(index, layer)
        total, count = 0.0, 0
        outputs = []
        for b, (hidden, kwargs) in enumerate(chunks):
            out = _run_layer(layer, hidden, per_layer[b][index] if per_layer else kwargs)
            cos = torch.nn.functional.cosine_similarity(hidden.float(), out.float(), dim=-1)
            total += float(cos.sum())
            count += cos.numel()
            outputs.append((out, kwargs))
        chunks = outputs
        cosines.append(total / max(count, 1))
        layer.to("meta")
    return cosines


def materialize_except(model: Any, store: LayerStore, skip: Any) -> None:
    """Read every module still on the meta device from `store`, except those whose name `skip(name)` accepts."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, module in model.named_modules():
        if list(module.children()) or skip(name) or (tied and module is model.get_output_embeddings()):
            continue
        if any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
            store.materialize(module, f"{name}.")


def has_safetensors(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def teacher_topk_streaming(
    model: Any,
    store: LayerStore,
    ids: torch.Tensor,
    k: int,
    batch_size: int,
    progress: bool = True,
    dtype: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`recover.teacher_topk` one decoder layer at a time: the FP model's hidden states of every window go
    through each layer read from `store` in turn (the same batches, the same per-layer calls, the same
    `dtype`), then through the model's own final norm and head. Holds the windows' hidden states, not the
    model."""
    from tqdm.auto import tqdm

    from pbs2p_edge.compress.families import layer_kwargs, layers_differ
    from pbs2p_edge.compress.pipeline import _run_layer, capture_layer_inputs
    from pbs2p_edge.compress.recover import teacher_autocast, topk_logprobs

    with torch.no_grad(), teacher_autocast(dtype):
        chunks = capture_layer_inputs(model, ids, batch_size)
        per_layer = layer_kwargs(model, ids, batch_size) if layers_differ(model) else None
        hidden = [h for h, _ in chunks]
        layers = tqdm(
            list(enumerate(model.model.layers)),
            desc="teacher (layer by layer)",
            unit="layer",
            disable=not progress,
        )
        for index, layer in layers:
            store.load(index, layer)
            for b, (_, kwargs) in enumerate(chunks):
                hidden[b] = _run_layer(layer, hidden[b], per_layer[b][index] if per_layer else kwargs)
            layer.to("meta")
        values, indices = [], []
        for batch, states in zip(ids.split(batch_size), hidden, strict=True):
            top = topk_logprobs(logits_from_final_states(model, batch, states), k)
            values.append(top[0])
            indices.append(top[1])
    return torch.cat(values), torch.cat(indices)


def logits_from_final_states(model: Any, batch: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """The model's logits for `batch` given the last decoder layer's outputs `states`: its own forward with the
    decoder layers taken out and the final norm's input replaced (so any family-specific head step applies)."""
    layers = model.model.layers
    handle = model.model.norm.register_forward_pre_hook(lambda _m, _args: (states,))
    model.model.layers = torch.nn.ModuleList()
    try:
        return model(input_ids=batch, use_cache=False).logits
    finally:
        model.model.layers = layers
        handle.remove()


def materialize_compressed(model: Any, weights: Mapping[str, Any]) -> None:
    """Give the compressed linears (on meta after the layer loop) their fp32 W_hat (and bias) from `weights`."""
    for name, weight in weights.items():
        linear = model.get_submodule(name)
        linear.weight = torch.nn.Parameter(torch.from_numpy(weight.dense()), requires_grad=False)
        if weight.bias is not None:
            linear.bias = torch.nn.Parameter(
                torch.from_numpy(np.asarray(weight.bias, dtype=np.float32)), requires_grad=False
            )


def materialize_nbits(model: Any, nbits: Mapping[str, Any]) -> None:
    """Give the linears the bit budget keeps in int4 (weights on meta after the layer loop) their dequantized
    fp32 weights from the checkpoint entries `nbits` ({name: {packed, scales, meta}})."""
    from pbs2p_edge.checkpoint import nbits_quantized

    for name, entry in nbits.items():
        weight = torch.from_numpy(nbits_quantized(name, entry).dequantize())
        model.get_submodule(name).weight = torch.nn.Parameter(weight, requires_grad=False)


def drop_weight(linear: torch.nn.Module) -> None:
    """The linear's weight to meta (same shape and dtype); its bias stays."""
    linear.weight = torch.nn.Parameter(torch.empty_like(linear.weight, device="meta"), requires_grad=False)


def drop_compressed(model: Any, names: Iterator[str] | list[str]) -> None:
    """Back to meta: the packed arrays hold them."""
    for name in names:
        model.get_submodule(name).to("meta")
