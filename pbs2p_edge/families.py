"""The decoder families we compress and export, and the config features each one's math depends on (no torch).

Compression needs only the linears of one decoder layer (`layer_linears`); export needs the family's block
variant (`pbs2p_edge.export.configs.FAMILIES`). Both first call `check_config`, which refuses any config field
whose value would change the math in a way we do not reproduce, naming the field: a model is never compressed
or exported silently wrong.

Phi-3 fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`. Each fused linear is compressed as one
matrix and packed as one weight (one kernel call at run time); docs/FAMILIES.md explains why this equals
compressing the blocks separately except for the salient columns, which the blocks then share.
"""

from __future__ import annotations

from typing import Any

from pbs2p_edge.errors import Pbs2pError

_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_FUSED = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")

# model_type -> the linears of one decoder layer that are compressed, in the order they run.
LAYER_LINEARS: dict[str, tuple[str, ...]] = {
    "llama": _ATTENTION + _MLP,
    "mistral": _ATTENTION + _MLP,
    "qwen2": _ATTENTION + _MLP,
    "qwen3": _ATTENTION + _MLP,
    "gemma2": _ATTENTION + _MLP,
    "gemma3_text": _ATTENTION + _MLP,
    "phi3": _FUSED,
    "smollm3": _ATTENTION + _MLP,
}
SUPPORTED_MODEL_TYPES = tuple(LAYER_LINEARS)

# Rotary variants whose frequencies are fixed at load time (longrope: its short factors, below its original
# context, which the export caps the bundle at). "dynamic" and anything newer are refused.
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")
_GEMMA = ("gemma2", "gemma3_text")
# The activation field and value of each family's gated MLP.
_ACTIVATION = {family: ("hidden_act", "silu") for family in LAYER_LINEARS}
_ACTIVATION.update({family: ("hidden_activation", "gelu_pytorch_tanh") for family in _GEMMA})


def unsupported(model_type: Any) -> Pbs2pError:
    return Pbs2pError(
        f"model type {model_type} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    )


def layer_linears(model_type: str) -> tuple[str, ...]:
    if model_type not in LAYER_LINEARS:
        raise unsupported(model_type)
    return LAYER_LINEARS[model_type]


def rope_parameter_sets(config: Any) -> dict[str, dict[str, Any]]:
    """{"": params} for one rotary embedding, or {layer type: params} for per-layer-type ones (Gemma 3)."""
    params = getattr(config, "rope_parameters", None) or {}
    if not isinstance(params, dict):
        raise Pbs2pError(f"config field rope_parameters is not a mapping: {params!r}")
    if params and all(isinstance(value, dict) for value in params.values()):
        return {str(key): value for key, value in params.items()}
    return {"": params}


def _refuse(config: Any, field: str, value: Any, why: str) -> Pbs2pError:
    return Pbs2pError(f"cannot handle {config.model_type} config field {field} = {value!r}: {why}")


def check_config(config: Any) -> None:
    """Refuse unsupported families and any config feature we do not reproduce, naming the field."""
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYER_LINEARS:
        raise unsupported(model_type)
    field, expected = _ACTIVATION[model_type]
    value = getattr(config, field, expected)
    if value != expected:
        raise _refuse(config, field, value, f"only {expected} is supported")
    for layer_type, params in rope_parameter_sets(config).items():
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            where = (
                f"rope_parameters[{layer_type!r}].rope_type" if layer_type else "rope_parameters.rope_type"
            )
            raise _refuse(config, where, rope_type, f"supported rope types: {', '.join(ROPE_TYPES)}")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        unknown = sorted({t for t in layer_types if t not in LAYER_TYPES})
        if unknown:
            raise _refuse(config, "layer_types", unknown, f"supported layer types: {', '.join(LAYER_TYPES)}")
        if len(layer_types) != int(config.num_hidden_layers):
            raise _refuse(config, "layer_types", len(layer_types), "one entry per layer expected")
    if getattr(config, "use_bidirectional_attention", None):
        raise _refuse(config, "use_bidirectional_attention", True, "only causal attention is supported")
    # Soft-capping: Gemma 2 caps attention logits and final logits, Gemma 3 the final logits only
    # (transformers' Gemma 3 attention ignores attn_logit_softcapping, so a value there is ambiguous).
    handled = {"gemma2": ("attn_logit_softcapping", "final_logit_softcapping")}
    handled["gemma3_text"] = ("final_logit_softcapping",)
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = getattr(config, cap, None)
        if value is not None and cap not in handled.get(model_type, ()):
            raise _refuse(config, cap, value, "soft-capping is not supported for this family")
    if getattr(config, "no_rope_layers", None) is not None and model_type != "smollm3":
        raise _refuse(config, "no_rope_layers", config.no_rope_layers, "NoPE layers are SmolLM3's only")
