"""Sequential layer-by-layer compression of a LLaMA-family causal LM.

1. (CFS on) one dense pass over `cfs_samples` calibration sequences measures each decoder layer's
   input/output cosine similarity and allocates a per-layer N.
2. The inputs of decoder layer 0 are captured (with the keyword arguments the model passes: rotary
   embeddings, mask) and cached on CPU.
3. For each decoder layer: a forward pass with hooks accumulates the Hessian of each of the 7 linears'
   inputs; each linear is compressed (SPBO + GPTQ compensation) into a SparseBinaryWeight and its weight
   replaced by the format's own `dense()` reconstruction (fp16 scales, exactly what gets deployed); a
   second pass through the compressed layer produces the next layer's inputs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from pbs2p_edge.compress import cfs
from pbs2p_edge.compress.gptq import HessianAccumulator, inverse_factor, quantize_matrix
from pbs2p_edge.compress.spbo import fit_block
from pbs2p_edge.config import SUPPORTED_MODEL_TYPES, PBS2PConfig
from pbs2p_edge.errors import Pbs2pError

LINEAR_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass
class CompressedModel:
    """The compressed model (weights = W_hat), its packed linears and everything measured on the way."""

    model: Any
    config: PBS2PConfig
    weights: dict[str, Any]  # module name -> pbs2p_edge.format.SparseBinaryWeight
    packed: dict[str, Any]  # module name -> pbs2p_edge.format.PackedWeight
    results: dict[str, Any]
    tokenizer_files: dict[str, str] = field(default_factory=dict)


class _StopForward(Exception):
    """Raised by the capture hook once decoder layer 0's inputs are recorded."""


