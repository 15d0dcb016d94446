"""Load and validate a bundle directory (docs/ARCHITECTURE.md §3) without onnxruntime or torch."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pbs2p_edge import ops
from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.runtime.integrity import FilesReport, check_files, member

BUNDLE_FORMAT = "pbs2p-edge-bundle"
BUNDLE_VERSIONS = (1,)
WEIGHT_KINDS = ("pbs2p", "fp32", "int4")
_INT_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "context_length")


@dataclass(frozen=True)
class Bundle:
    """What the runtime needs from a bundle: paths and the manifest's model shape."""

    path: Path
    manifest: dict[str, Any]
    weights: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    ops_library: Path | None  # what the runtime registers: installed, or --ops-library; None: not needed
    ops_info: ops.OpsInfo | None = None
    ops_requirement: OpsRequirement | None = None
    bundled_ops_library: Path | None = None  # the bundle's own copy (for onnxruntime-genai); never loaded
    files: FilesReport | None = None  # None: an old bundle without file records

    @property
    def model_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def name(self) -> str:
        return self.path.name

    def kv_bytes_per_token(self, itemsize: int = 4) -> int:
        """Bytes the KV cache grows by per token (keys and values of every layer)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def bundle_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of every regular file in the bundle directory (what you copy to a device)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise Pbs2pError(f"bundle directory {path} does not exist")
    if not path.is_dir():
        raise Pbs2pError(f"{path} is not a bundle directory (it is a file)")
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise Pbs2pError(f"{path} is not a pbs2p-edge bundle (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Pbs2pError(f"{manifest_path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise Pbs2pError(f"{path} is not a pbs2p-edge bundle (manifest format is not {BUNDLE_FORMAT!r})")
    if manifest.get("version") not in BUNDLE_VERSIONS:
        raise Pbs2pError(
            f"{path}: bundle version {manifest.get('version')!r} is not supported (this runtime reads "
            f"{', '.join(map(str, BUNDLE_VERSIONS))})"
        )
    return manifest


def _int_field(manifest: dict[str, Any], key: str, path: Path) -> int:
    value = manifest.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise Pbs2pError(f"{path}/manifest.json: field {key!r} must be a positive integer, got {value!r}")
    return value


def _eos_ids(manifest: dict[str, Any], path: Path) -> tuple[int, ...]:
    value = manifest.get("eos_token_ids")
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise Pbs2pError(f"{path}/manifest.json: field 'eos_token_ids' must be a list of integers")
    return tuple(value)


# ELF e_machine codes of the CPUs a bundle's ops library may be built for, by platform.machine().
_ELF_MACHINES = {
    "x86_64": 0x3E,
    "amd64": 0x3E,
    "aarch64": 0xB7,
    "arm64": 0xB7,
    "armv7l": 0x28,
    "riscv64": 0xF3,
}
_ELF_NAMES = {0x3E: "x86-64", 0xB7: "aarch64", 0x28: "32-bit ARM", 0xF3: "RISC-V"}


def check_library_machine(library: Path) -> None:
    """Refuse an ELF ops library built for another CPU (a bundle exported on a PC, copied to a Raspberry Pi)."""
    expected = _ELF_MACHINES.get(platform.machine().lower())
    with open(library, "rb") as f:
        header = f.read(20)
    if expected is None or len(header) < 20 or header[:4] != b"\x7fELF":
        return  # not ELF (e.g. macOS) or an unknown CPU: let onnxruntime decide
    machine = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    if machine != expected:
        raise Pbs2pError(
            f"the ops library {library} is built for {_ELF_NAMES.get(machine, hex(machine))}, this machine is "
            f"{platform.machine()}: use the library pbs2p-edge built on this machine (docs/DEPLOY.md)"
        )


@dataclass(frozen=True)
class OpsRequirement:
    """What a bundle's graph needs from the SparseBinaryMatMul library (manifest `requires_ops`)."""

    op_version: int
    format_versions: tuple[int, ...]
    exporter_version: str | None  # the pbs2p-edge that exported it: at least this one runs it


