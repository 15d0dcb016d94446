"""Locate and register the SparseBinaryMatMul custom-op library (torch-free)."""

from __future__ import annotations

import ctypes
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pbs2p_edge.errors import Pbs2pError

LIBRARY_NAME = "libpbs2p_edge_ops.so"
OP_DOMAIN = "pbs2p.edge"
OP_TYPE = "SparseBinaryMatMul"
# Domain opset version (= pbs2p_edge.format.OP_VERSION); 3: multi-block nodes; 4: attribute activation
OP_VERSION = 4
ENV_LIBRARY = "PBS2P_EDGE_OPS_LIBRARY"
ENV_KERNEL = "PBS2P_KERNEL"  # optional override read by the library (a name from OpsInfo.kernels)


def _candidates() -> list[Path]:
    found = [Path(__file__).resolve().parent / LIBRARY_NAME]
    # Editable scikit-build-core installs put the .so in site-packages while __file__ is in the source tree.
    for entry in sys.path:
        if entry:
            found.append(Path(entry) / "pbs2p_edge" / LIBRARY_NAME)
    return found


def library_path() -> Path:
    """Path of the built custom-op library: $PBS2P_EDGE_OPS_LIBRARY, next to this package, or on sys.path.

    This is the only library the runtime registers unless the user passes another with `--ops-library`:
    never the copy a bundle carries (docs/DEPLOY.md, "Trust").
    """
    override = os.environ.get(ENV_LIBRARY)
    if override:
        path = Path(override)
        if not path.is_file():
            raise Pbs2pError(f"{ENV_LIBRARY}={override} does not exist")
        return path
    for path in _candidates():
        if path.is_file():
            return path
    raise Pbs2pError(
        f"{LIBRARY_NAME} not found next to pbs2p_edge or on sys.path: build it with `pip install -e .` "
        f"(after scripts/fetch_ort_headers.sh) or set {ENV_LIBRARY}"
    )


@dataclass(frozen=True)
class OpsInfo:
    """What an ops library says it implements (its `Pbs2pOpsInfo()` JSON)."""

    op_version: int
    format_versions: tuple[int, ...]
    kernels: tuple[str, ...]
    reported: bool  # False: a library from before Pbs2pOpsInfo (op version 1, packed format 1)

    def describe(self) -> str:
        formats = ", ".join(map(str, self.format_versions))
        kernels = f", kernels {', '.join(self.kernels)}" if self.kernels else ""
        return f"op version {self.op_version}, packed formats {formats}{kernels}"


LEGACY_INFO = OpsInfo(op_version=1, format_versions=(1,), kernels=(), reported=False)


def library_info(path: str | os.PathLike) -> OpsInfo:
    """Read `Pbs2pOpsInfo()` of a library with ctypes (this loads it: call it only on a trusted library).

    A library without the symbol predates it: op version 1, packed format 1.
    """
    try:
        handle = ctypes.CDLL(str(path))
    except OSError as exc:
        raise Pbs2pError(f"cannot load the ops library {path}: {str(exc).strip()}") from None
    try:
        function = handle.Pbs2pOpsInfo
    except AttributeError:
        return LEGACY_INFO
    function.restype = ctypes.c_char_p
    function.argtypes = []
    raw = function()
    try:
        info = json.loads(raw.decode("utf-8"))
        op_version = info["op_version"]
        formats = tuple(info["format_versions"])
        kernels = tuple(str(k) for k in info.get("kernels", ()))
    except (AttributeError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise Pbs2pError(f"the ops library {path} reports malformed Pbs2pOpsInfo {raw!r}") from None
    if not isinstance(op_version, int) or not all(isinstance(v, int) for v in formats):
        raise Pbs2pError(f"the ops library {path} reports malformed Pbs2pOpsInfo {raw!r}")
    return OpsInfo(op_version, formats, kernels, reported=True)


def register(session_options: Any) -> Path:
    """Register the custom ops on an onnxruntime.SessionOptions; returns the library path used."""
    path = library_path()
    try:
        session_options.register_custom_ops_library(str(path))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise Pbs2pError(f"onnxruntime could not load {path}: {exc}") from exc
    return path
