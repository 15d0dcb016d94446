from __future__ import annotations

import json
from pathlib import Path

import pytest

from pbs2p_edge import sources
from pbs2p_edge.errors import Pbs2pError


def test_corpus_split_is_disjoint_deterministic_and_sized() -> None:
    calibration, evaluation = sources.corpus_split()
    assert len(evaluation) > 500 and len(calibration) > 8 * len(evaluation)
    assert not set(calibration) & set(evaluation)
    assert all(sources.is_evaluation_text(t) for t in evaluation)
    assert not any(sources.is_evaluation_text(t) for t in calibration)
    sources.corpus_split.cache_clear()
    assert sources.corpus_split() == (calibration, evaluation)


def test_calibration_and_evaluation_ids(tiny_model_dir: Path) -> None:
    tokenizer = sources.load_tokenizer(tiny_model_dir)
    a = sources.calibration_ids(tokenizer, 4, 32, seed=7)
    b = sources.calibration_ids(tokenizer, 4, 32, seed=7)
    c = sources.calibration_ids(tokenizer, 4, 32, seed=8)
    assert a.shape == (4, 32) and a.dtype.is_floating_point is False
    assert (a == b).all() and not (a == c).all()
    ev = sources.evaluation_ids(tokenizer, 1000)
    assert ev.shape == (1000,)
    # evaluation text starts with the first evaluation article, not a calibration one
    first_eval = sources.corpus_split()[1][0]
    assert ev[:5].tolist() == sources.encode(tokenizer, first_eval)[:5]


def test_calibration_text_shorter_than_one_sample(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = sources.load_tokenizer(tiny_model_dir)
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    with pytest.raises(Pbs2pError, match="fewer than one sample"):
        sources.calibration_ids(tokenizer, 2, 512, seed=0, text_path=short)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"\xff\xfe\x00bad", "not UTF-8"),
        (b"  \n", "is empty"),
        ("dir", "is a directory"),
    ],
)
def test_bad_text_files(tmp_path: Path, content: bytes | str | None, message: str) -> None:
    path = tmp_path / "t.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(Pbs2pError, match=message):
        sources.read_text_file(path)


def test_bad_model_paths(tmp_path: Path) -> None:
    with pytest.raises(Pbs2pError, match="does not exist"):
        sources.model_files(tmp_path / "nope")
    with pytest.raises(Pbs2pError, match="no config.json"):
        sources.model_files(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(Pbs2pError, match="not a .gguf"):
        sources.model_files(tmp_path / "weights.bin")


def test_corrupt_gguf_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBS2P_EDGE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 60)
    with pytest.raises(Pbs2pError, match="cannot read GGUF"):
        sources.model_files(bad)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_folder_that_is_not_a_causal_lm(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "vit",
                "architectures": ["ViTModel"],
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
            }
        )
    )
    with pytest.raises(Pbs2pError, match="not a causal language model"):
        sources.load_model(tmp_path)


def test_tiny_model_loads(tiny_model_dir: Path) -> None:
    model, tokenizer = sources.load_model(tiny_model_dir)
    assert model.config.num_hidden_layers == 2
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_default_model_is_the_embedded_smollm2() -> None:
    folder = sources.model_files(None)
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True
    assert (folder / "model.safetensors").stat().st_size > 500e6  # fp32, 135M parameters
