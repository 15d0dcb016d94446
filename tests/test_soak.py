"""Soak and concurrency on a tiny PBS2P bundle (bounded time): RSS over many decode steps, threads sharing one
session, Ctrl-C mid-generation. The 10,000-step figure for the README comes from `bench/soak.py` on a real
bundle; here the same script runs fewer steps."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_helpers import run_cli
from test_runtime import PROMPTS, runtime_bundle

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pbs2p_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return runtime_bundle(tmp_path_factory, tiny_model_dir, "pbs2p")


def test_soak_script_rss_growth_and_concurrency(pbs2p_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    command = [sys.executable, str(REPO / "bench" / "soak.py"), str(pbs2p_bundle), "--steps", "3000"]
    command += ["--warmup", "4000", "--seq-len", "200", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    soak = report["soak"]
    assert soak["steps"] == 3000 and soak["sequences"] >= 3000 // 200
    assert soak["rss_growth_percent"] < 1.0, soak
    assert report["concurrency"]["mismatches"] == 0 and report["concurrency"]["threads"] == 4


def test_four_threads_on_one_session_get_their_own_outputs(pbs2p_bundle: Path) -> None:
    from pbs2p_edge.runtime import Generator

    generator = Generator(pbs2p_bundle, threads=1)
    prompts = [*PROMPTS, "sparse masks on the edge", "the small language model"]
    options = [dict(temperature=1.0, seed=i) for i in range(len(prompts))]  # seeded: same tokens every run
    alone = [generator.generate(p, 20, **o).token_ids for p, o in zip(prompts, options, strict=True)]
    assert len({tuple(a) for a in alone}) == len(prompts)  # different inputs, different outputs
    forks = [generator.fork() for _ in prompts]
    assert all(f.session.session is generator.session.session for f in forks)  # one onnxruntime session
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            jobs = [
                pool.submit(f.generate, p, 20, **o) for f, p, o in zip(forks, prompts, options, strict=True)
            ]
            assert [job.result().token_ids for job in jobs] == alone


def test_interrupted_generation_then_generate_again(pbs2p_bundle: Path) -> None:
    """In one process: a generation abandoned half-way leaves nothing behind for the next one."""
    from pbs2p_edge.runtime import Generator

    generator = Generator(pbs2p_bundle, threads=1)
    expected = generator.generate(PROMPTS[1], 16).token_ids
    generation = generator.start(PROMPTS[0], 64)
    for index, _ in enumerate(generation):
        if index == 5:
            break
    assert generation.result.stop_reason is None
    assert generator.generate(PROMPTS[1], 16).token_ids == expected


def test_ctrl_c_mid_generation_exits_cleanly_then_generate_works(pbs2p_bundle: Path) -> None:
    """SIGINT to `pbs2p-edge generate` while it streams: exit 130, no traceback; the next run works.

    The process is stopped (SIGSTOP) as soon as its first text arrives, so the SIGINT lands mid-generation
    however fast the tiny model decodes, and is delivered when it continues (SIGCONT).
    """
    command = [sys.executable, "-m", "pbs2p_edge.cli", "generate", str(pbs2p_bundle), "-p", PROMPTS[0]]
    command += ["-n", "200", "--threads", "1", "--temperature", "1", "--seed", "0"]
    # A job started in the background by a non-interactive shell (`... &`, as CI runners may) inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler: give the child the default, as a terminal
    # session has.
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stdout is not None
        first = process.stdout.read(1)
        process.send_signal(signal.SIGSTOP)
        assert first, process.stderr.read() if process.stderr else ""
        process.send_signal(signal.SIGINT)
        time.sleep(0.05)
        process.send_signal(signal.SIGCONT)
        rest, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    stderr_text = stderr.decode()
    assert process.returncode == 130, stderr_text
    assert "Traceback" not in stderr_text and "interrupted after" in stderr_text
    generated = int(stderr_text.split("interrupted after ")[1].split()[0])
    assert 0 < generated < 200
    assert (first + rest).endswith(b"\n")
    again = run_cli("generate", pbs2p_bundle, "-p", PROMPTS[0], "-n", "8", "--threads", "1")
    assert again.returncode == 0 and again.stdout.strip(), again.stderr
