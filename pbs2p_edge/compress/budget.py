"""Bit budget: spend bits above what the N:M pattern needs on the decoder layers where they buy the most.

The spending option is a whole decoder layer kept in ONNX Runtime's 4-bit `MatMulNBits` format (symmetric
blocks of 32, fp32 scales: 5.0 bits per weight, quantized by onnxruntime's own quantizer, the int4 baseline's
format). Which layers: a probe measures each layer's sensitivity before compression, as the increase of the
mean next-token loss on calibration sequences when only that layer's 7 linears are replaced by a quick
binarization (magnitude N:M mask, per row and group alpha, mu; no compensation), on `budget_probe_samples`
sequences of `budget_probe_len` tokens (default 2 x 128: the probe costs about half a forward pass per layer,
and runs layer by layer, so the layer-streaming path of large models has it too); layers are then taken
greedily by sensitivity per extra stored bit while the total stays within the budget.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pbs2p_edge.errors import Pbs2pError

INT4_BITS = 4
INT4_BLOCK = 32


def int4_bits(rows: int, k: int) -> int:
    """Stored bits of one linear in MatMulNBits 4-bit: packed nibbles + one fp32 scale per block of 32."""
    blocks = -(-k // INT4_BLOCK)
    return rows * blocks * (INT4_BLOCK * INT4_BITS + 32)


def quick_binarize(w: torch.Tensor, n: int, m: int, group_size: int) -> torch.Tensor:
    """Magnitude N:M mask + per row and group (alpha, mu) = (mean |w - mu|, mean w) over kept entries."""
    rows, k = w.shape
    runs = w.abs().reshape(rows, k // m, m)
    order = runs.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)
    keep = (order < n).reshape(rows, k).float()
    out = torch.zeros_like(w)
    for start in range(0, k, group_size):
        blk, kb = w[:, start : start + group_size], keep[:, start : start + group_size]
        count = kb.sum(1, keepdim=True).clamp_min(1)
        mu = (blk * kb).sum(1, keepdim=True) / count
        alpha = ((blk - mu).abs() * kb).sum(1, keepdim=True) / count
        out[:, start : start + group_size] = kb * (alpha * torch.where(blk >= mu, 1.0, -1.0) + mu)
    return out


def _loss_from_states(model: Any, states: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token loss of `ids` given the last decoder layer's outputs (the model's own final norm and
    head, with any family-specific step such as Gemma's logit soft-capping)."""
    from pbs2p_edge.compress.lowmem import logits_from_final_states

    logits = logits_from_final_states(model, ids, states).float()
    return float(
        torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
    )


def layer_sensitivity(
    model: Any,
    ids: torch.Tensor,
    names: tuple[str, ...],
    n: int,
    m: int,
    group_size: int,
    progress: bool = False,
    store: Any = None,
) -> list[float]:
    """Loss increase per decoder layer when only that layer is quick-binarized (FP model, `ids` sequences).

    One pass over the layers, each visited once (so `store`, a `lowmem.LayerStore`, can read it from disk for
    its turn, as on the layer-streaming path): layer l starts branch l from the FP hidden states, binarized, and
    carries every earlier branch one layer on. The branches are hidden states of the probe's few sequences
    (about 2 x 128 x hidden floats each), so probing costs L (L + 1) / 2 layer calls and no copy of the model.
    """
    from tqdm.auto import tqdm

    from pbs2p_edge.compress.families import layer_kwargs, layers_differ
    from pbs2p_edge.compress.pipeline import _run_layer, capture_layer_inputs

    layers = model.model.layers
    with torch.no_grad():
        ((fp, kwargs),) = capture_layer_inputs(model, ids, ids.shape[0])
        per_layer = layer_kwargs(model, ids, ids.shape[0])[0] if layers_differ(model) else None
        branches: list[torch.Tensor] = []
        bar = tqdm(
            list(enumerate(layers)), desc="budget: layer sensitivity", unit="layer", disable=not progress
        )
        for index, layer in bar:
            if store is not None:
                store.load(index, layer)
            args = per_layer[index] if per_layer else kwargs
            branches = [_run_layer(layer, h, args) for h in branches]
            saved = {}
            for name in names:
                linear = layer.get_submodule(name)
                saved[name] = linear.weight.data.clone()
                linear.weight.data.copy_(quick_binarize(saved[name].float(), n, m, group_size))
            branches.append(_run_layer(layer, fp, args))
            for name in names:
                layer.get_submodule(name).weight.data.copy_(saved[name])
            fp = _run_layer(layer, fp, args)
            if store is not None:
                layer.to("meta")
        base = _loss_from_states(model, fp, ids)
        return [_loss_from_states(model, h, ids) - base for h in branches]


