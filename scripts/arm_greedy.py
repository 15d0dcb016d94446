"""Greedy tokens of bundles, as JSON, torch-free: run by `make test-arm` on x86 and inside the arm64 rootfs
(qemu) with the same arguments, and the two outputs compared.

    python scripts/arm_greedy.py BUNDLE... [--prompt TEXT] [-n 32] [--out result.json]
    python scripts/arm_greedy.py --compare x86.json arm.json   # markdown table; exit 1 if tokens differ
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from pbs2p_edge.runtime import Generator


def compare(x86_path: str, arm_path: str) -> int:
    x86, arm = (json.loads(Path(p).read_text()) for p in (x86_path, arm_path))
    print(
        "| bundle | repetition penalty | tokens | x86 = arm64 | first different step: x86 top-2 margin there "
        "(smallest over the run) | max abs diff of prefill logits | ops (arm64) |"
    )
    print("|---|---|---|---|---|---|---|")
    differ = 0
    for name, ours in x86.items():
        theirs = arm[name]
        diff = max(abs(a - b) for a, b in zip(ours["prefill_logits"], theirs["prefill_logits"], strict=True))
        for penalty, run in ours["greedy"].items():
            other = theirs["greedy"][penalty]["token_ids"]
            same = run["token_ids"] == other
            differ += not same
            where = "-"
            gaps = run.get("top2_margins") or []
            if not same:
                step = next(
                    i for i, (a, b) in enumerate(zip(run["token_ids"], other, strict=False)) if a != b
                )
                where = f"step {step + 1}: {gaps[step]:.2g}" if step < len(gaps) else f"step {step + 1}"
            if gaps:
                where += f" ({min(gaps):.2g})"
            tokens = len(run["token_ids"])
            print(
                f"| {name} | {penalty} | {tokens} | {'yes' if same else 'NO'} | {where} | {diff:.3g} "
                f"| {theirs['ops']} |"
            )
    return 1 if differ else 0


def margins(generator: Generator, prompt: str, n: int, penalty: float) -> list[float]:
    """Per greedy step, the gap between the best and second-best (penalized) logits: how near a tie is."""
    import numpy as np

    from pbs2p_edge.runtime.sampling import apply_repetition_penalty

    session, history = generator.session, generator.encode(prompt)
    session.reset()
    logits, gaps = session.prefill(history), []
    for _ in range(n):
        scores = apply_repetition_penalty(logits, history, penalty)
        second, best = np.argsort(scores)[-2:]
        gaps.append(float(scores[best] - scores[second]))
        history = [*history, int(best)]
        logits = session.forward([int(best)])
    return gaps


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    parser = argparse.ArgumentParser()
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("-n", type=int, default=32)
    parser.add_argument(
        "--penalties", default="1.0,20.0", help="repetition penalties (greedy; >1 varies the path)"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {}
    for bundle in args.bundles:
        start = time.perf_counter()
        generator = Generator(bundle, threads=1)
        loaded = time.perf_counter() - start
        runs = {}
        for penalty in [float(p) for p in args.penalties.split(",")]:
            result = generator.generate(args.prompt, args.n, repetition_penalty=penalty)
            gaps = margins(generator, args.prompt, len(result.token_ids), penalty)
            runs[str(penalty)] = {"token_ids": result.token_ids, "text": result.text, "top2_margins": gaps}
        generator.session.reset()
        logits = generator.session.prefill(generator.encode(args.prompt))
        info = generator.bundle.ops_info
        results[Path(bundle).name] = {
            "greedy": runs,
            "prefill_logits": [float(v) for v in logits],
            "ops_library": str(generator.bundle.ops_library),
            "ops": info.describe() if info else None,
            "kernel_override": os.environ.get("PBS2P_KERNEL"),
            "machine": platform.machine(),
            "load_seconds": round(loaded, 2),
            "generate_seconds": round(time.perf_counter() - start - loaded, 2),
        }
        for penalty, run in runs.items():
            print(
                f"{platform.machine()} {Path(bundle).name} penalty {penalty}: {run['token_ids']}", flush=True
            )
            if run["top2_margins"]:
                low = min(range(len(run["top2_margins"])), key=run["top2_margins"].__getitem__)
                print(f"  smallest top-2 logit margin {run['top2_margins'][low]:.4g} at step {low + 1}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
