"""`pbs2p-edge compress`: a working run on the tiny model, and one-line errors with exit 2 on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pbs2p_edge.compress.cli import compress_command

FAST = ["--calib-samples", "4", "--calib-len", "32", "--no-progress"]


def _run(args: list[str]):
    return CliRunner().invoke(compress_command, args)


def _assert_refused(result, tmp_path: Path, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output
    assert not any(p.suffix in (".pt", ".tmp") for p in tmp_path.iterdir())


@pytest.mark.parametrize("method,nm", [("pbs2p", "6:8"), ("naive", "4:8"), ("binarize_only", "6:8")])
def test_compress_writes_a_loadable_checkpoint(
    tiny_model_dir: Path, corpus_text_file: Path, tmp_path: Path, method: str, nm: str
) -> None:
    from pbs2p_edge.checkpoint import load_checkpoint

    out = tmp_path / "model.pt"
    args = ["--model", str(tiny_model_dir), "--text", str(corpus_text_file), "--nm", nm, "--method", method]
    result = _run([*args, *FAST, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "bits per weight" in result.output and "per-layer N" in result.output
    ckpt = load_checkpoint(out)
    assert ckpt["compression"]["method"] == method
    expected_n = 8 if method == "binarize_only" else int(nm.split(":")[0])
    layer_n = ckpt["compression"]["results"]["layer_n"]
    assert sum(layer_n) == expected_n * len(layer_n)
    # Refuses to overwrite without --force, overwrites with it.
    again = _run([*args, *FAST, "-o", str(out)])
    assert again.exit_code == 2 and "exists" in again.output
    forced = _run([*args, *FAST, "-o", str(out), "--force"])
    assert forced.exit_code == 0, forced.output


@pytest.mark.parametrize("nm", ["9:8", "0:8", "4:0", "6/8", "6:7", "-1:8"])
def test_bad_nm(tiny_model_dir: Path, tmp_path: Path, nm: str) -> None:
    result = _run(["--model", str(tiny_model_dir), "--nm", nm, *FAST, "-o", str(tmp_path / "m.pt")])
    _assert_refused(result, tmp_path)


def test_unsupported_model_type(tiny_model_dir: Path, corpus_text_file: Path, tmp_path: Path) -> None:
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=600, n_positions=64)
    ).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    out = tmp_path / "m.pt"
    result = _run(["--model", str(folder), "--text", str(corpus_text_file), *FAST, "-o", str(out)])
    _assert_refused(result, tmp_path, "gpt2 is not supported", "llama")


def test_text_shorter_than_one_sample(tiny_model_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("only a few words here")
    result = _run(["--model", str(tiny_model_dir), "--text", str(text), *FAST, "-o", str(tmp_path / "m.pt")])
    assert result.exit_code == 2 and "fewer than one sample" in result.output
    assert not (tmp_path / "m.pt").exists()


def test_bad_method_options(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "m.pt")
    for extra in (
        ["--steps", "5"],
        ["--method", "binarize_only", "--cfs"],
        ["--cfs-range", "7:8"],
        ["--group-size", "12"],
    ):
        result = _run(["--model", str(tiny_model_dir), *extra, *FAST, "-o", out])
        _assert_refused(result, tmp_path)


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--binarizer", "arbz"], "unknown binarizer 'arbz'"),
        (["--binarizer", "arbx", "--rc-mu"], "RC binarizers only"),
        (["--x-iters", "0"], "x iters"),
        (["--salient", "many"], "invalid --salient"),
        (["--salient", "auto", "--salient-max", "0"], "largest S"),
        (["--salient", "2", "--salient-max", "4"], "--salient auto only"),
        (["--salient", "auto", "--salient-rate", "-1"], "salient rate"),
    ],
)
def test_bad_binarizer_options(tiny_model_dir: Path, tmp_path: Path, extra: list[str], fragment: str) -> None:
    result = _run(["--model", str(tiny_model_dir), *extra, *FAST, "-o", str(tmp_path / "m.pt")])
    _assert_refused(result, tmp_path, fragment)


def test_compress_with_rc_and_salient_search(
    tiny_model_dir: Path, corpus_text_file: Path, tmp_path: Path
) -> None:
    from pbs2p_edge.checkpoint import load_checkpoint

    out = tmp_path / "model.pt"
    args = ["--model", str(tiny_model_dir), "--text", str(corpus_text_file), "--binarizer", "arbrcx"]
    result = _run([*args, "--salient", "auto", "--salient-max", "1", *FAST, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "binarizer: arbrcx" in result.output
    results = load_checkpoint(out)["compression"]["results"]
    assert set(results["salient_per_linear"]) <= {0, 1}
    assert results["binarizer"] == "arbrcx"
