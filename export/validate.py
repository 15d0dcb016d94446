"""Run an exported graph in ONNX Runtime and compare it with the PyTorch model it came from.

Reference: the transformers model's own forward (its attention, rotary and cache code, not our decoder) with
the weights the graph holds (compressed layers as W_hat, baselines' int4 layers dequantized, the embedding
and head as stored) and the arithmetic of the kernels: the C++ SparseBinaryMatMul rounds activations to int7
per chunk of a scale group (`pbs2p_edge.format.kernel_matmul`), which PyTorch reproduces exactly
(`SparseBinaryLinear` in "kernel" mode). The comparison thus isolates what export can get wrong: graph
structure, KV cache, positions, packing, the kernels. Two effects that are there by design are reported
beside it, not gated: `vs_float_activations` (the graph against the compressed model with fp32 activations)
and `head_effect` (the stored head against the fp32 head, both in PyTorch).

Threshold: graph and reference compute the same function in fp32 and differ only by summation order, which
keeps correct exports 80+ dB apart; a real defect (a wrong sign or mask bit, a scale off, a cache or position
slip, a kernel bug) drops the SQNR to ~20 dB or below. 40 dB (error RMS 1% of the logits RMS) sits between
the two with a wide margin on both sides.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.export.configs import ExportConfig
from pbs2p_edge.export.patch import SparseBinaryLinear, eager_arithmetic

DEFAULT_THRESHOLD_DB = 40.0
DECODE_STEPS = 8
PROMPT_TEXT = (
    "The small language model runs on the edge device, and the weights are binary with sparse masks."
)
SQNR_CAP_DB = 200.0


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `test` against `reference`, in dB (capped for exact matches)."""
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    noise = float(np.sum((reference.astype(np.float64) - test.astype(np.float64)) ** 2))
    if noise == 0.0:
        return SQNR_CAP_DB
    return min(SQNR_CAP_DB, 10.0 * math.log10(max(signal, 1e-30) / noise))


def ort_session(model_path: Path, ops_library: Path | None, threads: int = 1) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if ops_library is not None:
        try:
            options.register_custom_ops_library(str(ops_library))
        except Exception as exc:
            raise Pbs2pError(f"ops library {ops_library} fails to load: {str(exc).splitlines()[0]}") from None
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise Pbs2pError(
            f"onnxruntime cannot load {model_path}: {str(exc).strip().splitlines()[0]}"
        ) from None


@contextlib.contextmanager
def reference_head(hf_model: nn.Module, embed: torch.Tensor, head: torch.Tensor) -> Iterator[None]:
    """Temporarily give the HF model the embedding and head weights the graph stores."""
    old_embed, old_head = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    new_embed = nn.Embedding(embed.shape[0], embed.shape[1], _weight=embed.detach().clone())
    new_head = nn.Linear(head.shape[1], head.shape[0], bias=False)
    new_head.weight = nn.Parameter(head.detach().clone(), requires_grad=False)
    hf_model.set_input_embeddings(new_embed)
    hf_model.set_output_embeddings(new_head)
    try:
        yield
    finally:
        hf_model.set_input_embeddings(old_embed)
        hf_model.set_output_embeddings(old_head)


