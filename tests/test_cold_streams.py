"""bench/cold_streams.py's pure parts: arguments, the kernel bench's output line, the table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, load_bench_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "cold_streams.py"


@pytest.fixture(scope="module")
def cold():
    return load_bench_script("cold_streams")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--shapes", "17920x1530"], "--shapes 17920x1530"),
        (["--shapes", "big"], "--shapes big"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--interleave", "1", "9"], "--interleave values"),
    ],
)
def test_bad_arguments_give_one_line(args: list[str], needle: str) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    assert_one_line_error(result, needle)


def test_the_pattern_reads_the_kernel_bench_cold_line(cold) -> None:
    source = (ROOT / "custom_ops" / "tests" / "kernel_bench.cpp").read_text()
    (fmt,) = re.findall(r'"(%-16s rows=%d k=%d cold [^"]*)\\n"', source)
    line = fmt.replace("%-16s", "avx512-vbmi-tile").replace("%.1f", "41.3")
    for value in ("17920", "1536", "8", "2", "4"):  # rows, k, copies, threads, interleave
        line = line.replace("%d", value, 1)
    match = cold.LINE.search(line)
    assert match and (match[1], float(match[2])) == ("4", 41.3)


def test_table_has_a_row_per_shape_and_the_ratio_of_means(cold) -> None:
    report = {
        "kernel": "avx512-vbmi-tile",
        "threads": 2,
        "rounds": 2,
        "interleaves": [1, 4],
        "llc_bytes": 32 << 20,
        "machine": {"cpu": "x", "logical_cpus": 2},
        "command": "bench/cold_streams.py",
        "results": [{"shape": "17920x1536", "gbs": {"1": [20.0, 30.0], "4": [40.0, 35.0]}}],
    }
    lines = cold.render(report)
    assert "| 17920x1536 | 20.0-30.0 | 35.0-40.0 | 1.50x |" in lines
    assert any("32 MiB last-level cache" in line for line in lines)


def test_missing_cmake_gives_one_line(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path)}  # an empty directory: no cmake to find
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env)
    assert_one_line_error(result, "cmake not found on PATH")
