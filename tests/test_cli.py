from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run_cli

from pbs2p_edge.cli import cli


def test_help_on_group_and_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0 and "eval" in result.stdout
    for name in cli.commands:
        sub = run_cli(name, "--help")
        assert sub.returncode == 0, (name, sub.stderr)
        assert "Usage:" in sub.stdout


def test_eval_tiny_model_json(tiny_model_dir: Path, corpus_text_file: Path) -> None:
    result = run_cli(
        "eval",
        tiny_model_dir,
        "--text",
        corpus_text_file,
        "--ctx",
        "64",
        "--tokens",
        "256",
        "--json",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["windows"] == 4 and data["tokens"] == 256 and data["predicted_tokens"] == 4 * 63
    # a random tiny model is close to uniform over its vocabulary
    assert 100 < data["ppl"] < 5000


@pytest.mark.parametrize("ctx", ["0", "-5", "1"])
def test_eval_rejects_bad_context(tiny_model_dir: Path, ctx: str) -> None:
    assert_one_line_error(run_cli("eval", tiny_model_dir, "--ctx", ctx), "--ctx")


def test_eval_missing_model(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("eval", tmp_path / "missing"), "does not exist")


def test_eval_unreadable_text(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("eval", tiny_model_dir, "--text", tmp_path / "none.txt"), "does not exist")


def test_eval_text_shorter_than_a_window(tiny_model_dir: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("only a handful of tokens here")
    assert_one_line_error(run_cli("eval", tiny_model_dir, "--text", short), "fewer than one window")


@pytest.mark.slow
def test_eval_default_model_perplexity() -> None:
    result = run_cli("eval", "--ctx", "256", "--tokens", "1024", "--json", "--no-progress")
    assert result.returncode == 0, result.stderr
    ppl = json.loads(result.stdout)["ppl"]
    assert 5 < ppl < 40, ppl  # SmolLM2-135M on Wikipedia introductions: about 13 at ctx 512


def test_cli_imports_without_torch() -> None:
    """The CLI module (hence `generate` and `bench` on a torch-free device) must not import torch or transformers."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from pbs2p_edge.cli import cli\n"
        "assert {'generate', 'bench'} <= set(cli.commands), cli.commands\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
