"""`pbs2p-edge eval BUNDLE`: torch-free perplexity of an exported bundle on the PyTorch scorer's windows."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli
from test_runtime import runtime_bundle

from pbs2p_edge.errors import Pbs2pError

CTX, TOKENS = "32", "256"  # 8 windows: a second or two per scorer on the tiny model
RESULT_KEYS = {
    "ppl",
    "nll",
    "ctx",
    "windows",
    "tokens",
    "predicted_tokens",
    "seconds",
    "source",
    "kind",
    "text",
    "load_seconds",
}


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return runtime_bundle(tmp_path_factory, tiny_model_dir, "fp32")


@pytest.fixture(scope="module")
def pbs2p_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return runtime_bundle(tmp_path_factory, tiny_model_dir, "pbs2p")


def eval_json(source: Path, text: Path, *extra: str) -> dict:
    result = run_cli(
        "eval", source, "--text", text, "--ctx", CTX, "--tokens", TOKENS, "--json", "--no-progress", *extra
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == RESULT_KEYS
    return data


def test_fp32_bundle_matches_pytorch(fp32_bundle: Path, tiny_model_dir: Path, corpus_text_file: Path) -> None:
    torch_result = eval_json(tiny_model_dir, corpus_text_file)
    bundle_result = eval_json(fp32_bundle, corpus_text_file, "--threads", "1")
    for key in ("ctx", "windows", "tokens", "predicted_tokens", "text"):
        assert bundle_result[key] == torch_result[key], key
    assert bundle_result["windows"] == 8 and bundle_result["predicted_tokens"] == 8 * 31
    assert bundle_result["kind"] == "fp32" and bundle_result["source"] == str(fp32_bundle)
    assert bundle_result["ppl"] == pytest.approx(torch_result["ppl"], rel=1e-4)
    assert bundle_result["nll"] == pytest.approx(torch_result["nll"], rel=1e-4)


def test_bundle_uses_the_pytorch_tokens(
    fp32_bundle: Path, tiny_model_dir: Path, corpus_text_file: Path
) -> None:
    """The bundle's tokenizer.json and the HF tokenizer give the same evaluation ids (no special tokens)."""
    from pbs2p_edge import sources
    from pbs2p_edge.runtime.perplexity import BundleScorer

    scorer = BundleScorer(fp32_bundle, threads=1)
    ids = sources.evaluation_token_list(scorer.encode, 300, corpus_text_file)
    expected = sources.evaluation_ids(sources.load_tokenizer(tiny_model_dir), 300, corpus_text_file)
    assert ids == expected.tolist() and len(ids) == 300


def test_pbs2p_bundle_is_close_to_its_checkpoint(
    pbs2p_bundle: Path, tmp_path_factory: pytest.TempPathFactory, corpus_text_file: Path
) -> None:
    """The deployed kernels (int7 activations) score near the checkpoint's float-activation PyTorch figure."""
    checkpoint = tmp_path_factory.getbasetemp() / "runtime_bundles" / "model.pt"
    torch_result = eval_json(checkpoint, corpus_text_file, "--threads", "1")  # torch.set_num_threads
    bundle_result = eval_json(pbs2p_bundle, corpus_text_file)
    assert bundle_result["kind"] == "pbs2p" and torch_result["kind"] == "compressed"
    assert math.isfinite(bundle_result["ppl"]) and bundle_result["ppl"] > 1
    # measured 1e-5 apart (fp32 head); a uniform-logits output (ppl = vocab size) would be 2% off
    assert bundle_result["ppl"] == pytest.approx(torch_result["ppl"], rel=2e-3)


def test_text_line_output(fp32_bundle: Path, corpus_text_file: Path) -> None:
    result = run_cli(
        "eval", fp32_bundle, "--text", corpus_text_file, "--ctx", CTX, "--tokens", "64", "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{fp32_bundle} (fp32): perplexity ")
    assert "over 2 windows x 32 tokens (64 tokens)" in result.stdout


def test_token_nll_is_a_stable_log_softmax() -> None:
    from pbs2p_edge.runtime.perplexity import LOG_SOFTMAX_ROWS, token_nll

    rng = np.random.default_rng(0)
    rows = LOG_SOFTMAX_ROWS + 7  # crosses a block boundary
    logits = rng.normal(scale=3.0, size=(rows, 50)).astype(np.float32)
    targets = rng.integers(0, 50, size=rows)
    wide = logits.astype(np.float64)
    reference = -(wide[np.arange(rows), targets] - np.log(np.exp(wide).sum(axis=1))).sum()
    assert token_nll(logits, targets) == pytest.approx(reference, rel=1e-12)
    # logits far beyond exp's float32/float64 range: a naive softmax overflows, a shifted one does not
    huge = logits + np.float32(1e5)
    assert token_nll(huge, targets) == pytest.approx(reference, rel=1e-3)
    with pytest.raises(ValueError):
        token_nll(logits, targets[:-1])


def test_ctx_beyond_the_bundle_context(fp32_bundle: Path, corpus_text_file: Path) -> None:
    from pbs2p_edge.runtime.perplexity import BundleScorer

    scorer = BundleScorer(fp32_bundle, threads=1)
    ids = list(range(3, 3 + scorer.bundle.context_length + 1))
    with pytest.raises(Pbs2pError, match="exceeds the context"):
        scorer.perplexity(ids, ctx=scorer.bundle.context_length + 1, progress=False)


# ----------------------------------------------------------------------------------------------- bad input


def test_broken_manifest(fp32_bundle: Path, tmp_path: Path, corpus_text_file: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(fp32_bundle, copy)
    (copy / "manifest.json").write_text("{not json")
    assert_one_line_error(run_cli("eval", copy, "--text", corpus_text_file), "not valid JSON")
    (copy / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    assert_one_line_error(run_cli("eval", copy, "--text", corpus_text_file), "not a pbs2p-edge bundle")


def test_text_shorter_than_a_window(fp32_bundle: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("only a handful of tokens here")
    assert_one_line_error(
        run_cli("eval", fp32_bundle, "--text", short, "--ctx", CTX), "fewer than one window"
    )


@pytest.mark.parametrize("args, needle", [(["--ctx", "1"], "--ctx"), (["--threads", "0"], "--threads")])
def test_bad_options(fp32_bundle: Path, corpus_text_file: Path, args: list[str], needle: str) -> None:
    assert_one_line_error(run_cli("eval", fp32_bundle, "--text", corpus_text_file, *args), needle)


def test_missing_or_foreign_directory(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("eval", tmp_path / "missing"), "does not exist")
    assert_one_line_error(run_cli("eval", tmp_path), "neither a bundle", "no manifest.json", "no config.json")
