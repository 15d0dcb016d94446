"""A decode kernel streaming its weights from DRAM, with and without four-tile interleaving (issue 12).

A model's decode step reads every weight once, so each matmul streams from memory, not from the caches. This
script builds the C++ `pbs2p_kernel_bench` (custom_ops/tests, no ONNX Runtime) and runs its `cold` mode: enough
copies of one weight to outgrow the last-level cache twice over, walked in turn by THREADS threads taking tile
groups from one counter, as the op's ParallelFor does. Per shape it times the tile copy with each interleave
(1 = every tile its own stream, 4 = a four-tile group's quads side by side, `RuntimeWeight::interleave`),
rounds interleaved, and reports the code stream's GB/s.

    .venv/bin/python bench/cold_streams.py --threads 2 --rounds 2 --out bench/results/cold-streams
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from peers import exit_usage, machine, print_report

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build" / "kernel-bench"
# ROWS x K of the 1.5B model's q/k/v, o, gate/up and down, then the default model's gate/up and o
SHAPES = ["2048x1536", "1536x1536", "17920x1536", "1536x8960", "3072x576", "576x576"]
MAX_INTERLEAVE = 8  # kMaxInterleave in custom_ops/kernels/kernels.h; checked here before the build
LINE = re.compile(r"interleave=(\d+): ([0-9.]+) GB/s \(median pass ([0-9.]+)\)")


def build() -> Path:
    """The kernel bench binary (Release), configured and built under build/kernel-bench (log: build.log)."""
    configure = ["cmake", "-S", str(REPO / "custom_ops"), "-B", str(BUILD), "-DPBS2P_BUILD_OP=OFF"]
    configure += ["-DPBS2P_BUILD_TESTS=ON", "-DCMAKE_BUILD_TYPE=Release"]
    BUILD.mkdir(parents=True, exist_ok=True)
    log = BUILD / "build.log"
    with log.open("w") as sink:
        for command in (
            configure,
            ["cmake", "--build", str(BUILD), "--target", "pbs2p_kernel_bench", "-j", "2"],
        ):
            try:
                failed = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT).returncode != 0
            except FileNotFoundError:
                exit_usage("cmake not found on PATH (the kernel bench needs CMake and a C++17 compiler)")
            if failed:
                exit_usage(f"building pbs2p_kernel_bench failed (log: {log})")
    return BUILD / "pbs2p_kernel_bench"


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache sysfs reports for cpu0 (64 MiB when it reports none)."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        text = (index / "size").read_text().strip() if (index / "size").is_file() else ""
        match = re.fullmatch(r"(\d+)([KMG]?)", text)
        if match:
            sizes.append(int(match[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[match[2]])
    return max(sizes, default=64 << 20)


def parse_shape(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 8 or int(match[2]) % 8:
        exit_usage(f"--shapes {text}: want ROWSxK with K a multiple of 8, e.g. 17920x1536")
    return int(match[1]), int(match[2])


def run_one(
    binary: Path, args: argparse.Namespace, llc_bytes: int, rows: int, k: int, interleave: int
) -> tuple[float, float]:
    copies = max(1, -(-2 * llc_bytes // (rows * k // 4)))  # 2-bit codes: rows * k / 4 bytes
    command = [str(binary), str(rows), str(k), "1", args.kernel, str(args.iterations), "cold", str(copies)]
    command += [str(args.threads), str(interleave)]
    done = subprocess.run(command, capture_output=True, text=True)
    match = LINE.search(done.stdout)
    if done.returncode != 0 or not match:
        last = ((done.stderr or done.stdout).strip().splitlines() or ["no output"])[-1]
        exit_usage(f"{' '.join(command)}: {last}")
    return float(match[2]), float(match[3])  # best pass, median pass


def render(report: dict[str, Any]) -> list[str]:
    interleaves = report["interleaves"]
    lines = [
        f"# Cold decode streams, {report['kernel']}, {report['threads']} thread(s), {report['rounds']} rounds",
        "",
        "| ROWS x K | "
        + " | ".join(f"interleave {n} GB/s" for n in interleaves)
        + f" | {interleaves[-1]} / {interleaves[0]} |",
        "|---|" + "---|" * (len(interleaves) + 1),
    ]
    for row in report["results"]:
        cells = [f"{min(row['gbs'][str(n)]):.1f}-{max(row['gbs'][str(n)]):.1f}" for n in interleaves]
        first, last = (
            sum(row["gbs"][str(n)]) / len(row["gbs"][str(n)]) for n in (interleaves[0], interleaves[-1])
        )
        lines.append(f"| {row['shape']} | " + " | ".join(cells) + f" | {last / first:.2f}x |")
    lines += [
        "",
        f"GB/s of the tile copy's bytes in a run's best pass (min-max over rounds; each run's median pass is in the "
        f"json); ratio of the means. Each run walks copies of the "
        f"weight totalling twice the {report['llc_bytes'] >> 20} MiB last-level cache. Machine: "
        f"{report['machine']['cpu']}, {report['machine']['logical_cpus']} logical CPUs. "
        f"Command: `{report['command']}`.",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="ROWSxK weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20, help="timed passes over all the copies per run")
    parser.add_argument("--kernel", default="avx512-vbmi-tile", help="a tile kernel this CPU runs")
    parser.add_argument("--interleave", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    shapes = [parse_shape(s) for s in args.shapes]
    for name, value in (
        ("--threads", args.threads),
        ("--rounds", args.rounds),
        ("--iterations", args.iterations),
    ):
        if value < 1:
            exit_usage(f"{name} must be at least 1, got {value}")
    if any(n < 1 or n > MAX_INTERLEAVE for n in args.interleave):
        exit_usage(f"--interleave values must be in [1, {MAX_INTERLEAVE}], got {args.interleave}")
    binary = build()
    llc_bytes = last_level_cache_bytes()
    best: dict[tuple[int, int], dict[str, list[float]]] = {
        x: {str(n): [] for n in args.interleave} for x in shapes
    }
    median = {x: {str(n): [] for n in args.interleave} for x in shapes}
    for _ in range(args.rounds):
        for rows, k in shapes:
            for n in args.interleave:
                top, mid = run_one(binary, args, llc_bytes, rows, k, n)
                best[(rows, k)][str(n)].append(top)
                median[(rows, k)][str(n)].append(mid)
    report = {
        "kernel": args.kernel,
        "threads": args.threads,
        "rounds": args.rounds,
        "interleaves": args.interleave,
        "llc_bytes": llc_bytes,
        "machine": machine(),
        "command": " ".join(["bench/cold_streams.py", *(argv if argv is not None else sys.argv[1:])]),
        "results": [
            {"shape": f"{r}x{k}", "gbs": best[(r, k)], "median_pass_gbs": median[(r, k)]} for r, k in shapes
        ],
    }
    print_report(args.out, report, render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
