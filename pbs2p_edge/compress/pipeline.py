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
import copy
import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from pbs2p_edge.compress import cfs
from pbs2p_edge.compress.families import drop_cache, layer_kwargs, layers_differ, linear_names
from pbs2p_edge.compress.gptq import HessianAccumulator, inverse_factor, quantize_matrix
from pbs2p_edge.compress.spbo import fit_block
from pbs2p_edge.config import DEFAULT_BUDGET_BITS, SUPPORTED_MODEL_TYPES, PBS2PConfig
from pbs2p_edge.conversations import file_digest, read_conversations
from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.families import check_config

# The chat windows' seed is the block windows' plus this, so the two draws are independent.
CHAT_SEED_OFFSET = 7
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
    # module name -> MatMulNBits 4-bit entry {packed, scales, meta} for layers the bit budget keeps in int4
    nbits: dict[str, Any] = field(default_factory=dict)


class _StopForward(Exception):
    """Raised by the capture hook once decoder layer 0's inputs are recorded."""


def check_supported(model: Any) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if model_type not in SUPPORTED_MODEL_TYPES or layers is None:
        raise Pbs2pError(
            f"model type {model_type} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    check_config(model.config)
    for name in linear_names(model):
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
    e2e_ids: torch.Tensor | None = None,
) -> CompressedModel:
    """Compress the linears of every decoder layer of `model` in place; embeddings, norms, head stay dense.

    `calib_ids` is a LongTensor [samples, seq_len]. `tokenizer_files` ({filename: text}) go into the
    checkpoint; by default they are read from the folder the model was loaded from. With `store` (a
    `lowmem.LayerStore`, model from `lowmem.skeleton_model`) each decoder layer is read from disk for its
    turn and its linears dropped afterwards; the result is the same. That path has no whole model in memory,
    so the bit budget's sensitivity probe streams the layers too, and the end-to-end pass runs only with
    `config.e2e_steps` set (`compress`'s CLI sets it where its memory is available): its teacher streams the FP layers from the store, and the pass itself runs
    after the layer loop on the packed layers (`_unpacked_from_store`). `e2e_ids` are the end-to-end pass's windows
    (default: `calib_ids`; `calibration_windows` draws both).
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
    names = linear_names(model)
    start = time.perf_counter()
    with deterministic(config.seed), torch.no_grad():
        params = [sum(layer.get_submodule(n).weight.numel() for n in names) for layer in layers]
        recover_steps = config.recover_steps_for(sum(params))
        # the optional wall-time cap is split evenly over the decoder layers
        layer_cap = None if config.recover_seconds is None else config.recover_seconds / len(layers)
        layer_n, cosines, importance, budget = plan_layers(model, calib_ids, config, names, store, progress)
        cfs_seconds = time.perf_counter() - start - budget.get("probe_seconds", 0.0)
        int4_layers = set(budget.get("int4_layers", []))
        nbits: dict[str, Any] = {}
        teacher = None
        e2e_steps = config.e2e_steps_for(sum(params))
        e2e: dict[str, Any] = {}
        if e2e_steps > 0 and store is not None and config.e2e_steps is None:
            e2e = {
                "skipped": "on the low-memory path the pass runs only with config.e2e_steps set (the CLI sets it)"
            }
        elif e2e_steps > 0:
            e2e_ids = calib_ids if e2e_ids is None else e2e_ids
            teacher = _teacher(model, store, e2e_ids, config, progress)
        chunks = capture_layer_inputs(model, calib_ids, config.batch_size)
        # Local/global layers get different masks and rotary tables: replay each layer's own (families.py).
        # Recorded through the model's own forward, so before the streaming path releases the embeddings.
        layer_kwargs_by_batch = (
            layer_kwargs(model, calib_ids, config.batch_size) if layers_differ(model) else None
        )
        if store is not None:
            store.release_embeddings(model)
        fp_chunks = [hs for hs, _ in chunks] if config.recover_target == "fp_states" else []
        recovery: list[dict[str, Any]] = []
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
            if layer_kwargs_by_batch is not None:
                chunks = [(hs, layer_kwargs_by_batch[b][index]) for b, (hs, _) in enumerate(chunks)]
            if index in int4_layers:
                chunks = _keep_int4(layer, index, names, chunks, fp_chunks, nbits)
            else:
                chunks = _compress_layer(
                    layer,
                    index,
                    names,
                    layer_n[index],
                    chunks,
                    fp_chunks,
                    config,
                    weights,
                    stats,
                    (recover_steps, layer_cap),
                    recovery,
                    bar,
                )
            if store is not None and index in int4_layers:
                store.release_weights(layer, names)  # `nbits` holds them; their biases stay dense
            elif store is not None:
                store.release(index, layer, names)
                store.pack_layer(weights, index, names)
            layer_seconds.append(time.perf_counter() - t0)
        if store is not None:
            store.restore(model, names)
    if teacher is not None:
        tuned = (
            _unpacked_from_store(model, store, nbits)
            if store is not None
            else contextlib.nullcontext(weights)
        )
        with tuned as tunable:
            e2e = _recover_e2e(model, tunable, e2e_ids, teacher, config, e2e_steps, progress)
        e2e.update(
            windows=int(e2e_ids.shape[0]),
            chat_windows=chat_window_count(config),
            chat_file_sha256=config.e2e_chat_file and file_digest(config.e2e_chat_file),
            head=config.e2e_head,
            dtype=config.e2e_dtype,
            teacher_dtype=config.e2e_teacher_dtype,
        )
    packed = {name: pack(w) for name, w in weights.items()}
    if store is not None:  # finished layers were packed as they went; `weights` unpacks them on access
        packed, weights = store.packed, store.unpacked_view()
    results = summarize_results(
        config, tuple(calib_ids.shape), layer_n, cosines, importance, packed, weights, stats, nbits
    )
    results.update(
        budget=budget, projected_bundle_bytes=projected_bundle_bytes(model, results["packed_bytes"])
    )
    results.update(seconds=time.perf_counter() - start, cfs_seconds=cfs_seconds, layer_seconds=layer_seconds)
    results.update(
        recovery=recovery, e2e=e2e, recover_steps=recover_steps, recover_layer_cap_seconds=layer_cap
    )
    return CompressedModel(model, config, weights, packed, results, dict(tokenizer_files), nbits)


def plan_layers(
    model: Any,
    calib_ids: torch.Tensor,
    config: PBS2PConfig,
    names: tuple[str, ...],
    store: Any = None,
    progress: bool = False,
) -> tuple[list[int], list[float], list[float], dict[str, Any]]:
    """What the layer loop will do to each decoder layer, decided before it starts: (N per layer from CFS,
    the layer cosines and importances CFS measured, the bit budget's plan with its int4 layers). On the
    layer-streaming path (`store`) both passes read one layer at a time."""
    params = [sum(layer.get_submodule(n).weight.numel() for n in names) for layer in model.model.layers]
    cosines: list[float] = []
    importance: list[float] = []
    if config.cfs:
        cfs_ids = calib_ids[: config.cfs_samples]
        if store is not None:
            from pbs2p_edge.compress.lowmem import layer_cosines_streaming

            cosines = layer_cosines_streaming(model, store, cfs_ids, config.batch_size, progress)
        else:
            cosines = layer_cosines(model, cfs_ids, config.batch_size)
        importance = cfs.importance_from_cosine(cosines)
        layer_n = cfs.allocate(
            importance, params, config.n, config.cfs_n_low, config.cfs_n_high, config.cfs_delta
        )
    else:
        layer_n = [config.n] * len(params)
    budget = _plan_budget(model, calib_ids, layer_n, config, progress, names, store) if config.budget else {}
    return layer_n, cosines, importance, budget


def _keep_int4(
    layer: Any,
    index: int,
    names: tuple[str, ...],
    chunks: list[tuple[torch.Tensor, dict[str, Any]]],
    fp_chunks: list[torch.Tensor],
    nbits: dict[str, Any],
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """A layer the bit budget keeps in int4 (MatMulNBits): quantize its linears, return the next inputs."""
    from pbs2p_edge.compress.budget import int4_linear

    fp_layer = copy.deepcopy(layer) if fp_chunks else None
    for name in names:
        nbits[f"model.layers.{index}.{name}"] = int4_linear(layer.get_submodule(name))
    if fp_layer is not None:
        fp_chunks[:] = [_run_layer(fp_layer, hs, kw) for hs, (_, kw) in zip(fp_chunks, chunks, strict=True)]
    return [(_run_layer(layer, hs, kwargs), kwargs) for hs, kwargs in chunks]


def _compress_layer(
    layer: Any,
    index: int,
    names: tuple[str, ...],
    n: int,
    chunks: list[tuple[torch.Tensor, dict[str, Any]]],
    fp_chunks: list[torch.Tensor],
    config: PBS2PConfig,
    weights: dict[str, Any],
    stats: dict[str, Any],
    budget: tuple[int, float | None],
    recovery: list[dict[str, Any]],
    bar: Any,
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Compress one decoder layer's linears (then block-wise recovery if on: `budget` = (steps, optional
    wall-time cap in seconds)); return the next inputs."""
    hessians = _collect_hessians(layer, chunks, names)
    fp_layer = copy.deepcopy(layer) if budget[0] > 0 else None
    for name in names:
        full = f"model.layers.{index}.{name}"
        weights[full], stats[full] = compress_linear(layer.get_submodule(name), hessians[name], n, config)
    del hessians
    if fp_layer is None:
        return [(_run_layer(layer, hs, kwargs), kwargs) for hs, kwargs in chunks]
    local = {name: weights[f"model.layers.{index}.{name}"] for name in names}
    done, outs = _recover(layer, fp_layer, local, chunks, fp_chunks, config, budget)
    recovery.append(done)
    bar.set_postfix(N=n, err=f"{done['before']:.3f}->{done['after']:.3f}")
    return [(out, kwargs) for out, (_, kwargs) in zip(outs, chunks, strict=True)]


def _plan_budget(
    model: Any,
    calib_ids: torch.Tensor,
    layer_n: list[int],
    config: PBS2PConfig,
    progress: bool,
    names: tuple[str, ...] = LINEAR_NAMES,
    store: Any = None,
) -> dict[str, Any]:
    """Bits of the pattern, per-layer sensitivity probe (layers read from `store` on the streaming path), and
    the layers the budget keeps in int4."""
    from pbs2p_edge.compress import budget as b

    t0 = time.perf_counter()
    packed, int4, weights = b.layer_bits(model, names, layer_n, config)
    budget_bits = config.budget_bits if config.budget_bits is not None else DEFAULT_BUDGET_BITS
    pattern = sum(packed) / sum(weights)
    if config.budget_bits is None and pattern >= budget_bits:
        return {"budget_bits": budget_bits, "pattern_bits": pattern, "int4_layers": [], "sensitivity": []}
    b.check_budget(budget_bits, packed, weights)
    probe = calib_ids[: config.budget_probe_samples, : config.budget_probe_len]
    sensitivity = b.layer_sensitivity(
        model, probe, names, config.n, config.m, config.group_size, progress, store
    )
    chosen = b.choose_int4_layers(sensitivity, packed, int4, weights, budget_bits)
    return {
        "budget_bits": budget_bits,
        "pattern_bits": pattern,
        "sensitivity": sensitivity,
        "int4_layers": chosen,
        "probe_seconds": time.perf_counter() - t0,
    }


def _recover(
    layer: Any,
    fp_layer: Any,
    weights: dict[str, Any],
    chunks: list[tuple[torch.Tensor, dict[str, Any]]],
    fp_chunks: list[torch.Tensor],
    config: PBS2PConfig,
    budget: tuple[int, float | None],
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Block-wise recovery of one layer against the FP layer's outputs (targets per `recover_target`)."""
    from pbs2p_edge.compress.recover import recover_layer

    if config.recover_target == "fp_states":
        targets = [
            _run_layer(fp_layer, hs, kwargs) for hs, (_, kwargs) in zip(fp_chunks, chunks, strict=True)
        ]
        fp_chunks[:] = targets
    else:
        targets = [_run_layer(fp_layer, hs, kwargs) for hs, kwargs in chunks]
    return recover_layer(
        layer,
        weights,
        chunks,
        targets,
        steps=budget[0],
        lr=config.recover_lr,
        micro_batch=config.recover_micro_batch,
        seed=config.seed,
        seconds=budget[1],
    )


def _teacher(
    model: Any, store: Any, ids: torch.Tensor, config: PBS2PConfig, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP model's top-k log-probs over the end-to-end windows, before any layer is compressed."""
    if store is not None:
        from pbs2p_edge.compress.lowmem import teacher_topk_streaming

        return teacher_topk_streaming(
            model, store, ids, config.e2e_topk, config.e2e_micro_batch, progress, config.e2e_teacher_dtype
        )
    from pbs2p_edge.compress.recover import teacher_topk

    return teacher_topk(
        model, ids, config.e2e_topk, config.e2e_micro_batch, progress, config.e2e_teacher_dtype
    )


@contextlib.contextmanager
def _unpacked_from_store(model: Any, store: Any, nbits: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The end-to-end pass on the low-memory path, after the layer loop: the packed layers unpacked and their
    W_hat materialized (the whole model in fp32 again, plus 3 bytes per compressed weight while tuning), to be
    tuned exactly as on the in-memory path; the bit budget's int4 layers get their dequantized weights (frozen,
    as in memory). Then the packed layers are packed again, and all of them dropped back to meta."""
    from pbs2p_edge.compress.lowmem import (
        drop_compressed,
        drop_weight,
        materialize_compressed,
        materialize_nbits,
    )
    from pbs2p_edge.format import pack, unpack

    weights = {name: unpack(p) for name, p in store.packed.items()}
    materialize_compressed(model, weights)
    materialize_nbits(model, nbits)
    try:
        yield weights
        store.packed = {name: pack(w) for name, w in weights.items()}
    finally:
        drop_compressed(model, list(weights))
        for name in nbits:
            drop_weight(model.get_submodule(name))


def _recover_e2e(
    model: Any,
    weights: dict[str, Any],
    calib_ids: torch.Tensor,
    teacher: tuple[torch.Tensor, torch.Tensor],
    config: PBS2PConfig,
    total: int,
    progress: bool,
) -> dict[str, Any]:
    from pbs2p_edge.compress.head import deployed_head
    from pbs2p_edge.compress.recover import recover_e2e

    with (
        tqdm(total=total, desc="recover end-to-end", unit="step", disable=not progress) as bar,
        deployed_head(model, config.e2e_head),
    ):

        def tick(done: int) -> None:
            bar.update(done - bar.n)

        return recover_e2e(
            model,
            weights,
            calib_ids,
            teacher,
            steps=total,
            lr=config.e2e_lr,
            micro_batch=config.e2e_micro_batch,
            seed=config.seed,
            seconds=config.e2e_seconds,
            progress=tick,
            schedule=config.e2e_schedule,
            check_samples=config.calib_samples,
            dtype=config.e2e_dtype,
        )


def calibration_windows(
    tokenizer: Any, config: PBS2PConfig, text_path: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block-stage windows, end-to-end windows). One seeded draw of max(calib_samples, e2e_samples) plain
    windows, so the block stages get the same `calib_samples` windows whatever the E2E settings are. The E2E
    windows are the first plain ones followed by the chat-formatted share (`config.e2e_chat`, resolved by
    `resolve_e2e_chat`), so the keep-or-revert check runs on the block stages' windows."""
    from pbs2p_edge import sources

    drawn = sources.calibration_ids(
        tokenizer, max(config.calib_samples, config.e2e_samples), config.calib_len, config.seed, text_path
    )
    chat = chat_window_count(config)
    e2e = drawn[: config.e2e_samples - chat]
    if chat:
        pool = None if config.e2e_chat_file is None else read_conversations(config.e2e_chat_file)
        extra = sources.chat_calibration_ids(
            tokenizer, chat, config.calib_len, config.seed + CHAT_SEED_OFFSET, pool
        )
        e2e = torch.cat([e2e, extra])
    return drawn[: config.calib_samples], e2e


def chat_window_count(config: PBS2PConfig) -> int:
    return round((config.e2e_chat or 0.0) * config.e2e_samples)


def resolve_e2e_chat(config: PBS2PConfig, tokenizer: Any, text_path: Any = None) -> PBS2PConfig:
    """`config` with its chat share fixed for this tokenizer and calibration text (recorded in the checkpoint)."""
    from pbs2p_edge import sources

    share = config.e2e_chat_share(sources.has_chat_template(tokenizer), text_path is None)
    return replace(config, e2e_chat=share)


def compress_linear(
    linear: torch.nn.Linear, hessian: HessianAccumulator, n: int, config: PBS2PConfig
) -> tuple[Any, dict[str, Any]]:
    """Compress one linear in place: returns (SparseBinaryWeight, stats); linear.weight becomes W_hat."""
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
    bias = linear.bias.detach().float().numpy().copy() if linear.bias is not None else None
    kwargs = {"rc_mu": config.rc_mu, "x_iters": config.x_iters, "rc_iters": config.arb_iters}
    tried: dict[str, dict[str, float]] = {}
    if config.salient_search:
        # One pass at the largest S probes every candidate S on the same block states; then the pass at the
        # chosen S (reused when it is the largest).
        candidates = salient_candidates(config)
        r = quantize_matrix(
            w, u, fit, config.group_size, config.salient, config.binarizer, probe=tuple(candidates), **kwargs
        )
        for count in candidates:
            bits = packed_bits(linear, n, config, count)
            score = salient_score(r.probe_losses[count], bits, config.salient_rate)
            tried[str(count)] = {"loss": r.probe_losses[count], "bits": bits, "score": score}
        chosen = min(candidates, key=lambda c: (tried[str(c)]["score"], c))
        if chosen != config.salient:
            r = quantize_matrix(w, u, fit, config.group_size, chosen, config.binarizer, **kwargs)
    else:
        r = quantize_matrix(w, u, fit, config.group_size, config.salient, config.binarizer, **kwargs)
    sbw = _to_weight(r, n, config, bias)
    w_hat = torch.from_numpy(sbw.dense()).to(linear.weight.dtype)
    original = linear.weight.detach().float()
    rel_error = float((original - w_hat.float()).norm() / original.norm().clamp_min(1e-12))
    linear.weight.data.copy_(w_hat)
    return sbw, {
        "n": n,
        "rel_error": rel_error,
        "loss": r.loss,
        "step_errors": r.step_errors,
        "salient": sbw.salient,
        "salient_tried": tried,
        "seconds": time.perf_counter() - t0,
    }


def salient_candidates(config: PBS2PConfig) -> list[int]:
    """S values tried per layer: the fixed S, or with the search 0, 1, 2, 3, 4, 6, 8, ... up to the maximum."""
    if not config.salient_search:
        return [config.salient]
    values = {0, config.salient}
    step = 1
    while step < config.salient:
        values.add(step)
        step = step + 1 if step < 4 else step * 3 // 2
    return sorted(v for v in values if v <= config.salient)


def salient_score(loss: float, bits: float, rate: float) -> float:
    """Search objective: log2 of the GPTQ loss plus `rate` per stored bit per weight (rate 2 = one bit must
    at least quarter the error, the rate-distortion slope of a Gaussian source)."""
    return math.log2(max(loss, 1e-300)) + rate * bits


def packed_bits(linear: torch.nn.Linear, n: int, config: PBS2PConfig, salient: int) -> float:
    """Stored bits per weight of `linear` packed with `salient` columns per group (sizes only)."""
    import numpy as np

    from pbs2p_edge.compress.blockq import uses_col_scales
    from pbs2p_edge.format import SparseBinaryWeight, pack

    rows, k = linear.weight.shape
    groups = -(-k // config.group_size)
    mask = np.zeros((rows, k // config.m, config.m), dtype=bool)
    mask[..., :n] = True
    starts = np.arange(groups)[:, None] * config.group_size
    weight = SparseBinaryWeight(
        n=n,
        m=config.m,
        group_size=config.group_size,
        mask=mask.reshape(rows, k),
        signs=np.zeros((rows, k), dtype=bool),
        alpha=np.zeros((rows, groups), np.float32),
        mu=np.zeros((rows, groups), np.float32),
        salient_cols=starts + np.arange(salient)[None, :] if salient else None,
        salient_signs=np.zeros((rows, groups, salient), dtype=bool) if salient else None,
        alpha2=np.zeros((rows, groups), np.float32) if salient else None,
        bias=None if linear.bias is None else np.zeros(rows, np.float32),
        col_scales=np.ones(k, np.float32) if uses_col_scales(config.binarizer) else None,
    )
    return 8 * pack(weight).nbytes / (rows * k)


def _to_weight(r: Any, n: int, config: PBS2PConfig, bias: Any) -> Any:
    from pbs2p_edge.format import SparseBinaryWeight

    extra = {} if r.col_scales is None else {"col_scales": r.col_scales.numpy()}
    return SparseBinaryWeight(
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
        **extra,
    )


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
        drop_cache(kwargs)
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
    layer: Any, chunks: list[tuple[torch.Tensor, dict[str, Any]]], names: tuple[str, ...] = LINEAR_NAMES
) -> dict[str, HessianAccumulator]:
    accumulators = {name: HessianAccumulator(layer.get_submodule(name).in_features) for name in names}
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


def summarize_results(
    config: PBS2PConfig,
    calib_shape: tuple[int, ...],
    layer_n: list[int],
    cosines: list[float],
    importance: list[float],
    packed: dict[str, Any],
    weights: dict[str, Any],
    stats: dict[str, Any],
    nbits: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from pbs2p_edge.compress.budget import nbits_bytes

    nbits = nbits or {}
    int4_weights = sum(int(e["meta"][2]) * int(e["scales"].shape[0]) for e in nbits.values())
    int4_bits = sum(8 * nbits_bytes(e) for e in nbits.values())
    n_weights = sum(int(w.mask.size) for w in weights.values()) + int4_weights
    stored_bits = sum(8 * int(p.nbytes) for p in packed.values()) + int4_bits
    # Paper-style: only the signs of kept weights (+ the salient second sign plane); no mask, no scales.
    sign_bits = sum(int(w.mask.sum()) for w in weights.values()) + 4 * int4_weights
    for w in weights.values():
        if w.salient_signs is not None:
            sign_bits += int(w.mask[:, w.salient_cols.reshape(-1)].sum())
    # The stored mask costs 1 bit per weight; an entropy-coded N:M mask would need log2(C(M, N)) / M.
    coded_bits = int4_bits + sum(
        8 * (int(p.nbytes) - int(p.arrays["mask"].nbytes))
        + w.mask.size * math.log2(math.comb(w.m, w.n)) / w.m
        for p, w in ((packed[name], weights[name]) for name in weights)
    )
    return {
        "method": config.method,
        "nm": config.nm,
        "binarizer": config.binarizer,
        "salient_per_linear": [w.salient for w in weights.values()],
        "layer_n": layer_n,
        "layer_cosine": cosines,
        "layer_importance": importance,
        "average_n": sum(n * p for n, p in zip(layer_n, _layer_params(weights, len(layer_n)), strict=True))
        / max(n_weights, 1),
        "compressed_weights": n_weights,
        "packed_bytes": stored_bits // 8,
        "int4_linears": sorted(nbits),
        "bits_per_weight": stored_bits / max(n_weights, 1),
        "bits_per_weight_paper_style": sign_bits / max(n_weights, 1),
        "bits_per_weight_mask_coded": coded_bits / max(n_weights, 1),
        "calibration": {"samples": int(calib_shape[0]), "seq_len": int(calib_shape[1])},
        "layers": stats,
    }


def projected_bundle_bytes(model: Any, linear_bytes: int) -> int:
    """Weight bytes of the default PBS2P bundle: the compressed linears as stored, the embedding/head in
    MatMulNBits int4 (blocks of 32, fp32 scales; a tied matrix once), every other tensor (norms) in fp32."""
    from pbs2p_edge.compress.budget import int4_bits

    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    matrices = [embed] if head is None or head.data_ptr() == embed.data_ptr() else [embed, head]
    head_bytes = sum(int4_bits(int(w.shape[0]), int(w.shape[1])) // 8 for w in matrices)
    skip = {id(w) for w in matrices}
    linears = {
        id(p) for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()
    }
    rest = sum(4 * p.numel() for p in model.parameters() if id(p) not in skip and id(p) not in linears)
    return int(linear_bytes + head_bytes + rest)


def _layer_params(weights: dict[str, Any], n_layers: int) -> list[int]:
    params = [0] * n_layers
    for name, w in weights.items():
        params[int(name.split(".")[2])] += int(w.mask.size)
    # (int4 layers have no packed weights; their N does not enter the average)
    return params