def layer_bits(
    model: Any, names: tuple[str, ...], layer_n: list[int], config: Any
) -> tuple[list[int], list[int], list[int]]:
    """(packed bits, int4 bits, weights) per decoder layer for the chosen per-layer N (packed sizes at the
    configured salient count: with the salient search this is the largest S, an upper bound)."""
    from pbs2p_edge.compress.pipeline import packed_bits

    packed, int4, weights = [], [], []
    cache: dict[tuple[int, int, int], int] = {}
    for index, layer in enumerate(model.model.layers):
        p = q = w = 0
        for name in names:
            linear = layer.get_submodule(name)
            rows, k = linear.weight.shape
            key = (rows, k, layer_n[index])
            if key not in cache:
                per_weight = packed_bits(linear, layer_n[index], config, config.salient)
                cache[key] = round(per_weight * rows * k)
            p += cache[key]
            q += int4_bits(rows, k)
            w += rows * k
        packed.append(p)
        int4.append(q)
        weights.append(w)
    return packed, int4, weights


def check_budget(budget_bits: float, packed: list[int], weights: list[int]) -> None:
    base = sum(packed) / sum(weights)
    if budget_bits + 1e-9 < base:
        raise Pbs2pError(
            f"--budget-bits {budget_bits:g} is below the {base:.3f} bits/weight the N:M pattern itself stores"
        )


def choose_int4_layers(
    sensitivity: list[float], packed: list[int], int4: list[int], weights: list[int], budget_bits: float
) -> list[int]:
    """Greedy: layers by sensitivity per extra bit, while the total stays <= budget_bits * all weights."""
    check_budget(budget_bits, packed, weights)
    total = sum(weights)
    room = budget_bits * total - sum(packed)
    extra = [q - p for p, q in zip(packed, int4, strict=True)]
    order = sorted(range(len(sensitivity)), key=lambda i: -sensitivity[i] / max(extra[i], 1))
    chosen = []
    for i in order:
        if extra[i] > room:
            continue
        chosen.append(i)
        room -= extra[i]
    return sorted(chosen)


def int4_linear(linear: torch.nn.Linear) -> dict[str, Any]:
    """Quantize one linear to MatMulNBits 4-bit (onnxruntime's quantizer); its weight becomes the dequantized
    values. Returns the checkpoint entry {packed, scales, meta=[bits, block_size, k]}."""
    entry, dequantized = int4_entry(linear.weight.detach())
    linear.weight.data.copy_(dequantized)
    return entry


def int4_entry(weight: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """(checkpoint `nbits` entry, dequantized fp32 weight) of `weight` [rows, K] in MatMulNBits 4-bit."""
    from pbs2p_edge.export.nbits import quantize_rows

    q = quantize_rows(weight.float().numpy(), INT4_BITS, INT4_BLOCK)
    entry = {
        "packed": torch.from_numpy(np.ascontiguousarray(q.packed)),
        "scales": torch.from_numpy(np.ascontiguousarray(q.scales)),
        "meta": torch.tensor([q.bits, q.block_size, q.k], dtype=torch.int64),
    }
    return entry, torch.from_numpy(q.dequantize())


def nbits_bytes(entry: dict[str, Any]) -> int:
    return int(entry["packed"].numel() * entry["packed"].element_size()) + int(
        entry["scales"].numel() * entry["scales"].element_size()
    )