def prompt_ids(tokenizer: Any, vocab_size: int, min_len: int = 12) -> list[int]:
    """A fixed natural-language prompt (padded with fixed ids if the tokenizer makes it short)."""
    ids: list[int] = []
    with contextlib.suppress(Exception):
        ids = list(tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"])
    ids = [i for i in ids if 0 <= i < vocab_size]
    rng = np.random.default_rng(0)
    while len(ids) < min_len:
        ids.append(int(rng.integers(0, vocab_size)))
    return ids


@torch.no_grad()
def torch_logits(
    hf_model: nn.Module, ids: Sequence[int], steps: int, forced: Sequence[int] | None = None
) -> tuple[list[np.ndarray], list[int]]:
    """Logits of the prefill and of `steps` decode steps through transformers' KV cache.

    Each step feeds the greedy token of the previous logits, or `forced[i]` when given (so two models can be
    compared on identical inputs). Returns (logits per step, tokens fed).
    """
    input_ids = torch.tensor([list(ids)], dtype=torch.long)
    out = hf_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True)
    logits = [out.logits[0].float().numpy()]
    cache, tokens, total = out.past_key_values, [], input_ids.shape[1]
    for step in range(steps):
        token = int(forced[step]) if forced is not None else int(logits[-1][-1].argmax())
        tokens.append(token)
        total += 1
        out = hf_model(
            input_ids=torch.tensor([[token]]),
            attention_mask=torch.ones(1, total, dtype=torch.long),
            position_ids=torch.tensor([[total - 1]]),
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logits.append(out.logits[0].float().numpy())
    return logits, tokens


def ort_logits(
    session: Any, config: ExportConfig, ids: Sequence[int], tokens: Sequence[int]
) -> list[np.ndarray]:
    """Logits of the prefill and of decode steps fed with `tokens`, through the graph's own KV cache."""
    empty = np.zeros((1, config.num_kv_heads, 0, config.head_dim), dtype=np.float32)
    past = dict.fromkeys(config.past_names(), empty)
    step_ids, total, results = list(ids), 0, []
    for token in [None, *tokens]:
        if token is not None:
            step_ids = [token]
        start = total
        total += len(step_ids)
        feeds = {
            "input_ids": np.array([step_ids], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            "position_ids": np.arange(start, total, dtype=np.int64)[None, :],
            **past,
        }
        outputs = session.run(None, feeds)
        results.append(outputs[0][0])
        past = dict(zip(config.past_names(), outputs[1:], strict=True))
    return results


def compare(reference: list[np.ndarray], test: list[np.ndarray]) -> dict[str, float]:
    ref, out = np.concatenate(reference), np.concatenate(test)
    step_sqnr = [sqnr_db(r, t) for r, t in zip(reference, test, strict=True)]
    agree = [int(np.argmax(r[-1]) == np.argmax(t[-1])) for r, t in zip(reference, test, strict=True)]
    return {
        "sqnr_db": round(sqnr_db(ref, out), 2),
        "min_step_sqnr_db": round(min(step_sqnr), 2),
        "max_abs_diff": float(np.max(np.abs(ref - out))),
        "logits_abs_max": float(np.max(np.abs(ref))),
        "top1_agreement": sum(agree) / len(agree),
    }


def validate_graph(
    model_path: Path,
    ops_library: Path | None,
    hf_model: nn.Module,
    head: nn.Module,
    config: ExportConfig,
    tokenizer: Any,
    *,
    threshold_db: float = DEFAULT_THRESHOLD_DB,
    steps: int = DECODE_STEPS,
) -> dict[str, Any]:
    """Compare the graph with the PyTorch model (prefill + `steps` decode steps); raise below the threshold."""
    ids = prompt_ids(tokenizer, config.vocab_size)
    embed_w, head_w = head.reference_weights()
    compressed = any(isinstance(m, SparseBinaryLinear) for m in hf_model.modules())
    with reference_head(hf_model, embed_w, head_w), eager_arithmetic(hf_model, "kernel"):
        reference, tokens = torch_logits(hf_model, ids, steps)
    graph = ort_logits(ort_session(model_path, ops_library), config, ids, tokens)
    result: dict[str, Any] = {
        "reference": "transformers forward with the bundle's weights and the kernels' arithmetic",
        "prompt_tokens": len(ids),
        "decode_steps": steps,
        "threshold_db": threshold_db,
        **compare(reference, graph),
    }
    # What the kernels' int7 activations change against the compressed model in fp32 (same head).
    result["vs_float_activations"] = None
    if compressed:
        with reference_head(hf_model, embed_w, head_w), eager_arithmetic(hf_model, "float"):
            float_reference, _ = torch_logits(hf_model, ids, steps, forced=tokens)
        result["vs_float_activations"] = compare(float_reference, graph)
    # The compact head's own effect: the same PyTorch model with its fp32 head against the stored head.
    result["head_effect"] = None
    if not (
        hf_model.get_input_embeddings().weight is embed_w
        and hf_model.get_output_embeddings().weight is head_w
    ):
        with eager_arithmetic(hf_model, "kernel"):
            fp32_head, _ = torch_logits(hf_model, ids, steps, forced=tokens)
        result["head_effect"] = compare(fp32_head, reference)
    if not result["sqnr_db"] >= threshold_db:
        raise Pbs2pError(
            f"validation failed: ONNX Runtime logits differ from PyTorch (SQNR {result['sqnr_db']:.1f} dB < "
            f"{threshold_db:.0f} dB, max abs diff {result['max_abs_diff']:.3g}); bundle not written "
            "(--threshold-db lowers the gate, --no-validate skips it)"
        )
    return result
