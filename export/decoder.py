"""A functional LLaMA-family decoder with explicit past/present tensors, built over an HF model's modules.

Same math as transformers' LlamaForCausalLM (pre-norm RMSNorm, rotary embeddings, grouped-query attention,
gated SiLU MLP), but the KV cache is plain tensors in and out, which is what the ONNX graph needs:

    forward(input_ids [B,S], attention_mask [B,P+S], position_ids [B,S], past_0_key, past_0_value, ...)
        -> (logits [B,S,V], present_0_key [B,KV,P+S,D], present_0_value, ...)

The projection modules are the HF model's own, so swapping them (export/patch.py) changes what the graph
emits for them without touching this file. Validation compares this graph against the HF model's forward.
"""

from __future__ import annotations

import torch
from torch import nn

from pbs2p_edge.export.configs import ExportConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Decoder(nn.Module):
    """Decoder graph over `hf_model`'s layers; `head` provides `embed(ids)` and `logits(hidden)`."""

    def __init__(self, hf_model: nn.Module, config: ExportConfig, head: nn.Module) -> None:
        super().__init__()
        inner = hf_model.model
        self.config = config
        self.layers = inner.layers
        self.norm = inner.norm
        self.head = head
        rotary = inner.rotary_emb
        # inv_freq already carries the rope scaling of the config (default, linear, llama3).
        self.register_buffer("inv_freq", rotary.inv_freq.detach().clone().float(), persistent=False)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))

    def _rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * self.inv_freq  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [B, 1, S, D]
        return emb.cos() * self.rope_scale, emb.sin() * self.rope_scale

    def _mask(self, attention_mask: torch.Tensor, seq_len: int, total_len: int) -> torch.Tensor:
        """Additive mask [B, 1, S, P+S]: causal over cache positions, and padding from attention_mask."""
        past_len = total_len - seq_len
        key_index = torch.arange(total_len, device=attention_mask.device)
        query_index = torch.arange(seq_len, device=attention_mask.device) + past_len
        causal = key_index.unsqueeze(0) <= query_index.unsqueeze(1)  # [S, T]
        keep = causal.unsqueeze(0).unsqueeze(0) & attention_mask.bool().unsqueeze(1).unsqueeze(2)
        zero = torch.zeros((), dtype=torch.float32)
        blocked = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32)
        return torch.where(keep, zero, blocked)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cfg = self.config
        batch, seq_len = input_ids.shape
        groups = cfg.num_heads // cfg.num_kv_heads
        total_len = past[0].shape[2] + seq_len
        hidden = self.head.embed(input_ids)
        cos, sin = self._rope(position_ids)
        mask = self._mask(attention_mask, seq_len, total_len)
        scale = cfg.head_dim**-0.5
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = rms_norm(hidden, layer.input_layernorm.weight, cfg.rms_norm_eps)
            q = attn.q_proj(x).reshape(batch, seq_len, cfg.num_heads, cfg.head_dim).transpose(1, 2)
            k = attn.k_proj(x).reshape(batch, seq_len, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
            v = attn.v_proj(x).reshape(batch, seq_len, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k = torch.cat((past[2 * i], k), dim=2)
            v = torch.cat((past[2 * i + 1], v), dim=2)
            presents += [k, v]
            if groups > 1:
                shape = (batch, cfg.num_heads, total_len, cfg.head_dim)
                k = (
                    k.unsqueeze(2)
                    .expand(batch, cfg.num_kv_heads, groups, total_len, cfg.head_dim)
                    .reshape(shape)
                )
                v = (
                    v.unsqueeze(2)
                    .expand(batch, cfg.num_kv_heads, groups, total_len, cfg.head_dim)
                    .reshape(shape)
                )
            scores = torch.matmul(q, k.transpose(2, 3)) * scale + mask
            probs = torch.softmax(scores, dim=-1)
            context = (
                torch.matmul(probs, v).transpose(1, 2).reshape(batch, seq_len, cfg.num_heads * cfg.head_dim)
            )
            hidden = hidden + attn.o_proj(context)
            x = rms_norm(hidden, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
            hidden = hidden + mlp.down_proj(nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        hidden = rms_norm(hidden, self.norm.weight, cfg.rms_norm_eps)
        return (self.head.logits(hidden), *presents)
