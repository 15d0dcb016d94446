"""bench/chat_probe.py: its answer checks, a run on a tiny bundle against the same FP model, and its usage errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import load_bench_script
from test_runtime import runtime_bundle


@pytest.fixture(scope="module")
def probe():
    return load_bench_script("chat_probe")


@pytest.mark.parametrize(
    ("index", "reply", "right"),
    [
        (0, "The capital of France is Paris.", True),
        (0, "France is the largest country in Europe.", False),
        (3, "```python\ndef square(n):\n    return n ** 2\n```", True),
        (3, "def square(x): return x * x", True),
        (3, "A square is a shape with four sides.", False),
        (4, "2 + 2 equals 4.", True),
        (4, "2 + 2 is 14 in some bases.", False),
        (8, "The chemical symbol for gold is Au.", True),
        (8, "Gold is used because it is shiny.", False),
        (2, "Red, yellow and blue.", True),
        (2, "Red, green, and white.", False),
    ],
)
def test_answer_checks(probe, index: int, reply: str, right: bool) -> None:
    assert probe.passes(reply, probe.PROBES[index][1]) is right


def test_a_bundle_and_its_fp_model_give_the_same_greedy_replies(
    probe, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tmp_path: Path
) -> None:
    bundle = runtime_bundle(tmp_path_factory, tiny_model_dir, "fp32")
    out = tmp_path / "probe-1.5b"  # a dot in the name is not a suffix to replace
    argv = ["--bundle", f"tiny={bundle}", "--model", str(tiny_model_dir), "--dtype", "float32"]
    probe.main([*argv, "--max-new-tokens", "5", "--threads", "1", "--out", str(out)])
    report = json.loads(out.with_name(out.name + ".json").read_text())
    fp, ours = (report["systems"][name]["replies"] for name in ("fp", "tiny"))
    assert len(fp) == len(probe.PROBES) and fp == ours
    assert report["right"]["tiny"] == sum(
        probe.passes(r, g) for r, (_, g) in zip(ours, probe.PROBES, strict=True)
    )
    text = out.with_name(out.name + ".md").read_text()
    assert "| **right** |" in text and "bench/chat_probe.py --bundle tiny=" in text


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "nothing to probe"),
        (["--bundle", "nobundle"], "NAME=BUNDLE_DIR"),
        (["--bundle", "a=/nonexistent"], "manifest.json"),
        (["--model", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    ],
)
def test_usage_errors_are_one_line_exit_2(probe, capsys, argv: list[str], needle: str) -> None:
    with pytest.raises(SystemExit) as stop:
        probe.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
