"""pbs2p-edge: PBS2P compression, sparse-binary ONNX export and a torch-free CPU runtime.

Importing the package is cheap and torch-free; heavy stages are imported on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "library_path": ("pbs2p_edge.ops", "library_path"),
    "PBS2PConfig": ("pbs2p_edge.config", "PBS2PConfig"),
    "compress": ("pbs2p_edge.compress", "compress"),
    "load_checkpoint": ("pbs2p_edge.checkpoint", "load_checkpoint"),
    "Pbs2pError": ("pbs2p_edge.errors", "Pbs2pError"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'pbs2p_edge' has no attribute {name!r}")
