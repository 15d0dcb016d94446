"""bench/memory_breakdown.py on a tiny bundle: every variant's points, the major-fault column, usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, load_bench_script
from test_runtime import runtime_bundle

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "memory_breakdown.py"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="smaps and getrusage faults are Linux"
)


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, check=False)


def test_each_variant_reports_every_point(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tmp_path: Path
) -> None:
    bundle = runtime_bundle(tmp_path_factory, tiny_model_dir, "pbs2p")
    out = tmp_path / "memory-tiny.1"
    done = _run(str(bundle), "--pp", "5", "--tg", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.with_name(out.name + ".json").read_text())
    assert list(report["variants"]) == ["default", "keep file cache", "no prepack"]
    for run in report["variants"].values():
        points = run["points"]
        assert list(points) == [
            "before load",
            "after tokenizer",
            "after load",
            "after prefill 5",
            "after 3 decode steps",
        ]
        faults = [point["major_faults"] for point in points.values()]
        assert faults == sorted(faults)  # a process's fault count only grows
        assert run["peak_rss"] >= max(point["rss"] for point in points.values()) > 0
    text = out.with_name(out.name + ".md").read_text()
    assert "| keep file cache | after 3 decode steps |" in text and "major page faults" in text
    assert "SparseBinaryMatMul" in text
    assert report["cold_read_us"] > 0 and "A cold 4 KiB read" in text
    # the ledger: the default variant's generation peak against `pbs2p-edge bench`'s budget, split by stage
    module = load_bench_script("memory_breakdown")
    ledger = module.budget_ledger(report)
    default = report["variants"]["default"]
    assert (
        ledger["budget"] == report["bundle_bytes"] + default["kv_buffer_bytes"] + report["bare_session_rss"]
    )
    assert ledger["over"] == ledger["peak"] - ledger["budget"]
    stages = ledger["imports"] + ledger["tokenizer"] + ledger["load"] + ledger["generation"]
    assert stages == ledger["over"]  # the stages add up to the excess exactly
    assert ledger["peak"] == default["generation_peak_rss"] <= default["peak_rss"]
    assert 0 < report["tokenizer_alone"]["live"] <= report["tokenizer_alone"]["loaded"]
    assert f"| **budget** | {ledger['budget'] / 2**20:.1f} |" in text
    assert f"(peak / budget {ledger['peak'] / ledger['budget']:.2f})" in text


def test_ledger_needs_a_reset_peak() -> None:
    points = {p: {"rss": 1, "anonymous": 1} for p in ("before load", "after tokenizer", "after load")}
    run = {"points": points, "generation_peak_rss": None, "kv_buffer_bytes": 0}
    report = {"variants": {"default": run, "no prepack": run}, "bare_session_rss": 1, "bundle_bytes": 1}
    module = load_bench_script("memory_breakdown")
    assert module.budget_ledger(report) is None and module.over_budget(report) == []


def test_usage_errors(tmp_path: Path) -> None:
    assert_one_line_error(_run(str(tmp_path)), "not a bundle")
    (tmp_path / "manifest.json").write_text("{}")
    assert_one_line_error(_run(str(tmp_path), "--tg", "-1"), "--tg")
