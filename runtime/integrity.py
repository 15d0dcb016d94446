"""Bundle integrity: safe manifest paths, and the size + sha256 of every file recorded by the exporter.

The manifest's `files` maps each file's path (relative, POSIX) to `{"size": bytes, "sha256": hex}`; the
manifest itself is not listed. At load the runtime checks every listed file's size always and its hash unless
told not to (`--no-verify-hash`, for slow devices); `pbs2p-edge verify` checks both. This guards against
truncated copies and flipped bits, not against someone who rewrites the manifest too: the native code guard
is that the runtime never loads a library the bundle names (runtime/bundle.py).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pbs2p_edge.errors import Pbs2pError

MANIFEST_FILE = "manifest.json"
# Files the runtime reads: when present they must be listed (so checked) in a manifest that has `files`.
READ_FILES = (
    "model.onnx",
    "model.onnx.data",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every regular file under `root` but the manifest (exporter)."""
    root = Path(root)
    entries: dict[str, dict[str, Any]] = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if name == MANIFEST_FILE or not path.is_file() or path.is_symlink():
            continue
        entries[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return entries


def member(root: Path, name: Any, what: str) -> Path:
    """`root / name`, refused unless `name` is a relative path that stays inside `root` (symlinks resolved)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise Pbs2pError(f"{root}/manifest.json: {what} must be a file name inside the bundle, got {name!r}")
    if os.path.isabs(name) or name.startswith("~"):
        raise Pbs2pError(
            f"{root}/manifest.json: {what} {name!r} is an absolute path; bundle paths are relative"
        )
    if ".." in Path(name).parts:
        raise Pbs2pError(f"{root}/manifest.json: {what} {name!r} escapes the bundle directory")
    path = root / name
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise Pbs2pError(f"{root}/manifest.json: {what} {name!r} resolves outside the bundle (to {resolved})")
    return path


@dataclass(frozen=True)
class FilesReport:
    files: int
    bytes: int
    hashed: bool
    unlisted: tuple[str, ...]


def check_files(root: Path, manifest: dict[str, Any], hashes: bool = True) -> FilesReport | None:
    """Check every file the manifest lists: inside the bundle, present, its size, and (if `hashes`) sha256.

    Returns None for a manifest without `files` (a bundle from before integrity records). Raises Pbs2pError
    naming the first bad file.
    """
    files = manifest.get("files")
    if files is None:
        return None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise Pbs2pError(f"{root}/manifest.json: field 'files' must map file names to {{size, sha256}}")
    for name in READ_FILES:
        if (root / name).is_file() and name not in files:
            raise Pbs2pError(
                f"bundle {root}: {name} is not in the manifest's file list (re-export the bundle)"
            )
    total = 0
    for name, entry in files.items():
        path = member(root, name, "file")
        size, digest = entry.get("size"), entry.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or not isinstance(digest, str):
            raise Pbs2pError(f"{root}/manifest.json: the entry of {name} needs an integer size and a sha256")
        if not path.is_file():
            raise Pbs2pError(f"bundle {root} is incomplete: {name} is missing")
        actual = path.stat().st_size
        if actual != size:
            raise Pbs2pError(
                f"bundle {root}: {name} is {actual} bytes, the manifest says {size} "
                "(truncated or replaced: copy the bundle again)"
            )
        if hashes and sha256_file(path) != digest.lower():
            raise Pbs2pError(
                f"bundle {root}: {name} does not match its sha256 in the manifest "
                "(corrupted or modified: copy the bundle again)"
            )
        total += actual
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    unlisted = tuple(sorted(on_disk - set(files) - {MANIFEST_FILE}))
    return FilesReport(files=len(files), bytes=total, hashed=hashes, unlisted=unlisted)
