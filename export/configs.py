"""Per-architecture export configuration: which modules hold what, and the shapes of the exported graph.

The exporter does not trace transformers' own forward (its cache objects do not export cleanly); it runs a
functional decoder (`export/decoder.py`) over the weights of the HF model, so each supported family only has
to say where its weights live and which variant of the LLaMA block it uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pbs2p_edge.errors import Pbs2pError

# Projection module names inside one decoder layer, in the order they run.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """What differs between LLaMA-like families for the functional decoder."""

    genai_type: str  # onnxruntime-genai "model.type"
    activations: tuple[str, ...] = ("silu",)


# LLaMA-shaped decoders: pre-norm RMSNorm, rotary attention with grouped KV heads, gated MLP. Qwen2's q/k/v
# biases are carried by the linear modules themselves, so the same decoder serves it.
FAMILIES: dict[str, Family] = {
    "llama": Family(genai_type="llama"),
    "mistral": Family(genai_type="mistral"),
    "qwen2": Family(genai_type="qwen2"),
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


def export_config(hf_config: Any) -> ExportConfig:
    """Build the export config from a transformers config object; refuse families we cannot export."""
    model_type = getattr(hf_config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        supported = ", ".join(sorted(FAMILIES))
        raise Pbs2pError(f"cannot export model type {model_type!r} (supported: {supported})")
    activation = getattr(hf_config, "hidden_act", "silu")
    if activation not in family.activations:
        raise Pbs2pError(f"cannot export {model_type} with activation {activation!r}")
    context_length = int(getattr(hf_config, "max_position_embeddings", 2048))
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True):
        # The graph attends to the whole cache. Up to `window` tokens that is exactly sliding-window attention,
        # so the bundle declares that as its context and the runtime never goes past it.
        context_length = min(context_length, int(window))
    heads = int(hf_config.num_attention_heads)
    hidden = int(hf_config.hidden_size)
    head_dim = int(getattr(hf_config, "head_dim", None) or hidden // heads)
    return ExportConfig(
        model_type=model_type,
        family=family,
        num_layers=int(hf_config.num_hidden_layers),
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
    )
