"""Write a tiny HF model and its byte-level BPE tokenizer as an F32 GGUF, the way llama.cpp lays one out.

Tensor names come from the `gguf` package's own HF -> GGUF name map; the two value transforms llama.cpp
applies (and transformers' GGUF loader undoes) are applied here: LLaMA's q/k rows are permuted into the
interleaved rotary order, and Gemma stores its RMSNorm weights as (1 + w).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# HF model_type -> GGUF architecture name.
GGUF_ARCH = {"llama": "llama", "qwen3": "qwen3", "phi3": "phi3", "gemma2": "gemma2", "gemma3_text": "gemma3"}


def _permute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF's half-split rotary row order -> llama.cpp's interleaved order, per head."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _tokenizer(writer: Any, folder: Path, config: Any) -> None:
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    specials = {token["content"]: token["id"] for token in data.get("added_tokens", [])}
    vocab.update(specials)
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if token in specials else 1 for token in tokens])  # 3 = control
    writer.add_bos_token_id(int(config.bos_token_id))
    writer.add_eos_token_id(int(config.eos_token_id))
    writer.add_pad_token_id(int(config.pad_token_id))
    writer.add_unk_token_id(int(config.pad_token_id))  # the tiny tokenizer's unk is its pad token


def write_gguf(
    model: Any, tokenizer_dir: Path, path: Path, extra_tensors: dict[str, np.ndarray] | None = None
) -> Path:
    """Write `model` (+ `extra_tensors` under their GGUF names) with the tokenizer of `tokenizer_dir`."""
    import gguf

    config = model.config
    arch_name = GGUF_ARCH[config.model_type]
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch_name)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    rope = config.rope_parameters
    rope = rope.get("full_attention", rope) if "rope_type" not in rope else rope

    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
    _tokenizer(writer, tokenizer_dir, config)

    tied = bool(config.tie_word_embeddings)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(base)
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        array = tensor.detach().float().numpy().copy()
        if config.model_type.startswith("gemma") and base.endswith("norm"):
            array = array + 1.0
        if arch_name == "llama" and base.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if base.endswith("q_proj") else config.num_key_value_heads
            array = _permute_rotary_rows(array, heads)
        writer.add_tensor(f"{gguf_name}.{suffix}", array.astype(np.float32))
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, np.asarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
