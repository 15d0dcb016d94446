"""Locate and register the SparseBinaryMatMul custom-op library (torch-free)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from pbs2p_edge.errors import Pbs2pError

LIBRARY_NAME = "libpbs2p_edge_ops.so"
OP_DOMAIN = "pbs2p.edge"
OP_TYPE = "SparseBinaryMatMul"
OP_VERSION = 1
ENV_LIBRARY = "PBS2P_EDGE_OPS_LIBRARY"
ENV_KERNEL = "PBS2P_KERNEL"  # optional override read by the library: generic | avx2 | neon


def _candidates() -> list[Path]:
    found = [Path(__file__).resolve().parent / LIBRARY_NAME]
    # Editable scikit-build-core installs put the .so in site-packages while __file__ is in the source tree.
    for entry in sys.path:
        if entry:
            found.append(Path(entry) / "pbs2p_edge" / LIBRARY_NAME)
    return found


def library_path() -> Path:
    """Path of the built custom-op library: $PBS2P_EDGE_OPS_LIBRARY, next to this package, or on sys.path."""
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


def register(session_options: Any) -> Path:
    """Register the custom ops on an onnxruntime.SessionOptions; returns the library path used."""
    path = library_path()
    try:
        session_options.register_custom_ops_library(str(path))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise Pbs2pError(f"onnxruntime could not load {path}: {exc}") from exc
    return path
