"""Huge pages for the weights after load (issue 12): the runtime with and without them, on the same bundle.

With `PBS2P_EDGE_HUGE_PAGES=1`, `DecoderSession` moves what loading a bundle made resident in anonymous memory
(the kernels' weight copies) onto transparent huge pages (`runtime/memory.py: collapse_to_huge_pages`). This
script measures what that buys and costs: for each bundle, one worker
process with it and one without, the same prompt ids and threads, repetitions interleaved (pp then tg on each
variant in turn, the order alternating per repetition), so the per-repetition ratio holds on a machine whose
speed drifts by 15-30% between runs.

    .venv/bin/python bench/huge_pages.py out/pbs2p --threads 2 --reps 6 --out bench/results/huge-pages

It reports, per variant: load seconds, MiB on huge pages after load, pp/tg tok/s (mean ± std) and peak RSS
while generating; per bundle: on/off ratios, mean and (min-max) over the repetitions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peers import exit_usage, machine, print_report

VARIANTS = {"huge pages": "1", "4 KiB pages": "0"}
MIB = 1 << 20


def huge_page_variants() -> dict[str, dict[str, Any]]:
    """The two variants this script compares, as `WorkerProcess` keyword arguments."""
    from pbs2p_edge.runtime.session import HUGE_PAGES_ENV

    return {name: {"env": {HUGE_PAGES_ENV: flag}} for name, flag in VARIANTS.items()}


def measure(
    bundle: Path, threads: int, reps: int, pp: int, tg: int, variants: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Two variants of the runtime (`WorkerProcess` keyword arguments), each in its own worker process, on one
    bundle: pp then tg per variant in turn, the order alternating per repetition; the first over the second."""
    from pbs2p_edge.runtime.bench import WorkerProcess

    workers = {name: WorkerProcess(bundle, threads, **kwargs) for name, kwargs in variants.items()}
    samples: dict[str, dict[str, list[float]]] = {name: {"pp": [], "tg": []} for name in workers}
    try:
        names = list(workers)
        for rep in range(-1, reps):  # rep -1: warm-up, not counted
            for name in names if rep % 2 == 0 else names[::-1]:
                pp_run = workers[name].request("pp", n=pp, seed=rep + 1)
                tg_run = workers[name].request("tg", n=tg, seed=rep + 1)
                if rep >= 0:
                    samples[name]["pp"].append(pp / pp_run["seconds"])
                    samples[name]["tg"].append(tg / tg_run["seconds"])
            print(f"{bundle.name}: rep {rep + 1}/{reps} done", file=sys.stderr)
        memory = {name: worker.request("mem") for name, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()
    rows = []
    for name, worker in workers.items():
        rows.append(
            {
                "variant": name,
                "load_seconds": worker.info["load_seconds"],
                "huge_page_bytes": worker.info["huge_page_bytes"],
                "pp_tokens_per_second": samples[name]["pp"],
                "tg_tokens_per_second": samples[name]["tg"],
                "peak_rss_generation_bytes": memory[name]["peak_rss_generation"],
            }
        )
    first, second = (samples[name] for name in variants)
    ratios = {kind: [a / b for a, b in zip(first[kind], second[kind], strict=True)] for kind in ("pp", "tg")}
    return {"bundle": str(bundle), "threads": threads, "rows": rows, "first_over_second": ratios}


def _spread(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f}"


def _ratio(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def render(report: dict[str, Any], title: str, ratio: str) -> list[str]:
    """The md table: a row per bundle and variant; `ratio` names the first variant over the second."""
    lines = [
        f"# {title} ({report['threads']} threads, {report['reps']} interleaved reps)",
        "",
        "| bundle | variant | load s | on huge pages MiB | pp tok/s | tg tok/s | peak RSS gen MiB |"
        f" pp {ratio} | tg {ratio} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in report["results"]:
        name = Path(result["bundle"]).name
        for i, row in enumerate(result["rows"]):
            ratios = result["first_over_second"]
            lines.append(
                f"| {name} | {row['variant']} | {row['load_seconds']:.2f} | {row['huge_page_bytes'] / MIB:.0f} | "
                f"{_spread(row['pp_tokens_per_second'])} | {_spread(row['tg_tokens_per_second'])} | "
                f"{row['peak_rss_generation_bytes'] / MIB:.1f} | "
                + (f"{_ratio(ratios['pp'])} | {_ratio(ratios['tg'])} |" if i == 0 else "| |")
            )
    lines += [
        "",
        f"{ratio}: per repetition, the first variant's tok/s over the second's; mean (min-max). "
        f"pp{report['pp']} and tg{report['tg']} on random prompt ids, each variant in its own process. "
        f"Machine: {report['machine']['cpu']}, {report['machine']['logical_cpus']} logical CPUs, "
        f"{report['machine']['platform']}. Command: `{report['command']}`.",
        "Variants: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{key}={value}" for key, value in settings.items())
            for name, settings in report["variants"].items()
        )
        + ".",
    ]
    return lines


def run_ab(
    argv: list[str] | None,
    script: str,
    doc: str,
    title: str,
    ratio: str,
    variants: Callable[[argparse.Namespace], dict[str, dict[str, Any]]],
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """An A/B script's main: the shared options (plus `extra`'s), two `variants` from the parsed arguments,
    every bundle measured, the report printed (and written with --out)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--pp", type=int, default=128)
    parser.add_argument("--tg", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    for name, value in (
        ("--threads", args.threads),
        ("--reps", args.reps),
        ("--pp", args.pp),
        ("--tg", args.tg),
    ):
        if value < 1:
            exit_usage(f"{name} must be at least 1, got {value}")
    for bundle in args.bundles:
        if not (bundle / "manifest.json").is_file():
            exit_usage(f"{bundle} is not a bundle (no manifest.json)")

    from pbs2p_edge.errors import Pbs2pError

    pair = variants(args)
    try:
        results = [
            measure(b.resolve(), args.threads, args.reps, args.pp, args.tg, pair) for b in args.bundles
        ]
    except Pbs2pError as exc:
        exit_usage(str(exc))
    report = {
        "threads": args.threads,
        "reps": args.reps,
        "pp": args.pp,
        "tg": args.tg,
        "machine": machine(),
        "command": " ".join([script, *(argv if argv is not None else sys.argv[1:])]),
        "variants": pair,
        "results": results,
    }
    print_report(args.out, report, render(report, title, ratio))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_ab(
        argv,
        "bench/huge_pages.py",
        __doc__,
        "Huge pages for the weights after load",
        "on/off",
        lambda _args: huge_page_variants(),
    )


if __name__ == "__main__":
    sys.exit(main())
