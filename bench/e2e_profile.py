"""Where an end-to-end recovery step's time goes (issue 10, compress time), from one compressed model.

Runs `recover_e2e` for a few steps on calibration windows, once per step precision (float32, bfloat16
autocast), then once more in float32 under `torch.profiler`, and reports the wall seconds of each and the ops
with the most self CPU time. Seconds are only comparable within one run on an otherwise idle machine.

    OMP_NUM_THREADS=2 .venv/bin/python bench/e2e_profile.py --from model.pt --steps 6 --out bench/results/e2e-profile
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def timed_pass(
    ckpt: dict[str, Any], ids: Any, teacher: Any, steps: int, dtype: str, profile: bool
) -> dict[str, Any]:
    import torch

    from pbs2p_edge.checkpoint import build_model, packed_layers
    from pbs2p_edge.compress.head import deployed_head
    from pbs2p_edge.compress.recover import recover_e2e
    from pbs2p_edge.format import unpack

    model, _ = build_model(ckpt)
    weights = {name: unpack(p) for name, p in packed_layers(ckpt).items()}
    profiler = torch.profiler.profile() if profile else None
    started = time.perf_counter()
    with deployed_head(model, "int4"):
        if profiler is not None:
            profiler.start()
        stats = recover_e2e(model, weights, ids, teacher, steps=steps, lr=2e-3, micro_batch=2, dtype=dtype)
        if profiler is not None:
            profiler.stop()
    result = {"dtype": dtype, "seconds": time.perf_counter() - started, "kl_after": stats["after"]}
    if profiler is not None:
        events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1
        result["top_ops"] = [[e.key, round(100 * e.self_cpu_time_total / total, 1)] for e in events[:10]]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, required=True, help="model.pt from compress")
    parser.add_argument("--steps", type=int, default=6, help="E2E steps per pass (2 windows each)")
    parser.add_argument("--out", type=Path, help="bench/results/NAME: writes NAME.json and NAME.md")
    args = parser.parse_args()
    from e2e_from import start_checkpoint, teacher_for
    from peers import exit_usage, print_report

    if not args.source.is_file():
        exit_usage(f"{args.source} does not exist")
    if args.steps < 1:
        exit_usage("--steps must be at least 1")
    import torch

    from pbs2p_edge import sources
    from pbs2p_edge.compress.recover import teacher_topk
    from pbs2p_edge.errors import Pbs2pError

    ckpt = start_checkpoint(args.source)
    cfg = ckpt["compression"]
    try:
        fp_model, tokenizer = teacher_for(ckpt, None)
    except Pbs2pError as exc:
        exit_usage(str(exc))
    ids = sources.calibration_ids(tokenizer, 2 * args.steps, cfg["calib_len"], cfg["seed"] + 5)
    teacher = teacher_topk(fp_model, ids, cfg.get("e2e_topk", 64), 2)
    del fp_model
    runs = [timed_pass(ckpt, ids, teacher, args.steps, d, False) for d in ("float32", "bfloat16")]
    runs.append(timed_pass(ckpt, ids, teacher, args.steps, "float32", True))
    report = {
        "command": "bench/e2e_profile.py " + " ".join(sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "runs": runs,
    }
    lines = [f"# E2E step profile of {args.source.name}", "", f"Command: `{report['command']}`", ""]
    lines += [
        "| steps in | seconds (the steps, and the KL over the same windows before and after) | KL after |",
        "|---|---|---|",
    ]
    for r in runs:
        label = r["dtype"] + (" (profiled)" if "top_ops" in r else "")
        lines.append(f"| {label} | {r['seconds']:.2f} | {r['kl_after']:.4f} |")
    lines += ["", "| op (float32, profiled) | self CPU % |", "|---|---|"]
    lines += [f"| {name} | {share} |" for name, share in runs[-1]["top_ops"]]
    print_report(args.out, report, lines)


if __name__ == "__main__":
    main()
