"""Run an exported graph in ONNX Runtime and compare it with the PyTorch model it came from.

Reference: the transformers model's own forward (its attention, rotary and cache code, not our decoder) with
the weights the graph holds (compressed layers as W_hat, baselines' int4 layers dequantized, the embedding
and head as stored) and the arithmetic of the kernels: the C++ SparseBinaryMatMul rounds activations to int7
per chunk of a scale group (`pbs2p_edge.format.kernel_matmul`), which PyTorch reproduces exactly
(`SparseBinaryLinear` in "kernel" mode). The graph runs a prefill and 8 decode steps through its KV cache,
fed a fixed continuation; PyTorch computes the same positions in one causal pass over prompt + continuation
(no cache: each layer's weights are read once per run, which keeps a 1.5B model's validation to minutes, and
the graph's cache handling is checked against a computation that has none).

What is gated: for a graph without custom nodes (the fp32 / int4 baselines), the free-running logits. For a
compressed graph, the teacher-forced checks of `export/forcing.py` (every custom node, the float code between
nodes, and the logits, each on identical inputs): free-running logits of a binarized model are not a stable
quantity (int7 rounding ties flip on 1e-7 differences and the flips compound over the layers), so they are
reported beside the PyTorch model's own sensitivity (`noise_floor`: PyTorch against itself with 1e-6
relative noise on the embeddings) instead of gated. Also reported, not gated: `vs_float_activations` (the
kernels' arithmetic against fp32 activations, both in PyTorch) and `head_effect` (stored head against the
fp32 head).

Threshold: on identical inputs, graph and PyTorch compute the same function in fp32 and differ by summation
order, which keeps a correct export 80+ dB apart (the fp32 baseline: 119 dB); a real defect (a wrong sign or
mask bit, a scale off, a cache or position slip, a kernel bug) drops the SQNR of the layer where it happens to
~20 dB or below. 40 dB (error RMS 1% of the signal RMS) sits between the two with a wide margin on each side.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pbs2p_edge.compress.families import CACHE_KWARGS
from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.export import forcing
from pbs2p_edge.export.configs import ExportConfig
from pbs2p_edge.export.patch import SparseBinaryLinear, decoded_once, eager_arithmetic, forget_decoded

DEFAULT_THRESHOLD_DB = 40.0
DECODE_STEPS = 8
PROMPT_TEXT = (
    "The small language model runs on the edge device, and the weights are binary with sparse masks."
)
# Fed to the decode steps (teacher forcing on text: the same tokens for the graph and PyTorch).
CONTINUATION_TEXT = " Each layer keeps six of every eight weights, one bit and a shared scale per group."
SQNR_CAP_DB = 200.0
# Relative noise on the embeddings for `noise_floor`: ten times float32's rounding, far below any defect.
NOISE_FLOOR_RELATIVE = 1e-6


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
def reference_head(
    hf_model: nn.Module,
    embed: torch.Tensor,
    head: torch.Tensor,
    head_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[None]:
    """Temporarily give the HF model the embedding and head weights the graph stores.

    The weights are swapped inside the model's own modules, so a family's embedding module (Gemma's scales
    its output by sqrt(hidden)) keeps computing what it computes. No clones: these weights are only read,
    and a large vocabulary makes each copy a GiB. `head_input` (a head module's `reference_input`) rewrites
    the head's input as the graph's head node rounds it (MatMulNBits' int8 activations).
    """
    embed_module, head_module = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    saved = embed_module.weight, head_module.weight
    embed_module.weight = nn.Parameter(embed.detach(), requires_grad=False)
    head_module.weight = nn.Parameter(head.detach(), requires_grad=False)
    handle = None
    if head_input is not None:
        handle = head_module.register_forward_pre_hook(lambda _m, args: (head_input(args[0]), *args[1:]))
    try:
        yield
    finally:
        embed_module.weight, head_module.weight = saved
        if handle is not None:
            handle.remove()


def prompt_ids(tokenizer: Any, vocab_size: int, min_len: int = 12, text: str = PROMPT_TEXT) -> list[int]:
    """A fixed natural-language prompt (padded with fixed ids if the tokenizer makes it short)."""
    ids: list[int] = []
    with contextlib.suppress(Exception):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = [i for i in ids if 0 <= i < vocab_size]
    rng = np.random.default_rng(0)
    while len(ids) < min_len:
        ids.append(int(rng.integers(0, vocab_size)))
    return ids


def continuation_ids(tokenizer: Any, vocab_size: int, steps: int) -> list[int]:
    """The `steps` tokens the decode steps are fed: the start of a fixed text."""
    return prompt_ids(tokenizer, vocab_size, steps, CONTINUATION_TEXT)[:steps]


@torch.no_grad()
def torch_sequence_logits(hf_model: nn.Module, ids: Sequence[int], tokens: Sequence[int]) -> list[np.ndarray]:
    """The logits `ort_logits(..., ids, tokens)` returns (prefill rows, then one row per decode step), from one
    causal pass of transformers' forward over ids + tokens, without a cache."""
    sequence = torch.tensor([[*ids, *tokens]], dtype=torch.long)
    out = hf_model(input_ids=sequence, attention_mask=torch.ones_like(sequence), use_cache=False)
    logits = out.logits[0].float().numpy()
    n = len(ids)
    return [logits[:n], *(logits[n + i : n + i + 1] for i in range(len(tokens)))]


@torch.no_grad()
def torch_logits(
    hf_model: nn.Module, ids: Sequence[int], steps: int, forced: Sequence[int] | None = None
) -> tuple[list[np.ndarray], list[int]]:
    """Logits of the prefill and of `steps` decode steps through transformers' KV cache.

    Each step feeds the greedy token of the previous logits, or `forced[i]` when given (so two models can be
    compared on identical inputs). Returns (logits per step, tokens fed).
    """
    # The KV cache argument and output field under the name this model's forward takes (transformers 5.x renamed
    # `past_key_values` to `cache`; the old name warns, and goes in 5.40).
    params = inspect.signature(hf_model.forward).parameters
    name = next((key for key in CACHE_KWARGS if key in params), CACHE_KWARGS[-1])
    input_ids = torch.tensor([list(ids)], dtype=torch.long)
    out = hf_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True)
    logits = [out.logits[0].float().numpy()]
    cache, tokens, total = out[name], [], input_ids.shape[1]
    for step in range(steps):
        token = int(forced[step]) if forced is not None else int(logits[-1][-1].argmax())
        tokens.append(token)
        total += 1
        out = hf_model(
            input_ids=torch.tensor([[token]]),
            attention_mask=torch.ones(1, total, dtype=torch.long),
            position_ids=torch.tensor([[total - 1]]),
            use_cache=True,
            **{name: cache},
        )
        cache = out[name]
        logits.append(out.logits[0].float().numpy())
    return logits, tokens


def ort_logits(
    session: Any, config: ExportConfig, ids: Sequence[int], tokens: Sequence[int]
) -> list[np.ndarray]:
    """Logits of the prefill and of decode steps fed with `tokens`, through the graph's own KV cache."""
    return forcing.ort_steps(session, config, ids, tokens)[0]


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


def _top_line(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("sqnr_db", "min_step_sqnr_db", "max_abs_diff", "logits_abs_max", "top1_agreement")
    return {key: result[key] for key in keys}


@contextlib.contextmanager
def perturbed_embeddings(hf_model: nn.Module, relative: float, seed: int = 0) -> Iterator[None]:
    """Multiply the embedding output by (1 + relative * N(0, 1)) noise, seeded, while active."""
    generator = torch.Generator().manual_seed(seed)

    def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(output.shape, generator=generator, dtype=output.dtype)
        return output * (1.0 + relative * noise)

    handle = hf_model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def teacher_forced(
    model_path: Path,
    ops_library: Path | None,
    hf_model: nn.Module,
    config: ExportConfig,
    ids: Sequence[int],
    tokens: Sequence[int],
) -> dict[str, Any]:
    """The checks of `export/forcing.py`: logits, every custom node, and the code between nodes.

    Call with the reference head and the kernel arithmetic active on `hf_model`.
    """
    path, taps = forcing.instrument(model_path)
    try:
        session = ort_session(path, ops_library)
        graph, values = forcing.ort_steps(session, config, ids, tokens, forcing.tapped_values(taps))
        del session
    finally:
        path.unlink(missing_ok=True)
    modules = forcing.match_layers(taps, hf_model)
    with forcing.forced_outputs(modules, taps, values) as records:
        reference = torch_sequence_logits(hf_model, ids, tokens)
    nodes = forcing.node_records(records, taps, values)
    ops_sqnr, ops_layer = forcing.worst_layer(nodes, "kernel_out", "graph_out")
    wiring_sqnr, wiring_layer = forcing.worst_layer(records, "torch_in", "graph_in")
    return {
        **compare(reference, graph),
        "custom_nodes": len({tap.node for tap in taps if not tap.nbits}),
        "custom_layers": sum(not tap.nbits for tap in taps),
        "forced_int4_layers": sum(tap.nbits for tap in taps),
        "ops_min_sqnr_db": ops_sqnr,
        "ops_worst_layer": ops_layer,
        "wiring_min_sqnr_db": wiring_sqnr,
        "wiring_worst_layer": wiring_layer,
    }


def _gate(result: dict[str, Any], threshold_db: float) -> None:
    forced = result["teacher_forced"]
    checks = [("logits", result["sqnr_db"], None)]
    if forced is not None:
        checks += [
            ("custom node output", forced["ops_min_sqnr_db"], forced["ops_worst_layer"]),
            ("custom node input", forced["wiring_min_sqnr_db"], forced["wiring_worst_layer"]),
        ]
    for what, value, layer in checks:
        if not value >= threshold_db:
            where = f" at {layer}" if layer else ""
            raise Pbs2pError(
                f"validation failed: {what}{where}, ONNX Runtime vs PyTorch SQNR {value:.1f} dB < "
                f"{threshold_db:.0f} dB (max abs logits diff {result['max_abs_diff']:.3g}); bundle not written "
                "(--threshold-db lowers the gate, --no-validate skips it)"
            )


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
    release: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Compare the graph with the PyTorch model (prefill + `steps` decode steps); raise below the threshold.

    PyTorch runs the whole sequence up to 5 times (reference, noise floor, teacher-forced, fp32 activations,
    fp32 head); each compressed layer decodes its packed weight once for all of them (`decoded_once`, 1 byte
    per weight). Every PyTorch run comes before the last ONNX Runtime session, and `release` (if given) is
    called in between: it may free the PyTorch model's weights, so the two copies of a large fp32 model never
    share the memory."""
    with decoded_once(hf_model):
        return _validate(
            model_path, ops_library, hf_model, head, config, tokenizer, threshold_db, steps, release
        )


def _validate(
    model_path: Path,
    ops_library: Path | None,
    hf_model: nn.Module,
    head: nn.Module,
    config: ExportConfig,
    tokenizer: Any,
    threshold_db: float,
    steps: int,
    release: Callable[[], None] | None,
) -> dict[str, Any]:
    ids = prompt_ids(tokenizer, config.vocab_size)
    tokens = continuation_ids(tokenizer, config.vocab_size, steps)
    embed_w, head_w = head.reference_weights()
    head_input = getattr(head, "reference_input", None)
    compressed = any(isinstance(m, SparseBinaryLinear) for m in hf_model.modules())
    forced = noise_floor = None
    with reference_head(hf_model, embed_w, head_w, head_input), eager_arithmetic(hf_model, "kernel"):
        reference = torch_sequence_logits(hf_model, ids, tokens)
        if compressed:
            with perturbed_embeddings(hf_model, NOISE_FLOOR_RELATIVE):
                noisy = torch_sequence_logits(hf_model, ids, tokens)
            noise_floor = compare(reference, noisy)
            forced = teacher_forced(model_path, ops_library, hf_model, config, ids, tokens)
    # What the kernels' int7 activations change against the compressed model in fp32 (same head, PyTorch).
    vs_float = None
    if compressed:
        with reference_head(hf_model, embed_w, head_w, head_input), eager_arithmetic(hf_model, "float"):
            float_reference = torch_sequence_logits(hf_model, ids, tokens)
        vs_float = compare(float_reference, reference)
    # The compact head's own effect: the same PyTorch model with its fp32 head against the stored head.
    head_effect = None
    if not (
        hf_model.get_input_embeddings().weight is embed_w
        and hf_model.get_output_embeddings().weight is head_w
    ):
        with eager_arithmetic(hf_model, "kernel"):
            fp32_head = torch_sequence_logits(hf_model, ids, tokens)
        head_effect = compare(fp32_head, reference)
    del embed_w, head_w
    forget_decoded(hf_model)
    if release is not None:  # PyTorch is done: its weights may go before ONNX Runtime loads the graph's
        release()
    free_running = compare(reference, ort_logits(ort_session(model_path, ops_library), config, ids, tokens))
    result: dict[str, Any] = {
        "reference": "transformers forward with the bundle's weights and the kernels' arithmetic",
        "gated": "teacher_forced" if compressed else "free_running",
        "prompt_tokens": len(ids),
        "decode_steps": steps,
        "threshold_db": threshold_db,
        **_top_line(forced if forced is not None else free_running),
        "teacher_forced": forced,
        "free_running": free_running,
        "noise_floor": noise_floor,
        "vs_float_activations": vs_float,
        "head_effect": head_effect,
    }
    _gate(result, threshold_db)
    return result
