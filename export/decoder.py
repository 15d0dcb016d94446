"""A functional decoder with explicit past/present tensors, built over an HF model's modules.

Same math as transformers' LlamaForCausalLM (pre-norm RMSNorm, rotary embeddings, grouped-query attention,
gated SiLU MLP) and the variants of the other families (`export/configs.py` Family and ExportConfig): q/k
RMSNorm per head (Qwen3, Gemma 3), fused qkv / gate_up projections (Phi-3), partial rotary, NoPE layers
(SmolLM3), Gemma's (1 + weight) norms, sandwich norms, scaled embeddings, GELU-tanh MLP, local sliding-window
layers with their own rotary tables and attention / final logit soft-capping. The KV cache is plain tensors
in and out, which is what the ONNX graph needs:

    forward(input_ids [B,S], attention_mask [B,P+S], position_ids [B,S], past_0_key, past_0_value, ...)
        -> (logits [B,S,V], present_0_key [B,KV,P+S,D], present_0_value, ...)

The projection modules are the HF model's own, so swapping them (export/patch.py) changes what the graph
emits for them without touching this file. Validation compares this graph against the HF model's forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.export.configs import ExportConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    scale = weight + offset if offset else weight
    return scale * (x * torch.rsqrt(variance + eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of the first cos.shape[-1] channels (all of them unless the rotary is partial)."""
    width = cos.shape[-1]
    if width == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :width], x[..., width:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


def _rope_tables(rotary: nn.Module, keys: set[str]) -> dict[str, tuple[torch.Tensor, float]]:
    """{key: (inv_freq, attention scaling)} from transformers' rotary module; per-type tables are named
    `{type}_inv_freq` (Gemma 3). inv_freq already carries the static rope scaling (linear, llama3, yarn,
    longrope's short factors)."""
    tables = {}
    for key in keys:
        prefix = f"{key}_" if key else ""
        inv_freq = getattr(rotary, f"{prefix}inv_freq", None)
        if inv_freq is None:
            raise Pbs2pError(f"the model's rotary embedding has no {prefix}inv_freq table")
        scaling = float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
        tables[key] = (inv_freq.detach().clone().float(), scaling)
    return tables


class Decoder(nn.Module):
    """Decoder graph over `hf_model`'s layers; `head` provides `embed(ids)` and `logits(hidden)`."""

    def __init__(self, hf_model: nn.Module, config: ExportConfig, head: nn.Module) -> None:
        super().__init__()
        inner = hf_model.model
        self.config = config
        self.layers = inner.layers
        self.norm = inner.norm
        self.head = head
        keys = {key for key in config.layer_rope if key is not None}
        self.rope_scale: dict[str, float] = {}
        for key, (inv_freq, scaling) in _rope_tables(inner.rotary_emb, keys).items():
            self.register_buffer(f"inv_freq_{key or 'model'}", inv_freq, persistent=False)
            self.rope_scale[key] = scaling
        self.embed_scale = math.sqrt(config.hidden_size) if config.family.embed_scale else None
        for index, layer in enumerate(self.layers):
            scaling = getattr(layer.self_attn, "scaling", config.attention_scale)
            if not math.isclose(float(scaling), config.attention_scale, rel_tol=1e-6):
                raise Pbs2pError(
                    f"layer {index}: attention scaling {scaling} differs from the config's "
                    f"{config.attention_scale} (a field that changes the math is not handled)"
                )

    def _rope(self, position_ids: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = getattr(self, f"inv_freq_{key or 'model'}")
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq  # [B, S, R/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [B, 1, S, R]
        scale = self.rope_scale[key]
        return emb.cos() * scale, emb.sin() * scale

    def _mask(
        self, attention_mask: torch.Tensor, seq_len: int, total_len: int, window: int | None = None
    ) -> torch.Tensor:
        """Additive mask [B, 1, S, P+S]: causal over cache positions (within `window` of the query for a
        sliding-window layer), and padding from attention_mask."""
        past_len = total_len - seq_len
        key_index = torch.arange(total_len, device=attention_mask.device)
        query_index = torch.arange(seq_len, device=attention_mask.device) + past_len
        causal = key_index.unsqueeze(0) <= query_index.unsqueeze(1)  # [S, T]
        if window is not None:
            causal = causal & (key_index.unsqueeze(0) > query_index.unsqueeze(1) - window)
        keep = causal.unsqueeze(0).unsqueeze(0) & attention_mask.bool().unsqueeze(1).unsqueeze(2)
        zero = torch.zeros((), dtype=torch.float32)
        blocked = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32)
        return torch.where(keep, zero, blocked)

    def _norm(self, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        return rms_norm(x, module.weight, self.config.rms_norm_eps, self.config.family.norm_offset)

    def _qkv(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        if cfg.family.fused:
            q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            return attn.qkv_proj(x).split([q_width, kv_width, kv_width], dim=-1)
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)

    def _mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.config.family.fused:
            gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if self.config.family.activation == "gelu_tanh":
            gate = nn.functional.gelu(gate, approximate="tanh")
        else:
            gate = nn.functional.silu(gate)
        return mlp.down_proj(gate * up)

    def _attention(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        attn = layer.self_attn
        batch, seq_len, _ = x.shape
        q, k, v = self._qkv(attn, x)
        q = q.reshape(batch, seq_len, cfg.num_heads, cfg.head_dim)
        k = k.reshape(batch, seq_len, cfg.num_kv_heads, cfg.head_dim)
        if cfg.family.qk_norm:
            q, k = self._norm(q, attn.q_norm), self._norm(k, attn.k_norm)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.reshape(batch, seq_len, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k = torch.cat((past_key, k), dim=2)
        v = torch.cat((past_value, v), dim=2)
        total_len = k.shape[2]
        groups = cfg.num_heads // cfg.num_kv_heads
        keys, values = k, v
        if groups > 1:
            shape = (batch, cfg.num_heads, total_len, cfg.head_dim)
            expanded = (batch, cfg.num_kv_heads, groups, total_len, cfg.head_dim)
            keys = k.unsqueeze(2).expand(expanded).reshape(shape)
            values = v.unsqueeze(2).expand(expanded).reshape(shape)
        scores = softcap(torch.matmul(q, keys.transpose(2, 3)) * cfg.attention_scale, cfg.attn_softcap) + mask
        probs = torch.softmax(scores, dim=-1)
        context = (
            torch.matmul(probs, values).transpose(1, 2).reshape(batch, seq_len, cfg.num_heads * cfg.head_dim)
        )
        return attn.o_proj(context), k, v

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cfg = self.config
        seq_len = input_ids.shape[1]
        total_len = past[0].shape[2] + seq_len
        hidden = self.head.embed(input_ids)
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
        ropes = {key: self._rope(position_ids, key) for key in self.rope_scale}
        masks = {w: self._mask(attention_mask, seq_len, total_len, w) for w in set(cfg.layer_windows)}
        if not masks:
            masks[None] = self._mask(attention_mask, seq_len, total_len)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            key = cfg.layer_rope[i] if cfg.layer_rope else ""
            window = cfg.layer_windows[i] if cfg.layer_windows else None
            rope = None if key is None else ropes[key]
            x = self._norm(hidden, layer.input_layernorm)
            out, k, v = self._attention(layer, x, rope, masks[window], past[2 * i], past[2 * i + 1])
            presents += [k, v]
            if cfg.family.sandwich_norms:
                hidden = hidden + self._norm(out, layer.post_attention_layernorm)
                x = self._norm(hidden, layer.pre_feedforward_layernorm)
                hidden = hidden + self._norm(self._mlp(layer.mlp, x), layer.post_feedforward_layernorm)
            else:
                hidden = hidden + out
                x = self._norm(hidden, layer.post_attention_layernorm)
                hidden = hidden + self._mlp(layer.mlp, x)
        hidden = self._norm(hidden, self.norm)
        return (softcap(self.head.logits(hidden), cfg.final_softcap), *presents)
