"""Train through the head the bundle will have: the embedding and LM head swapped for the values the exported
graph computes with (export/head.py), for the length of a `with` block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from pbs2p_edge.config import E2E_HEADS


@contextlib.contextmanager
def deployed_head(model: Any, choice: str) -> Iterator[None]:
    """Within the block, `model`'s embedding and head weights are `export --head choice`'s reference weights
    (unchanged for "float"); the float weights come back afterwards, so the checkpoint keeps them and the
    export quantizes exactly what was trained through."""
    if choice not in E2E_HEADS:
        raise ValueError(f"unknown end-to-end head {choice!r} (choose from {', '.join(E2E_HEADS)})")
    if choice == "float":
        yield
        return
    from pbs2p_edge.export.head import make_head

    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    embed_q, head_q = make_head(model, choice).reference_weights()
    saved = [(embed, embed.data.clone())]
    with torch.no_grad():
        embed.data.copy_(embed_q)
        if head.data_ptr() != embed.data_ptr():
            saved.append((head, head.data.clone()))
            head.data.copy_(head_q)
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in saved:
                param.data.copy_(value)
