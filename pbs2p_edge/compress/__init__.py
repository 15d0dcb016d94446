"""PBS2P compression (needs torch): `compress(model, config, calib_ids) -> CompressedModel`.

Attributes are imported lazily so that `pbs2p_edge.compress.cli` (imported by the CLI group) stays torch-free.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SUPPORTED_MODEL_TYPES", "CompressedModel", "compress"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pbs2p_edge.compress import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'pbs2p_edge.compress' has no attribute {name!r}")
