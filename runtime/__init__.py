"""Torch-free runtime for pbs2p-edge bundles: numpy, onnxruntime and tokenizers only.

Importing this package is cheap (the CLI imports `pbs2p_edge.runtime.cli` with click alone); the public names
below load their modules on first use.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "Generator": ("pbs2p_edge.runtime.generate", "Generator"),
    "GenerationResult": ("pbs2p_edge.runtime.generate", "GenerationResult"),
    "SamplingConfig": ("pbs2p_edge.runtime.sampling", "SamplingConfig"),
    "Bundle": ("pbs2p_edge.runtime.bundle", "Bundle"),
    "load_bundle": ("pbs2p_edge.runtime.bundle", "load_bundle"),
    "DecoderSession": ("pbs2p_edge.runtime.session", "DecoderSession"),
    "run_bench": ("pbs2p_edge.runtime.bench", "run_bench"),
    "BundleScorer": ("pbs2p_edge.runtime.perplexity", "BundleScorer"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'pbs2p_edge.runtime' has no attribute {name!r}")
