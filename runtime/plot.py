"""PNG of a bench report: decode and prefill tok/s, and memory, per bundle (matplotlib, optional)."""

from __future__ import annotations

import os
from typing import Any

from pbs2p_edge.errors import Pbs2pError, atomic_path

MIB = 2**20


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Pbs2pError("--plot needs matplotlib (pip install matplotlib)") from None
    rows = report["results"]
    labels = [f"{r['name']}\n{r['weights']}, {r['threads']}t" for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(4 + 2.2 * len(rows), 4.5))
    settings = report["settings"]
    for ax, key, title in (
        (axes[0], "tg", f"decode (tg{settings['tg']}) tok/s"),
        (axes[1], "pp", f"prefill (pp{settings['pp']}) tok/s"),
    ):
        means = [r[f"{key}_tokens_per_second"] for r in rows]
        stds = [r[f"{key}_tokens_per_second_std"] for r in rows]
        ax.bar(x, means, yerr=stds, capsize=3, color="tab:blue")
        ax.set_title(title)
    width = 0.4
    axes[2].bar(
        [i - width / 2 for i in x], [r["bundle_bytes"] / MIB for r in rows], width, label="bundle on disk"
    )
    axes[2].bar(
        [i + width / 2 for i in x],
        [r["peak_rss_generation_bytes"] / MIB for r in rows],
        width,
        label="peak RSS",
    )
    axes[2].set_title("memory MiB")
    axes[2].legend()
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
