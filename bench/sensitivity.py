"""The bit budget's plan for one model, without compressing it (issue 10): per-layer sensitivity and N, and the
decoder layers a budget keeps in int4.

`pbs2p-edge compress` decides both before its layer loop (`pipeline.plan_layers`: CFS, then the budget's
probe); this script runs exactly that step with the same calibration windows and reports it, with the
probe's wall time and the process's peak RSS. Models that `compress` streams one layer at a time (fp32 above
2 GiB) are streamed here too, so the 1.5B model's plan costs minutes, not a compress:

    .venv/bin/python bench/sensitivity.py --model qwen2.5-coder-1.5b --budget-bits 2.5 --out bench/results/budget-qwen1.5b

Writes OUT.md (one row per decoder layer) and OUT.json.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

from peers import exit_usage, write_report


def plan(args: argparse.Namespace) -> dict[str, Any]:
    import resource

    import torch

    from pbs2p_edge import sources
    from pbs2p_edge.compress.cli import load_for_compress
    from pbs2p_edge.compress.pipeline import (
        calibration_windows,
        check_supported,
        deterministic,
        linear_names,
        plan_layers,
    )
    from pbs2p_edge.config import PBS2PConfig, parse_nm

    n, m = parse_nm(args.nm)
    config = PBS2PConfig(n=n, m=m, budget_bits=args.budget_bits, seed=args.seed)
    folder = sources.model_files(args.model)
    model, tokenizer, store = load_for_compress(folder)
    check_supported(model)
    model.float().eval()
    calib, _ = calibration_windows(tokenizer, config, args.text)
    start = time.perf_counter()
    with deterministic(config.seed), torch.no_grad():
        layer_n, cosines, _, budget = plan_layers(model, calib, config, linear_names(model), store, True)
    return {
        "model": folder.name,
        "nm": args.nm,
        "streamed": store is not None,
        "layer_n": layer_n,
        "cosines": cosines,
        "budget": budget,
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def markdown(report: dict[str, Any], command: str) -> str:
    budget = report["budget"]
    chosen = set(budget.get("int4_layers", []))
    sensitivity = budget.get("sensitivity") or []
    lines = [
        f"# Bit budget plan: {report['model']} {report['nm']}",
        "",
        f"Command: `{command}`  ",
        f"Budget {budget.get('budget_bits', '-')} bits/weight; the pattern alone stores "
        f"{budget.get('pattern_bits', float('nan')):.3f}. Layers kept in int4: "
        f"{sorted(chosen) or 'none'}. Plan (CFS + probe) {report['seconds']:.0f} s, of which the probe "
        f"{budget.get('probe_seconds', 0.0):.0f} s; peak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB; "
        f"{'layers streamed from the safetensors' if report['streamed'] else 'whole model in memory'}.  ",
        f"Machine: {platform.machine()}, CPython {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| layer | N | CFS cosine | sensitivity (loss increase) | int4 |",
        "|---|---|---|---|---|",
    ]
    for index, n in enumerate(report["layer_n"]):
        cosine = f"{report['cosines'][index]:.4f}" if report["cosines"] else "-"
        sens = f"{sensitivity[index]:.4f}" if sensitivity else "-"
        lines.append(f"| {index} | {n} | {cosine} | {sens} | {'yes' if index in chosen else ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default", help="Model name, folder or GGUF (as compress takes).")
    parser.add_argument("--nm", default="6:8")
    parser.add_argument("--budget-bits", type=float, default=None, help="Default: compress's default.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--text", type=Path, default=None, help="Corpus text file (default: the packaged one)."
    )
    parser.add_argument("--out", type=Path, required=True, help="Stem of OUT.md and OUT.json.")
    args = parser.parse_args(argv)
    from pbs2p_edge.errors import Pbs2pError

    try:
        report = plan(args)
    except Pbs2pError as exc:
        exit_usage(str(exc))
    command = "bench/sensitivity.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(report, command)
    write_report(args.out, report, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
