"""Two builds of the ops library on the same bundles (issue 12): this install's against another `.so`.

A kernel or op change is measured as one runtime with two libraries: each variant in its own worker process
(`--ops-library`), the same prompt ids and threads, repetitions interleaved (bench/huge_pages.py's loop), so
the per-repetition ratio holds on a machine whose speed drifts by 15-30% between runs. Keep a copy of the
library before rebuilding, then:

    .venv/bin/python bench/ops_ab.py out/pbs2p --baseline /tmp/libpbs2p_edge_ops.so --reps 8 \\
        --out bench/results/ops-ab

The ratio is this install's library over the baseline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from huge_pages import run_ab
from peers import exit_usage


def _variants(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from pbs2p_edge.ops import library_path

    if not args.baseline.is_file():
        exit_usage(f"--baseline {args.baseline} is not a file")
    return {
        "this install": {"ops_library": str(library_path())},
        "baseline": {"ops_library": str(args.baseline)},
    }


def main(argv: list[str] | None = None) -> int:
    return run_ab(
        argv,
        "bench/ops_ab.py",
        __doc__,
        "Ops library against a baseline build",
        "this/baseline",
        _variants,
        lambda parser: parser.add_argument(
            "--baseline", type=Path, required=True, help="the other build's .so"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
