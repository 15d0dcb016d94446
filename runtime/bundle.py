"""Load and validate a bundle directory (docs/ARCHITECTURE.md §3) without onnxruntime or torch."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pbs2p_edge.errors import Pbs2pError

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
    ops_library: Path | None

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
            f"{platform.machine()}: copy this machine's build into the bundle (docs/DEPLOY.md)"
        )


def _ops_library(manifest: dict[str, Any], path: Path) -> Path | None:
    name = manifest.get("ops_library")
    if name is None:
        return None
    if not isinstance(name, str) or not name:
        raise Pbs2pError(f"{path}/manifest.json: field 'ops_library' must be a file name or null")
    library = Path(name) if os.path.isabs(name) else path / name
    if not library.is_file():
        raise Pbs2pError(f"bundle {path} needs the ops library {library}, which is missing")
    check_library_machine(library)
    return library


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Read `path/manifest.json`, check it is a bundle this runtime understands, and return its description.

    Raises Pbs2pError naming the problem for a missing or foreign directory, an unknown version, a malformed
    manifest, or a missing model, tokenizer or ops library.
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
    bundle = Bundle(
        path=path,
        manifest=manifest,
        weights=weights,
        bos_token_id=bos,
        eos_token_ids=_eos_ids(manifest, path),
        ops_library=_ops_library(manifest, path),
        **ints,
    )
    for required in (bundle.model_path, bundle.tokenizer_path):
        if not required.is_file():
            raise Pbs2pError(f"bundle {path} is incomplete: {required.name} is missing")
    return bundle