def _ops_requirement(manifest: dict[str, Any], path: Path) -> OpsRequirement | None:
    exporter = manifest.get("exporter")
    version = exporter.get("pbs2p_edge") if isinstance(exporter, dict) else None
    if "requires_ops" not in manifest:  # exported before requires_ops: infer whether the op is used
        custom = manifest.get("custom_ops")
        uses_op = isinstance(custom, dict) and any(str(k).startswith("pbs2p.edge::") for k in custom)
        if manifest.get("weights") == "pbs2p" or manifest.get("ops_library") or uses_op:
            return OpsRequirement(1, (1,), version)  # the first op and packed format
        return None
    required = manifest["requires_ops"]
    if required is None:
        return None
    op_version = required.get("op_version") if isinstance(required, dict) else None
    formats = required.get("format_versions") if isinstance(required, dict) else None
    if (
        not isinstance(op_version, int)
        or not isinstance(formats, list)
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in formats)
    ):
        raise Pbs2pError(
            f"{path}/manifest.json: field 'requires_ops' must be {{op_version: int, format_versions: [int]}}"
        )
    return OpsRequirement(op_version, tuple(formats), version)


def check_ops_compatible(library: Path, info: ops.OpsInfo, needs: OpsRequirement, bundle: Path) -> None:
    """Refuse a library older than the bundle's graph, naming the version to install."""
    missing = [v for v in needs.format_versions if v not in info.format_versions]
    if info.op_version >= needs.op_version and not missing:
        return
    install = (
        f"pbs2p-edge {needs.exporter_version} or newer" if needs.exporter_version else "a newer pbs2p-edge"
    )
    formats = ", ".join(map(str, needs.format_versions))
    raise Pbs2pError(
        f"bundle {bundle} needs SparseBinaryMatMul op version {needs.op_version} (packed format {formats}); "
        f"the ops library {library} has {info.describe()}: install {install}"
    )


def resolve_ops_library(
    needs: OpsRequirement | None, explicit: str | os.PathLike | None
) -> tuple[Path | None, ops.OpsInfo | None]:
    """The library to register: `explicit` if given, else the installed package's (none if not needed)."""
    if explicit is not None:
        library = Path(explicit).expanduser()
        if not library.is_file():
            raise Pbs2pError(f"--ops-library {explicit}: no such file")
    elif needs is not None:
        library = ops.library_path()
    else:
        return None, None
    check_library_machine(library)
    return library, ops.library_info(library)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_bundle(
    path: str | os.PathLike,
    *,
    ops_library: str | os.PathLike | None = None,
    verify_hash: bool = True,
    warn: Callable[[str], None] = _warn,
) -> Bundle:
    """Read `path/manifest.json`, check it is a bundle this runtime understands, and return its description.

    Checks, in order, before any of the bundle is loaded: the manifest; that every path it names stays inside
    the bundle; every listed file's size and (with `verify_hash`) sha256; then picks the ops library (the
    installed package's, or `ops_library` when the user names one: never the bundle's own copy) and checks
    its op and packed-format versions against the bundle's needs. Raises Pbs2pError naming the problem.
    A bundle exported before file hashes were recorded loads with a warning.
    """
    path = Path(path).expanduser().resolve()
    manifest = _read_manifest(path)
    weights = manifest.get("weights")
    if weights not in WEIGHT_KINDS:
        raise Pbs2pError(
            f"{path}/manifest.json: unknown weights kind {weights!r} (expected one of {WEIGHT_KINDS})"
        )
    ints = {key: _int_field(manifest, key, path) for key in _INT_FIELDS}
    bos = manifest.get("bos_token_id")
    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int)):
        raise Pbs2pError(f"{path}/manifest.json: field 'bos_token_id' must be an integer or null")
    bundled = manifest.get("ops_library")
    bundled_library = None if bundled is None else member(path, bundled, "field 'ops_library'")
    files = check_files(path, manifest, hashes=verify_hash)
    if files is None:
        warn(
            f"bundle {path} records no file sizes or hashes (exported by an older pbs2p-edge): loading it "
            "unchecked; re-export it to get them"
        )
    for required in (path / "model.onnx", path / "tokenizer.json"):
        if not required.is_file():
            raise Pbs2pError(f"bundle {path} is incomplete: {required.name} is missing")
    needs = _ops_requirement(manifest, path)
    library, info = resolve_ops_library(needs, ops_library)
    if needs is not None and library is not None and info is not None:
        check_ops_compatible(library, info, needs, path)
    return Bundle(
        path=path,
        manifest=manifest,
        weights=weights,
        bos_token_id=bos,
        eos_token_ids=_eos_ids(manifest, path),
        ops_library=library,
        ops_info=info,
        ops_requirement=needs,
        bundled_ops_library=bundled_library,
        files=files,
        **ints,
    )
