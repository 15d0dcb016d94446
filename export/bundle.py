"""`export_bundle`: model.pt (or an fp32 model) -> a self-contained, validated bundle directory.

Bundle (docs/ARCHITECTURE.md §3): model.onnx + model.onnx.data, libpbs2p_edge_ops.so (pbs2p bundles),
tokenizer files, genai_config.json (onnxruntime-genai) and manifest.json. It is written to a temporary
sibling directory and renamed into place only after validation passed, so a failed export leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import onnx

from pbs2p_edge.errors import Pbs2pError, atomic_path
from pbs2p_edge.export.baselines import INT4_BLOCK_SIZE, fp32_factory, int4_factory, release_weights
from pbs2p_edge.export.configs import ExportConfig, export_config
from pbs2p_edge.export.decoder import Decoder
from pbs2p_edge.export.fused import LOGITS_TO_KEEP, FusedDecoder, fused_unsupported
from pbs2p_edge.export.fused import input_names as fused_input_names
from pbs2p_edge.export.head import head_read_bytes, make_head
from pbs2p_edge.export.onnx_export import DATA_FILE, MODEL_FILE, OPSET, export_onnx
from pbs2p_edge.export.patch import Factory, check_packed_names, pbs2p_factory, swapped_linears
from pbs2p_edge.runtime.integrity import file_entries

BUNDLE_FORMAT = "pbs2p-edge-bundle"
BUNDLE_VERSION = 1
WEIGHT_FORMATS = ("pbs2p", "fp32", "int4")
DEFAULT_HEAD = {"pbs2p": "int4", "fp32": "fp32", "int4": "int4"}
# MatMulNBits compute by default, per bundle format. 4 = int8 activations per block, as ORT GenAI's builder
# uses on CPU: in the pbs2p bundle (int4 head, budget layers) it decodes faster than fp32 compute for +0.2%
# perplexity (README, speed section). The eager reference rounds like onnxruntime (`int8_activations`) and the
# teacher-forced validation re-anchors the graph at every sparse-binary node, so the 40 dB gate holds. An int4
# baseline has no such anchor: one-ulp differences flip int8 roundings that compound over every layer (33 dB
# free-running on the default model), so it keeps fp32 compute unless asked (--accuracy-level 4 with a lower
# --threshold-db).
DEFAULT_ACCURACY_LEVEL = {"pbs2p": 4, "int4": 0, "fp32": 0}
OPS_LIBRARY_MODES = ("copy", "reference")
GRAPH_KINDS = ("auto", "fused", "unfused")  # auto: fused for the families export/fused.py supports
MANIFEST_FILE = "manifest.json"
GENAI_CONFIG_FILE = "genai_config.json"


# ------------------------------------------------------------------------------------------ sources


class Source:
    """What an export needs from its input: the HF model (compressed or not), tokenizer, metadata."""

    def __init__(self, model: Any, tokenizer: Any, tokenizer_files: dict[str, str], **meta: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer_files = tokenizer_files
        self.packed: dict[str, Any] = meta.get("packed", {})
        self.nbits: dict[str, Any] = meta.get("nbits", {})
        self.compression: dict[str, Any] | None = meta.get("compression")
        self.description: str = meta.get("description", "")
        self.store: Any = meta.get("store")  # lowmem.LayerStore of layers not yet read (int4 baseline)


def _load_checkpoint_source(path: Path) -> Source:
    from pbs2p_edge.checkpoint import build_model, load_checkpoint, nbits_layers, packed_layers

    if path.is_dir():
        raise Pbs2pError(
            f"{path} is a directory: --format pbs2p exports a model.pt made by `pbs2p-edge compress`"
        )
    if not path.is_file():
        raise Pbs2pError(f"checkpoint {path} does not exist")
    ckpt = load_checkpoint(path)
    # The packed layers stay packed (their modules decode W_hat per call): no fp32 copy of the model.
    model, tokenizer = build_model(ckpt, dense_linears=False)
    from pbs2p_edge import memcheck

    # The checkpoint and the model are already in memory: the rest of the export needs the difference.
    needed = memcheck.pbs2p_export_bytes(model.config)
    memcheck.require(
        needed - memcheck.process_bytes(), f"exporting {path.name} ({needed / memcheck.GIB:.1f} GiB in all)"
    )
    files = {name: text for name, text in (ckpt.get("tokenizer") or {}).items() if isinstance(text, str)}
    return Source(
        model.eval(),
        tokenizer,
        files,
        packed=packed_layers(ckpt),
        nbits=nbits_layers(ckpt),
        compression=ckpt.get("compression"),
        description=str(path),
    )


def _load_fp_source(source: str | None, weights: str = "fp32") -> Source:
    from pbs2p_edge import sources
    from pbs2p_edge.checkpoint import read_tokenizer_files
    from pbs2p_edge.compress.lowmem import has_safetensors, materialize_except, skeleton_model
    from pbs2p_edge.export.baselines import is_projection

    if source is not None and str(source).endswith(".pt"):
        raise Pbs2pError(f"{source} is a compressed checkpoint: export it with --format pbs2p")
    folder = sources.model_files(source)
    files = read_tokenizer_files(folder)
    if weights in ("fp32", "int4"):
        from transformers import AutoConfig

        from pbs2p_edge import memcheck

        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        predict = memcheck.fp32_export_bytes if weights == "fp32" else memcheck.int4_export_bytes
        memcheck.require(predict(config), f"exporting an {weights} bundle of {folder.name}")
    if has_safetensors(folder):
        # The projections stay on disk until the int4 / fp32 factory reads them one at a time.
        model, store = skeleton_model(folder)
        materialize_except(model, store, is_projection)
        tokenizer = sources.load_tokenizer(folder)
        return Source(model, tokenizer, files, description=str(source or "default"), store=store)
    model, tokenizer = sources.load_model(folder)
    return Source(model, tokenizer, files, description=str(source or "default"))


def _ops_library() -> Path:
    from pbs2p_edge import ops

    path = Path(ops.library_path())
    if not path.is_file():
        raise Pbs2pError(f"ops library {path} is missing: build it with `pip install -e .`")
    return path


def check_ops_library(path: Path) -> None:
    """Refuse an ops library onnxruntime cannot register (wrong arch, missing symbols, not a library)."""
    import onnxruntime as ort

    try:
        ort.SessionOptions().register_custom_ops_library(str(path))
    except Exception as exc:
        raise Pbs2pError(
            f"ops library {path} fails to load in onnxruntime: {str(exc).strip().splitlines()[0]}"
        ) from None


# ------------------------------------------------------------------------------------------ files


def _jsonable(value: Any) -> Any:
    """Checkpoint metadata as plain JSON (tensors and arrays to lists, other objects to strings)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def genai_config(config: ExportConfig, ops_library: str | None, fused: bool = False) -> dict[str, Any]:
    """onnxruntime-genai's config for this bundle (greedy search by default). A fused graph shares its past
    and present buffers and takes no position_ids (GroupQueryAttention derives them)."""
    session_options: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if ops_library is not None:
        session_options["custom_ops_library"] = ops_library
    eos = config.eos_token_ids
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    inputs = {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "position_ids": "position_ids",
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    if fused:
        del inputs["position_ids"]
    return {
        "model": {
            "bos_token_id": config.bos_token_id
            if config.bos_token_id is not None
            else (eos[0] if eos else 0),
            "context_length": config.context_length,
            "decoder": {
                "session_options": session_options,
                "filename": MODEL_FILE,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": inputs,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": config.num_heads,
                "num_hidden_layers": config.num_layers,
                "num_key_value_heads": config.num_kv_heads,
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": pad,
            "type": config.family.genai_type,
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": config.context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": fused,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _initializer_bytes(tensor: onnx.TensorProto) -> int:
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(tensor.raw_data) if tensor.raw_data else onnx.numpy_helper.to_array(tensor).nbytes


def weight_bytes_by_kind(model_path: Path) -> dict[str, int]:
    """Initializer bytes grouped by what reads them: sparse-binary layers, n-bit layers, embedding/head, rest."""
    model = onnx.load(str(model_path), load_external_data=False)
    sizes = {t.name: _initializer_bytes(t) for t in model.graph.initializer}
    kinds = {name: "embedding_and_head" for name in sizes if name.startswith("head.")}
    by_op = {
        "SparseBinaryMatMul": "sparse_binary_layers",
        "MatMulNBits": "nbits_layers",
        "MatMul": "float_layers",
    }
    for node in model.graph.node:
        kind = by_op.get(node.op_type)
        if kind is None:
            continue
        for name in node.input[1:]:
            if name in sizes:
                kinds.setdefault(name, kind)
    result = {
        "sparse_binary_layers": 0,
        "nbits_layers": 0,
        "float_layers": 0,
        "embedding_and_head": 0,
        "other": 0,
    }
    for name, size in sizes.items():
        result[kinds.get(name, "other")] += size
    return result


def _dir_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def _count_ops(model_path: Path) -> dict[str, int]:
    model = onnx.load(str(model_path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            key = f"{node.domain}::{node.op_type}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def graph_nodes(model_path: Path) -> dict[str, Any]:
    """Node counts of the graph: total, by op type, and per decoder layer = the mean distance (in the graph's
    topological order, which follows the layers) between consecutive attention nodes: GroupQueryAttention
    in a fused graph, Softmax in an unfused one. None for a one-layer graph."""
    model = onnx.load(str(model_path), load_external_data=False)
    nodes = list(model.graph.node)
    by_op: dict[str, int] = {}
    for node in nodes:
        by_op[node.op_type] = by_op.get(node.op_type, 0) + 1
    attention = "GroupQueryAttention" if "GroupQueryAttention" in by_op else "Softmax"
    marks = [i for i, node in enumerate(nodes) if node.op_type == attention]
    per_layer = round((marks[-1] - marks[0]) / (len(marks) - 1), 2) if len(marks) > 1 else None
    return {"total": len(nodes), "per_layer": per_layer, "by_op": dict(sorted(by_op.items()))}


# ------------------------------------------------------------------------------------------ export


def export_bundle(
    source: str | Path | None,
    out_dir: str | Path,
    *,
    weights: str = "pbs2p",
    head: str | None = None,
    force: bool = False,
    validate: bool = True,
    ops_library: str = "copy",
    threshold_db: float | None = None,
    accuracy_level: int | None = None,
    graph: str = "auto",
) -> dict[str, Any]:
    """Export `source` (a model.pt for pbs2p; a model folder/GGUF/None=default for fp32/int4) to `out_dir`.

    Returns the manifest. Raises Pbs2pError on bad input or failed validation, leaving no bundle behind.
    `accuracy_level` is passed to ONNX Runtime's MatMulNBits (0 = fp32 compute, 4 = int8 activations; None:
    the format's DEFAULT_ACCURACY_LEVEL).
    `graph`: "fused" (contrib ops, shared KV buffer: export/fused.py), "unfused" (export/decoder.py), or
    "auto" (fused when the family supports it).
    """
    from pbs2p_edge.export import validate as validation

    if weights not in WEIGHT_FORMATS:
        raise Pbs2pError(f"unknown format {weights!r} (choose from {', '.join(WEIGHT_FORMATS)})")
    if graph not in GRAPH_KINDS:
        raise Pbs2pError(f"unknown graph kind {graph!r} (choose from {', '.join(GRAPH_KINDS)})")
    if ops_library not in OPS_LIBRARY_MODES:
        raise Pbs2pError(f"unknown ops library mode {ops_library!r} (choose copy or reference)")
    head = head or DEFAULT_HEAD[weights]
    accuracy_level = DEFAULT_ACCURACY_LEVEL[weights] if accuracy_level is None else accuracy_level
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise Pbs2pError(f"output {out} exists and is not a directory")
    if out.exists() and not force:
        raise Pbs2pError(f"output {out} already exists (use --force to replace it)")
    threshold = validation.DEFAULT_THRESHOLD_DB if threshold_db is None else threshold_db
    started = time.perf_counter()

    library = None
    requires_ops = None
    if weights == "pbs2p":
        from pbs2p_edge import ops

        library = _ops_library()
        check_ops_library(library)
        src = _load_checkpoint_source(Path(source) if source is not None else Path("model.pt"))
        requires_ops = _ops_requirement(ops.library_info(library), src.packed)
    else:
        src = _load_fp_source(None if source is None else str(source), weights)
    config = export_config(src.model.config)
    fused = _use_fused(config, graph)

    with (
        atomic_path(out, directory=True) as tmp,
        swapped_linears(src.model, _factory(src, weights, accuracy_level)),
    ):
        head_module = make_head(src.model, head, accuracy_level)
        decoder_class = FusedDecoder if fused else Decoder
        export_onnx(decoder_class(src.model, config, head_module).eval(), config, tmp)
        library_ref = _write_files(tmp, src, config, library, ops_library, fused)
        manifest = _manifest(tmp, src, config, weights, head, library_ref, accuracy_level)
        manifest["graph"] = "fused" if fused else "unfused"
        manifest["graph_nodes"] = graph_nodes(tmp / MODEL_FILE)
        if fused:
            manifest["inputs"] = [*fused_input_names(config), LOGITS_TO_KEEP]
        manifest["validation"] = None
        if validate:
            bundle_library = (
                None if library is None else (tmp / library.name if ops_library == "copy" else library)
            )
            manifest["validation"] = validation.validate_graph(
                tmp / MODEL_FILE,
                bundle_library,
                src.model,
                head_module,
                config,
                src.tokenizer,
                threshold_db=threshold,
                release=lambda: release_weights(src.model, head_module),
            )
        manifest["requires_ops"] = requires_ops
        manifest["export_seconds"] = round(time.perf_counter() - started, 2)
        _normal_modes(tmp)
        manifest["files"] = file_entries(tmp)  # last: sizes and sha256 of everything but the manifest
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _use_fused(config: ExportConfig, graph: str) -> bool:
    reason = fused_unsupported(config)
    if graph == "fused" and reason is not None:
        raise Pbs2pError(
            f"--graph fused does not support {config.model_type} with {reason} (use --graph unfused)"
        )
    return graph != "unfused" and reason is None


def _ops_requirement(info: Any, packed: dict[str, Any]) -> dict[str, Any]:
    """What the graph needs from an ops library: the exporting library's op version, the packed formats used.
    A library older than the op version this exporter writes is refused: it would ignore attributes it does not
    know (the swiglu epilogue) and fail the validation with a shape error instead of naming the cause."""
    from pbs2p_edge.format import OP_VERSION
    from pbs2p_edge.format.packed import HDR_VERSION

    if info.op_version < OP_VERSION:
        raise Pbs2pError(
            f"the ops library has op version {info.op_version}, older than the op version {OP_VERSION} this "
            "exporter writes: rebuild it (make setup, or pip install the package again)"
        )

    formats = sorted({int(p.header[HDR_VERSION]) for p in packed.values()})
    return {"op_version": info.op_version, "format_versions": formats}


def _normal_modes(root: Path) -> None:
    """Files rw-r--r--, directories rwxr-xr-x (less what the umask removes), whatever wrote them (onnx writes
    the external data owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _factory(src: Source, weights: str, accuracy_level: int) -> Factory:
    """Which linears become which module: packed ones -> SparseBinaryMatMul, all projections -> MatMulNBits."""
    if weights == "pbs2p":
        check_packed_names(src.model, src.packed)
        if src.nbits:
            return _mixed_factory(pbs2p_factory(src.packed), src.nbits, accuracy_level)
        return pbs2p_factory(src.packed)
    if weights == "int4":
        return int4_factory(accuracy_level=accuracy_level, release=True, store=src.store)
    return fp32_factory(release=True, store=src.store)


def _mixed_factory(packed: Factory, nbits: dict[str, Any], accuracy_level: int) -> Factory:
    """Packed layers -> SparseBinaryMatMul; layers the checkpoint keeps in n-bit -> MatMulNBits (its bytes)."""
    from pbs2p_edge.export.nbits import NBitsLinear

    def make(name: str, linear: Any) -> Any:
        q = nbits.get(name)
        if q is None:
            return packed(name, linear)
        return NBitsLinear(linear, q.bits, q.block_size, accuracy_level, quantized=q)

    return make


def _write_files(
    tmp: Path, src: Source, config: ExportConfig, library: Path | None, mode: str, fused: bool = False
) -> str | None:
    """Tokenizer files, the ops library (copied or referenced) and genai_config.json; returns the manifest's
    library name (None when referenced: a manifest names only files inside the bundle)."""
    for name, text in src.tokenizer_files.items():
        (tmp / Path(name).name).write_text(text, encoding="utf-8")
    if not (tmp / "tokenizer.json").is_file():
        raise Pbs2pError(f"{src.description} has no tokenizer.json: the bundle needs a fast tokenizer")
    library_ref: str | None = None  # the manifest's: a file inside the bundle or nothing
    genai_library: str | None = None  # onnxruntime-genai's: it loads what genai_config.json names
    if library is not None:
        if mode == "copy":
            shutil.copy2(library, tmp / library.name)
            library_ref = genai_library = library.name
        else:
            genai_library = str(library.resolve())
    (tmp / GENAI_CONFIG_FILE).write_text(
        json.dumps(genai_config(config, genai_library, fused), indent=2) + "\n"
    )
    return library_ref


def _manifest(
    tmp: Path,
    src: Source,
    config: ExportConfig,
    weights: str,
    head: str,
    library_ref: str | None,
    accuracy_level: int,
) -> dict[str, Any]:
    import onnxruntime
    import torch

    import pbs2p_edge

    tokenizer_paths = [tmp / Path(n).name for n in src.tokenizer_files]
    library_bytes = _dir_bytes([tmp / library_ref]) if library_ref and "/" not in library_ref else 0
    sizes: dict[str, Any] = {
        "model_onnx": _dir_bytes([tmp / MODEL_FILE]),
        "model_onnx_data": _dir_bytes([tmp / DATA_FILE]),
        "ops_library": library_bytes,
        "tokenizer": _dir_bytes(tokenizer_paths),
        "weights": weight_bytes_by_kind(tmp / MODEL_FILE),
    }
    sizes["graph_total"] = sizes["model_onnx"] + sizes["model_onnx_data"]
    sizes["head_read_per_token"] = head_read_bytes(tmp / MODEL_FILE)
    sizes["total"] = sizes["graph_total"] + sizes["ops_library"] + sizes["tokenizer"]
    quantization = None
    if weights == "int4":
        quantization = {"layers": "MatMulNBits", "bits": 4, "block_size": INT4_BLOCK_SIZE, "symmetric": True}
    return {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "weights": weights,
        "head": head,
        "model_config": json.loads(src.model.config.to_json_string()),
        "model_type": config.model_type,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "context_length": config.context_length,
        "bos_token_id": config.bos_token_id,
        "eos_token_ids": config.eos_token_ids,
        "pad_token_id": config.pad_token_id,
        "ops_library": library_ref,
        "compression": _jsonable(src.compression) if weights == "pbs2p" else None,
        "quantization": quantization,
        "accuracy_level": accuracy_level,
        "source": src.description,
        "inputs": config.input_names(),
        "outputs": config.output_names(),
        "custom_ops": _count_ops(tmp / MODEL_FILE),
        "sizes": sizes,
        "exporter": {
            "pbs2p_edge": pbs2p_edge.__version__,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "opset": OPSET,
        },
    }
