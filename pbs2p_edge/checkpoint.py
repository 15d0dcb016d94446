"""The compressed checkpoint `model.pt` (docs/ARCHITECTURE.md section 2): save, safe load, rebuild.

A plain dict of tensors and JSON-like values, so `torch.load(weights_only=True)` reads it without running
any pickled code:
    {"format": "pbs2p-edge-checkpoint", "version": 1, "model_config": {...}, "tokenizer": {file: text},
     "compression": {PBS2PConfig fields..., "results": {...}},
     "dense_state": {name: tensor}, "packed": {linear name: {array name: tensor}},
     "nbits": {linear name: {"packed": uint8, "scales": float32, "meta": int64 [bits, block_size, K]}}}
Version 2 added "nbits" (layers the bit budget keeps in ONNX Runtime's MatMulNBits 4-bit format); version 1
checkpoints (no "nbits") still load, with no such layers.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

from pbs2p_edge.config import SUPPORTED_MODEL_TYPES
from pbs2p_edge.errors import Pbs2pError, atomic_path

FORMAT = "pbs2p-edge-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
# Text files a Hugging Face tokenizer may need (binary sentencepiece models are not carried).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_REQUIRED = {
    "model_config": dict,
    "tokenizer": dict,
    "compression": dict,
    "dense_state": dict,
    "packed": dict,
}


def read_tokenizer_files(folder: str | os.PathLike) -> dict[str, str]:
    """{filename: text} of the tokenizer files present in `folder` (empty if it is not a folder)."""
    if not folder or not Path(folder).is_dir():
        return {}
    files = {}
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            files[name] = path.read_text(encoding="utf-8")
    return files


def checkpoint_dict(compressed: Any) -> dict[str, Any]:
    """The checkpoint of a `CompressedModel` as a plain dict (what `save_checkpoint` writes)."""
    import torch

    model = compressed.model
    replaced = set()
    for name in compressed.packed:
        replaced.update({f"{name}.weight", f"{name}.bias"})
    nbits = dict(getattr(compressed, "nbits", {}) or {})
    replaced.update(f"{name}.weight" for name in nbits)  # their bias (if any) stays in dense_state
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    dense = {
        key: _own_storage(value.detach())
        for key, value in model.state_dict().items()
        if key not in replaced and not (tied and key == "lm_head.weight")
    }
    packed = {
        name: {key: torch.from_numpy(_contiguous(array)) for key, array in p.arrays.items()}
        for name, p in compressed.packed.items()
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        "model_config": json.loads(model.config.to_json_string(use_diff=False)),
        "tokenizer": dict(compressed.tokenizer_files),
        "compression": {**compressed.config.to_dict(), "results": _plain(compressed.results)},
        "dense_state": dense,
        "packed": packed,
        "nbits": {name: {key: t.clone().contiguous() for key, t in e.items()} for name, e in nbits.items()},
    }


def save_checkpoint(compressed: Any, path: str | os.PathLike) -> Path:
    """Write `compressed` to `path` atomically (temporary sibling, then rename)."""
    import torch

    if not compressed.tokenizer_files:
        raise Pbs2pError("the compressed model has no tokenizer files; the checkpoint would not be usable")
    data = checkpoint_dict(compressed)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a checkpoint without executing pickled code; every failure is one Pbs2pError line."""
    import torch

    p = Path(path)
    if not p.exists():
        raise Pbs2pError(f"checkpoint {p} does not exist")
    if not p.is_file():
        raise Pbs2pError(f"checkpoint {p} is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # foreign pickles trigger protocol warnings before the refusal
            data = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise Pbs2pError(f"refusing {p}: it contains pickled objects other than plain data") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        raise Pbs2pError(f"checkpoint {p} is truncated or corrupt ({_first_line(exc)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise Pbs2pError(f"{p} is not a pbs2p-edge checkpoint")
    if data.get("version") not in READABLE_VERSIONS:
        raise Pbs2pError(
            f"checkpoint {p} has version {data.get('version')!r}; this pbs2p-edge reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if data.get("version") == 1:
        data.setdefault("nbits", {})
    if not isinstance(data.get("nbits"), dict):
        raise Pbs2pError(f"checkpoint {p} is damaged: 'nbits' is missing or not a dict")
    for key, kind in _REQUIRED.items():
        if not isinstance(data.get(key), kind):
            raise Pbs2pError(f"checkpoint {p} is damaged: {key!r} is missing or not a {kind.__name__}")
    return data


def packed_layers(ckpt: dict[str, Any]) -> dict[str, Any]:
    """{linear module name: pbs2p_edge.format.PackedWeight} (validated by PackedWeight.from_arrays)."""
    from pbs2p_edge.format import PackedWeight

    return {
        name: PackedWeight.from_arrays({key: tensor.numpy() for key, tensor in arrays.items()})
        for name, arrays in ckpt["packed"].items()
    }


def nbits_layers(ckpt: dict[str, Any]) -> dict[str, Any]:
    """{linear module name: pbs2p_edge.export.nbits.BlockQuantized} of the layers kept in MatMulNBits."""
    return {name: nbits_quantized(name, entry) for name, entry in (ckpt.get("nbits") or {}).items()}


def nbits_quantized(name: str, entry: dict[str, Any]) -> Any:
    """One `nbits` entry ({packed, scales, meta}) as a checked BlockQuantized."""
    from pbs2p_edge.export.nbits import BlockQuantized

    try:
        bits, block, k = (int(v) for v in entry["meta"].tolist())
        packed, scales = entry["packed"].numpy(), entry["scales"].numpy()
    except (KeyError, AttributeError, TypeError, ValueError):
        raise Pbs2pError(f"checkpoint n-bit layer {name} is damaged") from None
    rows, blocks = scales.shape if scales.ndim == 2 else (0, 0)
    if bits != 4 or packed.shape != (rows, blocks, block * bits // 8) or blocks * block < k or rows < 1:
        raise Pbs2pError(f"checkpoint n-bit layer {name} is damaged (shapes do not match its meta)")
    return BlockQuantized(packed=packed, scales=scales, bits=bits, block_size=block, k=k)


def build_model(ckpt: dict[str, Any], dense_linears: bool = True) -> tuple[Any, Any]:
    """(causal LM in fp32 with the W_hat weights of the packed layers, tokenizer from the embedded files).

    `dense_linears=False` leaves the packed layers' weights on the meta device (biases are loaded): for the
    exporter, whose modules compute W_hat from the packed arrays when they need it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pbs2p_edge.format import unpack

    settings = dict(ckpt["model_config"])
    model_type = settings.pop("model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise Pbs2pError(
            f"model type {model_type} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    from pbs2p_edge import memcheck

    try:
        config = AutoConfig.for_model(model_type, **settings)
        # On the meta device: no random fp32 copy of the model beside the weights assigned below.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    except Exception as exc:
        raise Pbs2pError(f"checkpoint model config cannot be built: {_first_line(exc)}") from None
    if dense_linears:
        memcheck.require_fp32_model(config, "rebuilding the compressed model in fp32")
    state = {
        key: value.float() if value.is_floating_point() else value
        for key, value in ckpt["dense_state"].items()
    }
    for name, packed in packed_layers(ckpt).items():
        if not dense_linears:  # the bias only: no need to unpack the layer
            if packed.has_bias:
                state[f"{name}.bias"] = torch.from_numpy(packed.arrays["bias"].astype("float32"))
            continue
        weight = unpack(packed)
        state[f"{name}.weight"] = torch.from_numpy(weight.dense())
        if weight.bias is not None:
            state[f"{name}.bias"] = torch.from_numpy(weight.bias.astype("float32"))
    for name, quantized in nbits_layers(ckpt).items():
        state[f"{name}.weight"] = torch.from_numpy(quantized.dequantize())
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        missing = [key for key in missing if key != "lm_head.weight"]
    if not dense_linears:
        missing = [key for key in missing if key.removesuffix(".weight") not in ckpt["packed"]]
    if missing or unexpected:
        raise Pbs2pError(
            f"checkpoint weights do not match the model config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    from pbs2p_edge.compress.lowmem import rebuild_computed_buffers

    rebuild_computed_buffers(model)
    return model, tokenizer_from_files(ckpt["tokenizer"])


def tokenizer_from_files(files: dict[str, str]) -> Any:
    from transformers import AutoTokenizer

    if "tokenizer.json" not in files and "vocab.json" not in files:
        raise Pbs2pError("checkpoint carries no tokenizer (tokenizer.json missing)")
    with tempfile.TemporaryDirectory(prefix="pbs2p-tokenizer-") as folder:
        for name, text in files.items():
            if Path(name).name != name:
                raise Pbs2pError(f"checkpoint tokenizer file name {name!r} is not a plain file name")
            (Path(folder) / name).write_text(text, encoding="utf-8")
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:
            raise Pbs2pError(f"checkpoint tokenizer cannot be loaded: {_first_line(exc)}") from None


def _own_storage(tensor: Any) -> Any:
    """The tensor itself when it owns exactly its storage, else a compact copy (torch.save writes a view's
    whole storage). A large model's embeddings are not copied for nothing."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    return tensor.clone().contiguous()


def _contiguous(array: Any) -> Any:
    import numpy as np

    return np.ascontiguousarray(array).copy()


def _plain(value: Any) -> Any:
    """Results as plain Python values (no numpy scalars or tensors), as weights_only loading requires."""
    return json.loads(json.dumps(value, default=float))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
