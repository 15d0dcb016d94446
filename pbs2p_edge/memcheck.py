"""Refuse a step up front when its memory, predicted from the model's size, exceeds what is available.

The predictions are deliberately simple (bytes of fp32 tensors the step holds at once, plus a fixed allowance
for the interpreter, torch and transformers); they err on the high side of the peaks measured on SmolLM2-135M
and Qwen2.5-Coder-1.5B. Setting PBS2P_EDGE_SKIP_MEMORY_CHECK=1 skips the check (at the risk of an OOM kill).
"""

from __future__ import annotations

import os

from pbs2p_edge.errors import Pbs2pError

GIB = 1 << 30
BASE_BYTES = int(1.0 * GIB)  # python + torch + transformers + tokenizer, measured on the 135M model


def available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def process_bytes() -> int:
    """This process's resident memory (what a step that started already holds)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def fits(needed: int) -> bool:
    """Whether `needed` bytes are available (always, with PBS2P_EDGE_SKIP_MEMORY_CHECK=1)."""
    return os.environ.get("PBS2P_EDGE_SKIP_MEMORY_CHECK") == "1" or needed <= available_bytes()


def shortfall(needed: int) -> str:
    """'needs about X GiB of memory, Y GiB is available (...)': what `require` and a skipped step say."""
    return (
        f"needs about {needed / GIB:.1f} GiB of memory, {available_bytes() / GIB:.1f} GiB is available "
        "(free memory or set PBS2P_EDGE_SKIP_MEMORY_CHECK=1 to try anyway)"
    )


def require(needed: int, what: str) -> None:
    """Raise Pbs2pError naming both figures when `needed` bytes exceed the available memory."""
    if not fits(needed):
        raise Pbs2pError(f"{what} {shortfall(needed)}")


def config_params(config: object) -> tuple[int, int]:
    """(parameters of the whole model, parameters of one decoder layer) from a HF LLaMA-family config."""
    hidden = int(config.hidden_size)
    inter = int(config.intermediate_size)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    layer = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * inter + 2 * hidden
    if getattr(config, "model_type", "") == "qwen2":
        layer += head_dim * (heads + 2 * kv)  # q/k/v biases
    vocab = int(config.vocab_size)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    total = int(config.num_hidden_layers) * layer + vocab * hidden * (1 if tied else 2) + hidden
    return total, layer


def fp32_model_bytes(config: object) -> int:
    return 4 * config_params(config)[0]


def require_fp32_model(config: object, what: str) -> None:
    """Refuse loading a model in fp32 (FP eval, export baselines, rebuilding model.pt) that cannot fit.
    Families we do not support are not predicted: loading them is refused later with the supported list."""
    from pbs2p_edge.config import SUPPORTED_MODEL_TYPES

    if getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES:
        require(BASE_BYTES + fp32_model_bytes(config), what)


def fp32_export_bytes(config: object) -> int:
    """`export --format fp32`: the fp32 weights once (each projection is transposed in place of its original,
    the graph streams to disk, and PyTorch's copy is freed before ONNX Runtime loads the bundle's), plus one
    session's working memory and the largest layer transposed beside its original.
    Qwen2.5-Coder-1.5B: 8.3 GiB predicted, 7.7 GiB measured (bench/results/large-export-s5.md)."""
    total, layer = config_params(config)
    return BASE_BYTES + 4 * total + 4 * layer + int(0.5 * GIB)


def pbs2p_export_bytes(config: object) -> int:
    """`export model.pt`: the fp32 embeddings and head twice (the model's, and the stored head's dequantized
    reference during validation), 2 bytes per projection weight (the packed arrays, and the int8 ternary each
    layer is decoded to once for validation), plus 1 GiB for the graph export and ONNX Runtime sessions.
    Qwen2.5-Coder-1.5B 6:8: 7.9 GiB predicted, 7.5 GiB measured (bench/results/large-export-s5.md)."""
    total, layer = config_params(config)
    projections = int(config.num_hidden_layers) * layer
    return BASE_BYTES + 8 * (total - projections) + 2 * projections + GIB


def int4_export_bytes(config: object) -> int:
    """`export --format int4`: the fp32 embeddings and head twice (the model's, and the stored int4 head's
    dequantized reference), about a byte per projection weight (the int4 blocks and scales, one fp32 layer at
    a time while it is quantized), plus 1 GiB for the graph export and ONNX Runtime sessions.
    Qwen2.5-Coder-1.5B: 6.7 GiB predicted, 6.1 GiB measured (bench/results/large-export-s5.md)."""
    total, layer = config_params(config)
    projections = int(config.num_hidden_layers) * layer
    return BASE_BYTES + 8 * (total - projections) + projections + GIB


def eval_bytes(config: object, ctx: int) -> int:
    """PyTorch perplexity of an fp32 model: the weights + one window's logits (fp32, a few copies)."""
    return BASE_BYTES + fp32_model_bytes(config) + 3 * 4 * ctx * int(config.vocab_size)


def lowmem_e2e_bytes(config: object, micro_batch: int, seq_len: int) -> int:
    """The end-to-end pass after a low-memory compression, at its peak (the tuned values written back): fp32
    W_hat of every compressed linear (4 bytes per weight), their unpacked mask and signs (2) and the tunables'
    int8 signs (1); the rest of the model in fp32; one micro-batch's logits (x3: logits, log-softmax, gradient)
    and saved activations (about 12 hidden-size and 3 intermediate-size floats per token and layer)."""
    total, layer = config_params(config)
    n_layers = int(config.num_hidden_layers)
    hidden, inter, vocab = int(config.hidden_size), int(config.intermediate_size), int(config.vocab_size)
    compressed = n_layers * layer
    tokens = micro_batch * seq_len
    activations = 4 * tokens * n_layers * (12 * hidden + 3 * inter) + 3 * 4 * tokens * vocab
    return BASE_BYTES + 7 * compressed + 4 * (total - compressed) + activations


def compress_bytes(config: object, samples: int, seq_len: int) -> int:
    """Low-memory compression, the larger of its two phases:
    - start: the embeddings and head read in fp32 (each briefly twice while copied out of the file);
    - layer loop (embeddings and head dropped): one fp32 layer (x3: W, W_hat and the GPTQ work), the fp64
      Hessian of down_proj (x4: accumulator, damped copy, identity, inverse), the calibration activations
      (x2) and 2 bytes per compressed weight so far (mask and signs held until packing).
    Qwen2.5-Coder-1.5B, 32 x 256: 6.9 GiB predicted; 8.19 GiB measured when the loop still held the
    embeddings and head (1.74 GiB), i.e. 6.45 GiB for the loop alone."""
    total, layer = config_params(config)
    n_layers = int(config.num_hidden_layers)
    hidden, inter = int(config.hidden_size), int(config.intermediate_size)
    rest = total - n_layers * layer
    activations = 2 * 4 * samples * seq_len * max(hidden, inter)
    start = 2 * 4 * rest
    loop = 3 * 4 * layer + 4 * 8 * inter * inter + activations + 2 * n_layers * layer
    return BASE_BYTES + max(start, loop)
