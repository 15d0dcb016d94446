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
from pathlib import Path
from typing import Any

import torch

from pbs2p_edge.errors import Pbs2pError


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
        self._handles: dict[str, Any] = {}

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.weight_map.get(name)
        if file is None:
            raise Pbs2pError(f"{self.folder}: tensor {name} is missing from the safetensors files")
        if file not in self._handles:
            self._handles[file] = safe_open(self.folder / file, framework="pt")
        return self._handles[file].get_tensor(name).float()

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def materialize(self, module: torch.nn.Module, prefix: str) -> None:
        """Give every parameter and persistent buffer of `module` its stored fp32 value (strict)."""
        names = list(module.state_dict())
        state = {name: self.tensor(f"{prefix}{name}") for name in names}
        module.load_state_dict(state, strict=True, assign=True)

    def load(self, index: int, layer: torch.nn.Module) -> None:
        self.materialize(layer, f"model.layers.{index}.")

    def release(self, index: int, layer: torch.nn.Module, linear_names: tuple[str, ...]) -> None:
        """Drop the (compressed) linears of a finished layer to meta; its norms stay for the checkpoint."""
        for name in linear_names:
            layer.get_submodule(name).to("meta")


def skeleton_model(folder: str | os.PathLike) -> tuple[Any, LayerStore]:
    """(causal LM with meta decoder layers and real embeddings/norm/head/rotary, its LayerStore)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise Pbs2pError(f"{folder}/config.json is not a model config: {exc}") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise Pbs2pError(f"{folder} is not a causal language model (model type {config.model_type!r})")
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
        if name == "rotary_emb":  # non-persistent buffers computed from the config: rebuild on the CPU
            model.model.rotary_emb = type(module)(config=model.config)
            continue
        _materialize_or_tie(model, module, f"model.{name}", store)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model, store


def _materialize_or_tie(model: Any, module: torch.nn.Module, prefix: str, store: LayerStore) -> None:
    names = list(module.state_dict())
    if not names:
        return
    if prefix == "lm_head" and getattr(model.config, "tie_word_embeddings", False):
        return  # tied to the embeddings below
    store.materialize(module, f"{prefix}.")


def layer_cosines_streaming(
    model: Any, store: LayerStore, calib_ids: torch.Tensor, batch_size: int
) -> list[float]:
    """`pipeline.layer_cosines` one layer at a time: the same batches through the same layers, same sums."""
    from pbs2p_edge.compress.pipeline import _run_layer, capture_layer_inputs

    chunks = capture_layer_inputs(model, calib_ids, batch_size)
    cosines = []
    for index, layer in enumerate(model.model.layers):
        store.load(index, layer)
        total, count = 0.0, 0
        outputs = []
        for hidden, kwargs in chunks:
            out = _run_layer(layer, hidden, kwargs)
            cos = torch.nn.functional.cosine_similarity(hidden.float(), out.float(), dim=-1)
            total += float(cos.sum())
            count += cos.numel()
            outputs.append((out, kwargs))
        chunks = outputs
        cosines.append(total / max(count, 1))
        layer.to("meta")
    return cosines


def has_safetensors(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
