"""`pbs2p-edge bench` on tiny bundles: every report field present and consistent (no speed assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli
from test_runtime import runtime_bundle

from pbs2p_edge.runtime.bundle import bundle_bytes

ROW_FIELDS = {
    "bundle", "name", "weights", "threads", "bundle_bytes", "load_seconds",
    "pp_tokens_per_second", "pp_tokens_per_second_std", "tg_tokens_per_second", "tg_tokens_per_second_std",
    "ttft_seconds", "decode_latency_p50_seconds", "decode_latency_p95_seconds",
    "rss_before_load_bytes", "rss_after_load_bytes", "peak_rss_load_bytes", "peak_rss_generation_bytes",
    "peak_rss_exact", "bare_session_rss_bytes", "kv_cache_bytes", "kv_bytes_per_token",
    "weight_bytes", "decode_bytes_per_token", "decode_bandwidth_gb_per_second",
    "memory_budget_bytes", "peak_rss_over_budget",
}  # fmt: skip
RATIO_FIELDS = {"bundle", "baseline", "threads", "tg_speedup", "pp_speedup", "size_ratio", "peak_rss_ratio"}
PROFILE_FIELDS = {"bundle", "name", "threads", "context", "steps", "step_seconds", "run_seconds",
                  "sampling_seconds", "kernel_seconds_by_op"}  # fmt: skip
PP, TG = 8, 6


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> list[Path]:
    return [runtime_bundle(tmp_path_factory, tiny_model_dir, kind) for kind in ("pbs2p", "fp32")]


@pytest.fixture(scope="module")
def bench_run(bundles: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", *bundles, "--pp", str(PP), "--tg", str(TG), "--reps", "2", "--warmup", "1"]
    args += ["--threads", "1,2", "--json", out / "bench.json", "--plot", out / "bench.png"]
    args += ["--profile", "--profile-steps", "3", "--prefill-chunk", "5"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return result, json.loads((out / "bench.json").read_text()), out / "bench.png"


def test_bench_json_has_every_field(bench_run, bundles: list[Path]) -> None:
    _, report, _ = bench_run
    assert report["format"] == "pbs2p-edge-bench"
    assert {"settings", "machine", "bare_session", "results", "ratios", "profiles"} <= set(report)
    settings = report["settings"]
    assert settings["pp"] == PP and settings["tg"] == TG and settings["threads"] == [1, 2]
    assert settings["prefill_chunk"] == 5
    rows = report["results"]
    assert [(Path(r["bundle"]).name, r["threads"]) for r in rows] == [
        (b.name, t) for b in bundles for t in (1, 2)
    ]
    for row in rows:
        assert set(row) == ROW_FIELDS, set(row) ^ ROW_FIELDS
        for key in ROW_FIELDS - {"bundle", "name", "weights", "peak_rss_exact"}:
            assert isinstance(row[key], (int, float)) and np.isfinite(row[key]) and row[key] >= 0, key
        assert row["bundle_bytes"] == bundle_bytes(row["bundle"])
        manifest = json.loads((Path(row["bundle"]) / "manifest.json").read_text())
        if (
            manifest.get("graph") == "fused"
        ):  # fixed-length buffers of KV_BUFFER_STEP multiples (runtime/session.py)
            from pbs2p_edge.runtime.session import KV_BUFFER_STEP

            kv_tokens = -(-TG // KV_BUFFER_STEP) * KV_BUFFER_STEP
            assert (
                row["kv_cache_bytes"]
                == min(kv_tokens, manifest["context_length"]) * row["kv_bytes_per_token"]
            )
        else:
            assert row["kv_cache_bytes"] == TG * row["kv_bytes_per_token"]
        assert row["weight_bytes"] == sum(manifest["sizes"]["weights"].values())
        assert row["decode_latency_p50_seconds"] <= row["decode_latency_p95_seconds"]
        assert row["ttft_seconds"] > 0 and row["pp_tokens_per_second"] > 0 and row["tg_tokens_per_second"] > 0
        assert row["peak_rss_load_bytes"] >= row["rss_before_load_bytes"] > 0
        assert (
            row["memory_budget_bytes"]
            == row["bundle_bytes"] + row["kv_cache_bytes"] + row["bare_session_rss_bytes"]
        )
        assert row["peak_rss_over_budget"] == pytest.approx(
            row["peak_rss_generation_bytes"] / row["memory_budget_bytes"]
        )
    assert [r["weights"] for r in rows] == ["pbs2p", "pbs2p", "fp32", "fp32"]


def test_bench_ratios_and_profile(bench_run) -> None:
    _, report, _ = bench_run
    assert len(report["ratios"]) == 2  # the first bundle against the second, at each thread count
    for ratio in report["ratios"]:
        assert set(ratio) == RATIO_FIELDS and ratio["baseline"] != ratio["bundle"]
        assert all(ratio[k] > 0 for k in ("tg_speedup", "pp_speedup", "size_ratio", "peak_rss_ratio"))
    profiles = {p["name"]: p for p in report["profiles"]}
    assert len(profiles) == 2
    for profile in profiles.values():
        assert set(profile) == PROFILE_FIELDS and profile["steps"] == 3
        assert (
            profile["step_seconds"]
            >= profile["run_seconds"]
            > sum(profile["kernel_seconds_by_op"].values())
            > 0
        )
    pbs2p = next(p for p in report["profiles"] if p["name"] == "pbs2p")
    assert "SparseBinaryMatMul" in pbs2p["kernel_seconds_by_op"]


def test_bench_prints_markdown_and_plot(bench_run) -> None:
    result, _, png = bench_run
    assert result.stdout.startswith("| bundle | weights | threads |")
    assert result.stdout.count("\n| pbs2p | pbs2p |") == 2 and "Decode step of pbs2p" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_bad_input(bundles: list[Path], tmp_path: Path) -> None:
    assert_one_line_error(run_cli("bench", tmp_path / "missing"), "does not exist")
    assert_one_line_error(run_cli("bench", tmp_path), "not a pbs2p-edge bundle")
    assert_one_line_error(run_cli("bench", bundles[1], "--threads", "one"), "--threads")
    assert_one_line_error(run_cli("bench", bundles[1], "--threads", "0"), "--threads")
    assert_one_line_error(run_cli("bench", bundles[1], "--pp", "0"), "--pp")
    assert_one_line_error(run_cli("bench", bundles[1], "--tg", "100000"), "context")
    assert_one_line_error(run_cli("bench", bundles[1], bundles[1]), "twice")


def test_bare_session_model_runs() -> None:
    import onnxruntime as ort

    from pbs2p_edge.runtime.bench_worker import minimal_model_bytes

    session = ort.InferenceSession(minimal_model_bytes(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.array([4.5], dtype=np.float32)})[0].tolist() == [4.5]


def test_peak_rss_sees_a_short_allocation() -> None:
    from pbs2p_edge.runtime.memory import PeakRss, current_rss

    before = current_rss()
    with PeakRss() as meter:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del block
    assert meter.peak >= before + 60 * 2**20


X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 0
"""

PI5_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
CPU implementer\t: 0x41
CPU part\t: 0xd0b

Revision\t: d04170
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""


def test_cpu_name_tells_generations_of_one_brand_apart() -> None:
    from pbs2p_edge.runtime.bench import cpu_name

    assert cpu_name(X86_CPUINFO) == "AMD EPYC (cpu family 25, model 17, stepping 1)"
    assert cpu_name(PI5_CPUINFO) == "Raspberry Pi 5 Model B Rev 1.0"
    assert cpu_name("") != ""
