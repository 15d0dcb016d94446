"""Per-architecture export configuration: which modules hold what, and the shapes of the exported graph.

The exporter does not trace transformers' own forward (its cache objects do not export cleanly); it runs a
functional decoder (`export/decoder.py`) over the weights of the HF model, so each supported family only has
to say where its weights live and which variant of the LLaMA block it uses. Config features are checked
first by `pbs2p_edge.families.check_config` (anything we do not reproduce is refused, naming the field).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.families import check_config, rope_parameter_sets

# Projection module names inside one decoder layer, in the order they run.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """What differs between LLaMA-like families for the functional decoder."""

    genai_type: str  # onnxruntime-genai "model.type"
    activation: str = "silu"  # of the gated MLP: "silu" or "gelu_tanh"
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight); Gemma stores weight - 1
    sandwich_norms: bool = False  # Gemma: norms after attention and MLP too (post_attention_layernorm,
    # pre_feedforward_layernorm, post_feedforward_layernorm)
    qk_norm: bool = False  # per-head RMSNorm of q and k (q_norm / k_norm) before the rotary embedding
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(hidden_size)
    fused: bool = False  # Phi-3: qkv_proj and gate_up_proj


# LLaMA-shaped decoders: pre-norm RMSNorm, rotary attention with grouped KV heads, gated MLP. Qwen2's q/k/v
# biases are carried by the linear modules themselves, so the same decoder serves it. SmolLM3's NoPE layers
# and Gemma's local/global layers are per-layer settings of ExportConfig.
_GEMMA = Family(genai_type="", activation="gelu_tanh", norm_offset=1.0, sandwich_norms=True, embed_scale=True)
FAMILIES: dict[str, Family] = {
    "llama": Family(genai_type="llama"),
    "mistral": Family(genai_type="mistral"),
    "qwen2": Family(genai_type="qwen2"),
    "qwen3": Family(genai_type="qwen3", qk_norm=True),
    "gemma2": dataclasses.replace(_GEMMA, genai_type="gemma2"),
    "gemma3_text": dataclasses.replace(_GEMMA, genai_type="gemma3_text", qk_norm=True),
    "phi3": Family(genai_type="phi3", fused=True),
    "smollm3": Family(genai_type="smollm3"),
}


@dataclass(frozen=True)
class ExportConfig:
    """Everything the graph and the bundle need to know about one model."""

    model_type: str
    family: Family
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    context_length: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    # Per layer: the sliding window (None = global attention) and the rotary table ("" = the model's one,
    # a layer type for per-type tables as in Gemma 3, None = no rotary embedding, SmolLM3's NoPE layers).
    layer_windows: tuple[int | None, ...] = ()
    layer_rope: tuple[str | None, ...] = ()
    attention_scale: float = (
        0.0  # query scaling before softmax (head_dim**-0.5, Gemma: query_pre_attn_scalar)
    )
    attn_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    final_softcap: float | None = None

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.past_names()]

    def output_names(self) -> list[str]:
        return ["logits", *self.present_names()]


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _layer_windows(hf_config: Any, num_layers: int) -> tuple[int | None, ...]:
    """The sliding window of each layer as transformers' masks apply it (None = global attention)."""
    window = getattr(hf_config, "sliding_window", None)
    window = int(window) if window else None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    if not getattr(hf_config, "use_sliding_window", True):
        window = None
    return (window,) * num_layers


def _layer_rope(hf_config: Any, num_layers: int) -> tuple[str | None, ...]:
    sets = rope_parameter_sets(hf_config)
    layer_types = getattr(hf_config, "layer_types", None) or ["full_attention"] * num_layers
    keys = [kind if kind in sets else "" for kind in layer_types]
    for key in keys:
        if key not in sets:
            raise Pbs2pError(f"{hf_config.model_type}: no rope_parameters for layer type {key!r}")
    no_rope = getattr(hf_config, "no_rope_layers", None)  # SmolLM3: 1 = rotary, 0 = NoPE
    if no_rope is not None:
        keys = [key if int(use) else None for key, use in zip(keys, no_rope, strict=True)]
    return tuple(keys)


def _rope_context(hf_config: Any, context_length: int) -> int:
    """LongRoPE switches to its long factors past its original context: the bundle stops there."""
    for params in rope_parameter_sets(hf_config).values():
        if params.get("rope_type") == "longrope":
            original = params.get("original_max_position_embeddings") or getattr(
                hf_config, "original_max_position_embeddings", context_length
            )
            context_length = min(context_length, int(original))
    return context_length


def export_config(hf_config: Any) -> ExportConfig:
    """Build the export config from a transformers config object; refuse families we cannot export."""
    model_type = getattr(hf_config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        supported = ", ".join(sorted(FAMILIES))
        raise Pbs2pError(f"cannot export model type {model_type!r} (supported: {supported})")
    check_config(hf_config)
    num_layers = int(hf_config.num_hidden_layers)
    context_length = _rope_context(hf_config, int(getattr(hf_config, "max_position_embeddings", 2048)))
    windows = _layer_windows(hf_config, num_layers)
    if windows and all(w is not None for w in windows):
        # Every layer slides. The graph attends to the whole cache: up to `window` tokens that is exactly
        # sliding-window attention, so the bundle declares that as its context and the runtime never goes past
        # it. Mixed local/global layers (Gemma) mask each local layer to its window instead.
        context_length = min(context_length, min(w for w in windows if w is not None))
        windows = (None,) * num_layers
    heads = int(hf_config.num_attention_heads)
    hidden = int(hf_config.hidden_size)
    head_dim = int(getattr(hf_config, "head_dim", None) or hidden // heads)
    scalar = getattr(hf_config, "query_pre_attn_scalar", None)  # Gemma: scores scaled by 1/sqrt(scalar)
    return ExportConfig(
        model_type=model_type,
        family=family,
        num_layers=num_layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(getattr(hf_config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        intermediate_size=int(hf_config.intermediate_size),
        vocab_size=int(hf_config.vocab_size),
        rms_norm_eps=float(hf_config.rms_norm_eps),
        context_length=context_length,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        bos_token_id=getattr(hf_config, "bos_token_id", None),
        eos_token_ids=_ids(getattr(hf_config, "eos_token_id", None)),
        pad_token_id=getattr(hf_config, "pad_token_id", None),
        layer_windows=windows,
        layer_rope=_layer_rope(hf_config, num_layers),
        attention_scale=float(scalar) ** -0.5 if scalar else head_dim**-0.5,
        attn_softcap=getattr(hf_config, "attn_logit_softcapping", None) if model_type == "gemma2" else None,
        final_softcap=getattr(hf_config, "final_logit_softcapping", None),
    )
