"""Per-family pieces of the layer-by-layer compression: the linears of a layer and the inputs each layer gets.

Most families pass every decoder layer the same keyword arguments (rotary tables, causal mask), so the
pipeline replays layer 0's. Gemma 2/3 (and Qwen with `max_window_layers`) alternate local sliding-window and
global layers, which get different masks and, in Gemma 3, different rotary tables: for those the keyword
arguments of every layer are recorded once per calibration batch (`layer_kwargs`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from pbs2p_edge.families import layer_linears


class _Stop(Exception):
    """Raised once the last decoder layer's arguments are recorded."""


def linear_names(model: Any) -> tuple[str, ...]:
    """The compressed linears of one decoder layer of `model` (Pbs2pError for unsupported families)."""
    return layer_linears(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def layers_differ(model: Any) -> bool:
    """True when decoder layers get different masks / rotary tables (mixed `layer_types`)."""
    return len(set(getattr(model.config, "layer_types", None) or ())) > 1


# What a decoder layer's KV-cache argument is called: `cache` since transformers 5.x deprecated
# `past_key_values` (setting both warns), `past_key_values` before.
CACHE_KWARGS = ("cache", "past_key_values")


def drop_cache(kwargs: dict[str, Any]) -> None:
    """Replay a layer without the model's KV cache: null the cache argument the model passed, under the name
    it used (a layer's default is no cache, so an absent one stays absent)."""
    for key in CACHE_KWARGS:
        if key in kwargs:
            kwargs[key] = None


def layer_kwargs(model: Any, calib_ids: torch.Tensor, batch_size: int) -> list[list[dict[str, Any]]]:
    """Per calibration batch (as `capture_layer_inputs` splits them), per decoder layer: its keyword arguments.

    The model's own forward computes them; each layer's `forward` is replaced for the call by a recorder that
    returns its input unchanged, so no layer computes (its weights may still be on the meta device, as on the
    layer-streaming path) while the model still reads every attribute of its layers."""
    layers = model.model.layers
    recorded: list[list[dict[str, Any]]] = []

    def recorder_for(index: int) -> Any:
        def record(hidden_states: torch.Tensor, *_args: Any, **kwargs: Any) -> torch.Tensor:
            kwargs["use_cache"] = False
            drop_cache(kwargs)
            recorded[-1].append(kwargs)
            if index == len(layers) - 1:
                raise _Stop
            return hidden_states

        return record

    for index, layer in enumerate(layers):
        layer.forward = recorder_for(index)  # an instance attribute shadows the class's forward
    try:
        for batch in calib_ids.split(batch_size):
            recorded.append([])
            with contextlib.suppress(_Stop):
                model(input_ids=batch, use_cache=False)
    finally:
        for layer in layers:
            del layer.forward
    return recorded
