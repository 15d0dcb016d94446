"""ONNX export of PBS2P checkpoints (and fp32/int4 baselines) to self-contained, validated bundles."""

from __future__ import annotations

from typing import Any

__all__ = ["export_bundle"]


def export_bundle(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See `pbs2p_edge.export.bundle.export_bundle` (imported lazily: it needs torch)."""
    from pbs2p_edge.export.bundle import export_bundle as _export_bundle

    return _export_bundle(*args, **kwargs)
