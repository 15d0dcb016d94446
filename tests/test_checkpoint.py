"""model.pt: round trip to identical logits, and refusal of foreign, damaged or code-carrying files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from pbs2p_edge.checkpoint import build_model, load_checkpoint, packed_layers, save_checkpoint
from pbs2p_edge.config import PBS2PConfig
from pbs2p_edge.errors import Pbs2pError


@pytest.fixture(scope="module")
def compressed(tiny_model_dir: Path, corpus_text_file: Path):
    from pbs2p_edge import sources
    from pbs2p_edge.checkpoint import read_tokenizer_files
    from pbs2p_edge.compress import compress

    model, tokenizer = sources.load_model(tiny_model_dir)
    config = PBS2PConfig(n=5, m=8, calib_samples=4, calib_len=32, salient=1, recover_seconds=0.0)
    calib = sources.calibration_ids(tokenizer, 4, 32, 0, corpus_text_file)
    return compress(
        model, config, calib, tokenizer_files=read_tokenizer_files(tiny_model_dir), progress=False
    )


@pytest.fixture(scope="module")
def saved(compressed, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(compressed, path)
    return path


def test_round_trip_gives_identical_logits(compressed, saved: Path) -> None:
    assert [p.name for p in saved.parent.iterdir()] == ["model.pt"]  # no temporary file left
    ckpt = load_checkpoint(saved)
    assert ckpt["compression"]["n"] == 5 and ckpt["compression"]["results"]["layer_n"]
    model, tokenizer = build_model(ckpt)
    ids = torch.tensor([tokenizer.encode("the model runs on the edge with binary weights")])
    with torch.no_grad():
        expected = compressed.model(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_checkpoint_stores_packed_layers_not_dense_copies(compressed, saved: Path) -> None:
    ckpt = load_checkpoint(saved)
    layers = packed_layers(ckpt)
    assert set(layers) == set(compressed.packed)
    assert not any(".self_attn." in key or ".mlp." in key for key in ckpt["dense_state"])
    for name, packed in layers.items():
        assert packed.n == compressed.weights[name].n
        for key, array in packed.arrays.items():
            assert (array == compressed.packed[name].arrays[key]).all()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_refuses_pickled_code(tmp_path: Path, writer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    payload = {"format": "pbs2p-edge-checkpoint", "version": 1, "x": _Exploit()}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(Pbs2pError, match="refusing|truncated or corrupt"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_refuses_truncated_file(saved: Path, tmp_path: Path) -> None:
    data = saved.read_bytes()
    for cut in (len(data) // 2, 100):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(Pbs2pError, match="truncated or corrupt"):
            load_checkpoint(bad)


def test_refuses_foreign_and_future_files(tmp_path: Path) -> None:
    with pytest.raises(Pbs2pError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(Pbs2pError, match="not a file"):
        load_checkpoint(tmp_path)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(Pbs2pError, match="not a pbs2p-edge checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    torch.save({"format": "pbs2p-edge-checkpoint", "version": 99}, tmp_path / "future.pt")
    with pytest.raises(Pbs2pError, match="version 99"):
        load_checkpoint(tmp_path / "future.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(Pbs2pError):
        load_checkpoint(tmp_path / "text.pt")


def test_compression_is_deterministic(compressed, tiny_model_dir: Path, corpus_text_file: Path) -> None:
    # The post-training pass is deterministic; the wall-time recovery budget (off in this fixture) is not.
    from pbs2p_edge import sources
    from pbs2p_edge.compress import compress

    model, tokenizer = sources.load_model(tiny_model_dir)
    calib = sources.calibration_ids(tokenizer, 4, 32, 0, corpus_text_file)
    again = compress(
        model, compressed.config, calib, tokenizer_files={"tokenizer.json": "{}"}, progress=False
    )
    assert again.results["layer_n"] == compressed.results["layer_n"]
    for name, packed in compressed.packed.items():
        for key, array in packed.arrays.items():
            assert (again.packed[name].arrays[key] == array).all(), f"{name}.{key} differs between runs"
