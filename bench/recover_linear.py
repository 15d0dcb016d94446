"""One recovery step of one compressed linear against a dense nn.Linear of the same shape (issue 10).

Times forward + backward of `TunableLinear` (W_hat rebuilt from the frozen sign planes in both) and of a
dense linear on the same activations, in bf16 autocast (the end-to-end steps on a CPU with native bf16) or
float32 (block recovery), each in its own process: once with glibc's default allocator thresholds (every
temporary above 32 MiB a fresh mmap, paid in page faults) and once with `allocator.retained_heap`
(what the recovery steps run in). Reports the best of --reps per cell and the minor page faults per step; seconds
compare only within one run.

    .venv/bin/python bench/recover_linear.py --shapes 8960x1536 1536x8960 576x1536 --out bench/results/recover-linear
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HEAP_MODES = ("default", "retained")


def measure(rows: int, k: int, tokens: int, dtype: str, reps: int, heap: str) -> dict[str, Any]:
    """Runs in the child process: best seconds and page faults per step of both linears."""
    import torch
    from torch import nn

    from pbs2p_edge.allocator import retained_heap
    from pbs2p_edge.compress.recover import TunableLinear
    from pbs2p_edge.format import random_weight

    torch.manual_seed(0)
    tunable = TunableLinear(random_weight(rows, k, salient=1, col_scales=True, seed=1), None)
    dense = nn.Linear(k, rows, bias=False)
    x = torch.randn(tokens, k, requires_grad=True)

    def step(module: nn.Module) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            module(x).float().square().mean().backward()

    with retained_heap() if heap == "retained" else contextlib.nullcontext():
        return {
            name: best_step(step, module, reps) for name, module in (("tunable", tunable), ("dense", dense))
        }


def best_step(step: Callable[[Any], None], module: Any, reps: int) -> dict[str, float]:
    """Best wall seconds of `reps` steps after a warm-up, and the minor page faults per step."""
    import resource
    import time

    step(module)
    best = float("inf")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(reps):
        started = time.perf_counter()
        step(module)
        best = min(best, time.perf_counter() - started)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"seconds": best, "faults_per_step": faults / reps}


def run_child(rows: int, k: int, args: argparse.Namespace, heap: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", heap, "--shapes", f"{rows}x{k}", "--tokens", str(args.tokens)]
    cmd += ["--dtype", args.dtype, "--reps", str(args.reps)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_shape(text: str) -> tuple[int, int]:
    rows, _, k = text.partition("x")
    return int(rows), int(k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["8960x1536", "1536x8960", "576x1536"], help="ROWSxK")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step (2 windows of 256)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, help="bench/results/NAME: writes NAME.json and NAME.md")
    parser.add_argument("--child", choices=HEAP_MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from peers import exit_usage, print_report

    try:
        shapes = [parse_shape(s) for s in args.shapes]
    except ValueError:
        exit_usage(f"--shapes takes ROWSxK, e.g. 8960x1536 (got {' '.join(args.shapes)})")
    if min(min(s) for s in shapes) < 1 or args.tokens < 1 or args.reps < 1:
        exit_usage("shapes, --tokens and --reps must be positive")
    if args.child:
        rows, k = shapes[0]
        print(json.dumps(measure(rows, k, args.tokens, args.dtype, args.reps, args.child)))
        return
    rows_out = []
    for rows, k in shapes:
        cells = {heap: run_child(rows, k, args, heap) for heap in HEAP_MODES}
        rows_out.append({"shape": f"{rows}x{k}", **cells})
    report = {"command": "bench/recover_linear.py " + " ".join(sys.argv[1:]), "rows": rows_out}
    lines = [
        "# One recovery step of a compressed linear (TunableLinear) vs a dense linear",
        "",
        f"Command: `{report['command']}` ({args.dtype}, {args.tokens} tokens, best of {args.reps}; seconds of "
        "forward + backward; faults = minor page faults per step)",
        "",
        "| rows x K | heap | TunableLinear s | dense s | ratio | faults per step (tunable / dense) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows_out:
        for heap in HEAP_MODES:
            t, d = row[heap]["tunable"], row[heap]["dense"]
            lines.append(
                f"| {row['shape']} | {heap} | {t['seconds']:.3f} | {d['seconds']:.3f} | "
                f"{t['seconds'] / d['seconds']:.2f}x | {t['faults_per_step']:.0f} / {d['faults_per_step']:.0f} |"
            )
    print_report(args.out, report, lines)


if __name__ == "__main__":
    main()
