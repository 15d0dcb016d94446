"""The end-to-end pass's teacher in float32 against bf16 autocast (issue 10): seconds per window and what the
bf16 teacher changes in the targets.

The end-to-end pass trains on the FP model's top-64 log-probs per position, computed once before compression
(`recover.teacher_topk`, one forward per calibration window: 1024 windows on the default model, 9 minutes of
a 30-minute compress on 2 idle cores). This script times that forward both ways over the same windows of the
calibration split (interleaved reps, one process) and scores the bf16 targets against the float32 ones with
the pass's own loss, the top-k KL(fp32 teacher || bf16 teacher), beside the floor that the fp16 storage of
the targets leaves (the float32 teacher scored against its own stored targets). Compare the KL with what the
student reaches (default model ~1.0, 1.5B ~0.5: the compress summary's "end-to-end recovery" line).

    .venv/bin/python bench/teacher_dtype.py --model default --windows 16 --out bench/results/teacher-dtype-smollm2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16")


def timed_teacher(model: Any, ids: Any, args: argparse.Namespace, dtype: str) -> tuple[float, Any]:
    from pbs2p_edge.compress.recover import teacher_topk

    started = time.perf_counter()
    top = teacher_topk(model, ids, args.topk, args.micro_batch, dtype=dtype)
    return (time.perf_counter() - started) / ids.shape[0], top


def fidelity(model: Any, ids: Any, reference: Any, other: Any, micro_batch: int) -> dict[str, float]:
    """How far the bf16 teacher's distributions are from the float32 teacher's targets."""
    import torch

    from pbs2p_edge.compress.recover import mean_topk_kl, teacher_autocast

    with teacher_autocast("bfloat16"):
        kl_bf16 = mean_topk_kl(model, ids, reference, micro_batch)
    overlap = [
        len(set(a.tolist()) & set(b.tolist())) / a.numel()
        for a, b in zip(reference[1].flatten(0, 1), other[1].flatten(0, 1), strict=True)
    ]
    return {
        "kl_fp32_to_bf16": kl_bf16,
        "kl_floor_fp16_targets": mean_topk_kl(model, ids, reference, micro_batch),
        "top1_agreement": float((reference[1][..., 0] == other[1][..., 0]).float().mean()),
        "topk_overlap": sum(overlap) / len(overlap),
        "max_abs_top1_logprob_diff": float(
            torch.where(
                reference[1][..., 0] == other[1][..., 0],
                (reference[0][..., 0].float() - other[0][..., 0].float()).abs(),
                torch.zeros(()),
            ).max()
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="a name `pbs2p-edge eval` takes or a folder (default model)"
    )
    parser.add_argument("--windows", type=int, default=16, help="calibration-split windows")
    parser.add_argument("--len", dest="seq_len", type=int, default=256, help="tokens per window")
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2, help="interleaved timing rounds")
    parser.add_argument("--seed", type=int, default=11, help="seed of the window draw")
    parser.add_argument("--out", type=Path, help="bench/results/NAME: writes NAME.json and NAME.md")
    args = parser.parse_args()
    from peers import exit_usage, print_report

    if min(args.windows, args.seq_len, args.topk, args.micro_batch, args.reps) < 1:
        exit_usage("--windows, --len, --topk, --micro-batch and --reps must be positive")
    import torch

    from pbs2p_edge import sources
    from pbs2p_edge.cpu import native_bf16
    from pbs2p_edge.errors import Pbs2pError

    try:
        model, tokenizer = sources.load_model(args.model)
        ids = sources.calibration_ids(tokenizer, args.windows, args.seq_len, args.seed)
    except Pbs2pError as exc:
        exit_usage(str(exc))
    model = model.float().eval()
    seconds: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
    tops: dict[str, Any] = {}
    for _ in range(args.reps):
        for dtype in DTYPES:
            per_window, tops[dtype] = timed_teacher(model, ids, args, dtype)
            seconds[dtype].append(per_window)
    scores = fidelity(model, ids, tops["float32"], tops["bfloat16"], args.micro_batch)
    report = {
        "command": "bench/teacher_dtype.py " + " ".join(sys.argv[1:]),
        "model": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "native_bf16": native_bf16(),
        "torch_threads": torch.get_num_threads(),
        "windows": args.windows,
        "seq_len": args.seq_len,
        "seconds_per_window": seconds,
        **scores,
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    best = {dtype: min(values) for dtype, values in seconds.items()}
    lines = [
        "# The end-to-end pass's teacher: float32 against bf16 autocast",
        "",
        f"Command: `{report['command']}`  ",
        f"Model: {report['model']}, {report['parameters'] / 1e6:.0f} M parameters; {args.windows} windows x "
        f"{args.seq_len} tokens of the calibration split; {report['torch_threads']} threads; native bf16: "
        f"{'yes' if report['native_bf16'] else 'no'}; measured {report['measured']}.",
        "",
        "| teacher | s per window (each round) | best | speed-up |",
        "|---|---|---|---|",
    ]
    for dtype in DTYPES:
        rounds = " / ".join(f"{s:.3f}" for s in seconds[dtype])
        lines.append(f"| {dtype} | {rounds} | {best[dtype]:.3f} | {best['float32'] / best[dtype]:.2f}x |")
    lines += [
        "",
        "| what the bf16 targets change | value |",
        "|---|---|",
        f"| top-k KL(fp32 teacher \\|\\| bf16 teacher), the pass's loss | {scores['kl_fp32_to_bf16']:.5f} |",
        f"| the same for the fp32 teacher (fp16 storage of the targets: the floor) | "
        f"{scores['kl_floor_fp16_targets']:.5f} |",
        f"| top-1 token agreement | {scores['top1_agreement']:.2%} |",
        f"| top-{args.topk} set overlap | {scores['topk_overlap']:.2%} |",
        f"| largest top-1 log-prob difference where top-1 agrees | {scores['max_abs_top1_logprob_diff']:.4f} |",
    ]
    print_report(args.out, report, lines)


if __name__ == "__main__":
    main()