def check_supported(model: Any) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if model_type not in SUPPORTED_MODEL_TYPES or layers is None:
        raise Pbs2pError(
            f"model type {model_type} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    for name in LINEAR_NAMES:
        if not isinstance(layers[0].get_submodule(name), torch.nn.Linear):
            raise Pbs2pError(f"model type {model_type}: {name} is not a plain Linear, cannot compress it")


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def compress(
    model: Any,
    config: PBS2PConfig,
    calib_ids: torch.Tensor,
    *,
    tokenizer_files: dict[str, str] | None = None,
    progress: bool = True,
    store: Any = None,
) -> CompressedModel:
    """Compress the 7 linears of every decoder layer of `model` in place; embeddings, norms, head stay dense.

    `calib_ids` is a LongTensor [samples, seq_len]. `tokenizer_files` ({filename: text}) go into the
    checkpoint; by default they are read from the folder the model was loaded from. With `store` (a
    `lowmem.LayerStore`, model from `lowmem.skeleton_model`) each decoder layer is read from disk for its
    turn and its linears dropped afterwards; the result is the same.
    """
    from pbs2p_edge.format import pack

    check_supported(model)
    if calib_ids.dim() != 2 or calib_ids.shape[0] < 1 or calib_ids.shape[1] < 2:
        raise Pbs2pError(f"calibration ids must be [samples, seq_len >= 2], got {list(calib_ids.shape)}")
    if tokenizer_files is None:
        from pbs2p_edge.checkpoint import read_tokenizer_files

        tokenizer_files = read_tokenizer_files(getattr(model.config, "_name_or_path", "") or "")
    model.float().eval()
    layers = model.model.layers
    start = time.perf_counter()
    with deterministic(config.seed), torch.no_grad():
        params = [sum(layer.get_submodule(n).weight.numel() for n in LINEAR_NAMES) for layer in layers]
        cosines: list[float] = []
        importance: list[float] = []
        if config.cfs:
            if store is not None:
                from pbs2p_edge.compress.lowmem import layer_cosines_streaming

                cfs_ids = calib_ids[: config.cfs_samples]
                cosines = layer_cosines_streaming(model, store, cfs_ids, config.batch_size, progress)
            else:
                cosines = layer_cosines(model, calib_ids[: config.cfs_samples], config.batch_size)
            importance = cfs.importance_from_cosine(cosines)
            layer_n = cfs.allocate(
                importance, params, config.n, config.cfs_n_low, config.cfs_n_high, config.cfs_delta
            )
        else:
            layer_n = [config.n] * len(layers)
        cfs_seconds = time.perf_counter() - start
        chunks = capture_layer_inputs(model, calib_ids, config.batch_size)
        if store is not None:
            store.release_embeddings(model)
        weights: dict[str, Any] = {}
        stats: dict[str, Any] = {}
        layer_seconds: list[float] = []
        bar = tqdm(
            list(enumerate(layers)),
            desc=f"compress {config.method} {config.nm}",
            unit="layer",
            disable=not progress,
        )
        for index, layer in bar:
            bar.set_postfix(N=layer_n[index])
            t0 = time.perf_counter()
            if store is not None:
                store.load(index, layer)
            hessians = _collect_hessians(layer, chunks)
            for name in LINEAR_NAMES:
                full = f"model.layers.{index}.{name}"
                linear = layer.get_submodule(name)
                weights[full], stats[full] = compress_linear(linear, hessians[name], layer_n[index], config)
            del hessians
            chunks = [(_run_layer(layer, hs, kwargs), kwargs) for hs, kwargs in chunks]
            if store is not None:
                store.release(index, layer, LINEAR_NAMES)
                store.pack_layer(weights, index, LINEAR_NAMES)
            layer_seconds.append(time.perf_counter() - t0)
        if store is not None:
            store.restore(model, LINEAR_NAMES)
    packed = {name: pack(w) for name, w in weights.items()}
    if store is not None:  # finished layers were packed as they went; `weights` unpacks them on access
        packed, weights = store.packed, store.unpacked_view()
    results = _summarize(config, calib_ids, layer_n, cosines, importance, packed, weights, stats)
    results.update(seconds=time.perf_counter() - start, cfs_seconds=cfs_seconds, layer_seconds=layer_seconds)
    return CompressedModel(model, config, weights, packed, results, dict(tokenizer_files))


def compress_linear(
    linear: torch.nn.Linear, hessian: HessianAccumulator, n: int, config: PBS2PConfig
) -> tuple[Any, dict[str, Any]]:
    """Compress one linear in place: returns (SparseBinaryWeight, stats); linear.weight becomes W_hat."""
    from pbs2p_edge.format import SparseBinaryWeight

    t0 = time.perf_counter()
    w = linear.weight.detach().float().clone()
    u, dead = inverse_factor(hessian.hessian(), config.damping)
    w[:, dead] = 0.0
    fit = functools.partial(
        fit_block,
        n=n,
        m=config.m,
        steps=config.steps_for(n),
        iters=config.arb_iters,
        progressive=config.method == "pbs2p",
        rescore=config.rescore,
        metric=config.prune_metric,
    )
    r = quantize_matrix(w, u, fit, config.group_size, config.salient)
    bias = linear.bias.detach().float().numpy().copy() if linear.bias is not None else None
    sbw = SparseBinaryWeight(
        n=n,
        m=config.m,
        group_size=config.group_size,
        mask=r.keep.numpy(),
        signs=r.signs.numpy(),
        alpha=r.alpha.numpy(),
        mu=r.mu.numpy(),
        salient_cols=None if r.salient_cols is None else r.salient_cols.numpy(),
        salient_signs=None if r.salient_signs is None else r.salient_signs.numpy(),
        alpha2=None if r.alpha2 is None else r.alpha2.numpy(),
        bias=bias,
    )
    w_hat = torch.from_numpy(sbw.dense()).to(linear.weight.dtype)
    original = linear.weight.detach().float()
    rel_error = float((original - w_hat.float()).norm() / original.norm().clamp_min(1e-12))
    linear.weight.data.copy_(w_hat)
    return sbw, {
        "n": n,
        "rel_error": rel_error,
        "loss": r.loss,
        "step_errors": r.step_errors,
        "seconds": time.perf_counter() - t0,
    }


def _run_layer(layer: Any, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def capture_layer_inputs(
    model: Any, calib_ids: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Run the model up to decoder layer 0 for each batch; return its (hidden_states, kwargs) per batch."""
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs["use_cache"] = False
        kwargs["past_key_values"] = None
        captured.append((hidden.detach().cpu(), kwargs))
        raise _StopForward

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calib_ids.split(batch_size):
            with contextlib.suppress(_StopForward):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return captured


def _collect_hessians(
    layer: Any, chunks: list[tuple[torch.Tensor, dict[str, Any]]]
) -> dict[str, HessianAccumulator]:
    accumulators = {name: HessianAccumulator(layer.get_submodule(name).in_features) for name in LINEAR_NAMES}
    handles = []
    for name, acc in accumulators.items():

        def hook(_m: Any, args: tuple[Any, ...], _out: Any, acc: HessianAccumulator = acc) -> None:
            acc.add(args[0])

        handles.append(layer.get_submodule(name).register_forward_hook(hook))
    try:
        for hidden, kwargs in chunks:
            _run_layer(layer, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


def layer_cosines(model: Any, calib_ids: torch.Tensor, batch_size: int) -> list[float]:
    """Mean cosine similarity between each decoder layer's input and output hidden states (dense model)."""
    layers = model.model.layers
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)
    handles = []
    for index, layer in enumerate(layers):

        def hook(
            _m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, index: int = index
        ) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            out = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(hidden.float(), out.float(), dim=-1)
            sums[index] += float(cos.sum())
            counts[index] += cos.numel()

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        for batch in calib_ids.split(batch_size):
            model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [s / max(c, 1) for s, c in zip(sums, counts, strict=True)]


def _summarize(
    config: PBS2PConfig,
    calib_ids: torch.Tensor,
    layer_n: list[int],
    cosines: list[float],
    importance: list[float],
    packed: dict[str, Any],
    weights: dict[str, Any],
    stats: dict[str, Any],
) -> dict[str, Any]:
    n_weights = sum(int(w.mask.size) for w in weights.values())
    stored_bits = sum(8 * int(p.nbytes) for p in packed.values())
    # Paper-style: only the signs of kept weights (+ the salient second sign plane); no mask, no scales.
    sign_bits = sum(int(w.mask.sum()) for w in weights.values())
    for w in weights.values():
        if w.salient_signs is not None:
            sign_bits += int(w.mask[:, w.salient_cols.reshape(-1)].sum())
    # The stored mask costs 1 bit per weight; an entropy-coded N:M mask would need log2(C(M, N)) / M.
    coded_bits = sum(
        8 * (int(p.nbytes) - int(p.arrays["mask"].nbytes))
        + w.mask.size * math.log2(math.comb(w.m, w.n)) / w.m
        for p, w in ((packed[name], weights[name]) for name in weights)
    )
    return {
        "method": config.method,
        "nm": config.nm,
        "layer_n": layer_n,
        "layer_cosine": cosines,
        "layer_importance": importance,
        "average_n": sum(n * p for n, p in zip(layer_n, _layer_params(weights, len(layer_n)), strict=True))
        / max(n_weights, 1),
        "compressed_weights": n_weights,
        "packed_bytes": stored_bits // 8,
        "bits_per_weight": stored_bits / max(n_weights, 1),
        "bits_per_weight_paper_style": sign_bits / max(n_weights, 1),
        "bits_per_weight_mask_coded": coded_bits / max(n_weights, 1),
        "calibration": {"samples": int(calib_ids.shape[0]), "seq_len": int(calib_ids.shape[1])},
        "layers": stats,
    }


def _layer_params(weights: dict[str, Any], n_layers: int) -> list[int]:
    params = [0] * n_layers
    for name, w in weights.items():
        params[int(name.split(".")[2])] += int(w.mask.size)
    return params
