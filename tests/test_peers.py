"""bench/peers.py's pure parts (statistics, ratios, the table, argument errors); no peer needs to be installed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = module
    spec.loader.exec_module(module)
    return module


def test_summarize_takes_ratios_within_each_rep(peers) -> None:
    samples = {
        "pbs2p": {"pp": [100.0, 50.0], "tg": [60.0, 30.0]},
        "llama": {"pp": [200.0, 100.0], "tg": [40.0, 30.0]},
    }
    stats = peers.summarize(samples, "pbs2p")
    assert stats["pbs2p"]["pp_ratio"] == {"mean": 1.0, "min": 1.0, "max": 1.0, "spread": 0.0}
    # The machine halved everyone's speed in rep 2: per-rep ratios stay 0.5 for pp.
    assert stats["llama"]["pp_ratio"]["mean"] == pytest.approx(0.5)
    assert stats["llama"]["pp_ratio"]["spread"] == pytest.approx(0.0)
    assert stats["llama"]["tg_ratio"]["min"] == pytest.approx(1.0)
    assert stats["llama"]["tg_ratio"]["max"] == pytest.approx(1.5)
    assert stats["llama"]["tg"]["spread"] == pytest.approx(10.0 / 35.0)
    with pytest.raises(ValueError):
        peers.spread([])


def _report(peers) -> dict:
    samples = {
        "pbs2p": {"pp": [220.0, 240.0], "tg": [70.0, 80.0]},
        "gguf": {"pp": [220.0, 230.0], "tg": [93.0, 95.0]},
    }
    stats = peers.summarize(samples, "pbs2p")
    rows = {
        "pbs2p": {"kind": "ours", "description": "ours", "bundle_bytes": 52_500_000, **stats["pbs2p"]},
        "gguf": {"kind": "llamacpp", "description": "theirs", "bundle_bytes": 105_000_000, **stats["gguf"]},
    }
    rows["pbs2p"]["peak_rss_generation_bytes"] = 150_000_000
    rows["gguf"]["peak_rss_generation_bytes"] = 300_000_000
    return {
        "model": "default",
        "reference": "pbs2p",
        "vocab_size": 49152,
        "settings": {"threads": 2, "pp": 128, "tg": 128, "reps": 2, "warmup": 1},
        "systems": rows,
        "machine": {"cpu": "cpu", "logical_cpus": 2, "platform": "linux", "date": "now"},
        "versions": {"onnxruntime": "1.32.0"},
        "command": "bench/peers.py ...",
        "note": "the machine was shared",
    }


def test_markdown_table(peers) -> None:
    text = peers.markdown(_report(peers))
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| system"))
    assert "pp128 tok/s" in header and "tg128 tok/s" in header
    gguf = next(line for line in lines if line.startswith("| gguf"))
    cells = [cell.strip() for cell in gguf.strip("|").split("|")]
    assert cells[1] == "225.0 (220.0-230.0)" and cells[2] == "94.0 (93.0-95.0)"
    assert cells[3] == "300" and cells[4] == "105.0"
    assert cells[6].startswith("0.80x")  # tg: (70/93 + 80/95) / 2
    assert cells[7] == "0.50x" and cells[8] == "0.50x"
    assert "Note: the machine was shared" in text


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--out", "x", "--skip", "genai", "--skip", "llamacpp"], "at least one of our bundles"),
        (["--out", "x", "--bundle", "nolabel", "--skip", "genai", "--skip", "llamacpp"], "LABEL=PATH"),
        (
            ["--out", "x", "--bundle", "a=/nonexistent", "--skip", "genai", "--skip", "llamacpp"],
            "not a bundle",
        ),
        (["--out", "x", "--bundle", "a=/nonexistent"], "--genai-dir"),
        (["--out", "x", "--threads", "0", "--skip", "genai"], "--threads must be at least 1"),
        (["--bundle", "a=b"], "--out"),
        (["--out", "x", "--skip", "vllm"], "invalid choice"),
    ],
)
def test_argument_errors_are_one_line_exit_2(peers, capsys, argv: list[str], needle: str) -> None:
    assert peers.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_duplicate_labels_and_missing_gguf(peers, tmp_path: Path, capsys) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"vocab_size": 10}))
    argv = [
        "--out",
        str(tmp_path / "o"),
        "--bundle",
        f"a={bundle}",
        "--bundle",
        f"a={bundle}",
        "--skip",
        "genai",
    ]
    assert peers.main([*argv, "--skip", "llamacpp"]) == 2
    assert "distinct" in capsys.readouterr().err
    argv = ["--out", str(tmp_path / "o"), "--bundle", f"a={bundle}", "--skip", "genai"]
    assert peers.main([*argv, "--gguf", str(tmp_path / "missing.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
