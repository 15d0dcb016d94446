"""Trusting a bundle: no native code from the bundle, paths inside it, file sizes + sha256, op versions.

Every bad bundle is refused with one line and exit 2 before anything is loaded. The foreign-library tests use
a tiny shared library whose load constructor writes a file: the file appearing means native code ran.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run_cli
from test_runtime import PROMPTS, runtime_bundle

from pbs2p_edge.errors import Pbs2pError

EVIL_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void announce(void) {
  const char *path = getenv("PBS2P_TEST_SENTINEL");
  FILE *f = path ? fopen(path, "w") : NULL;
  if (f) { fputs("native code of the bundle ran\n", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def pbs2p_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return runtime_bundle(tmp_path_factory, tiny_model_dir, "pbs2p")


@pytest.fixture(scope="module")
def evil_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler to build the test library")
    out = tmp_path_factory.mktemp("evil")
    (out / "evil.c").write_text(EVIL_SOURCE)
    library = out / "libevil.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", library, out / "evil.c"], check=True, timeout=120)
    return library


def _copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    return copy


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _write_manifest(bundle: Path, manifest: dict, refresh_files: bool = False) -> None:
    """Rewrite the manifest; with refresh_files, re-record the files as a consistent (hostile) exporter would."""
    from pbs2p_edge.runtime.integrity import file_entries

    if refresh_files:
        manifest = {**manifest, "files": file_entries(bundle)}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _env(sentinel: Path) -> dict[str, str]:
    return {**os.environ, "PBS2P_TEST_SENTINEL": str(sentinel)}


def _generate(bundle: Path, *args: str | Path, env: dict[str, str] | None = None):
    return run_cli("generate", bundle, "-p", PROMPTS[0], "-n", "4", "--threads", "1", *args, env=env)


# ------------------------------------------------------------------------------- what the exporter writes


def test_manifest_records_every_file_and_the_op_it_needs(pbs2p_bundle: Path) -> None:
    import pbs2p_edge
    from pbs2p_edge import ops
    from pbs2p_edge.runtime.integrity import sha256_file

    manifest = _manifest(pbs2p_bundle)
    on_disk = {p.name for p in pbs2p_bundle.iterdir() if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        path = pbs2p_bundle / name
        assert entry == {"size": path.stat().st_size, "sha256": sha256_file(path)}, name
    info = ops.library_info(ops.library_path())
    assert manifest["requires_ops"]["op_version"] == info.op_version
    assert manifest["requires_ops"]["format_versions"] and all(
        v in info.format_versions for v in manifest["requires_ops"]["format_versions"]
    )
    assert manifest["exporter"]["pbs2p_edge"] == pbs2p_edge.__version__
    assert manifest["ops_library"] == "libpbs2p_edge_ops.so"  # a copy for onnxruntime-genai only


def test_bundle_files_have_normal_modes(pbs2p_bundle: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(pbs2p_bundle.stat().st_mode) == 0o777 & ~umask
    for path in pbs2p_bundle.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    if umask == 0o022:
        assert stat.S_IMODE((pbs2p_bundle / "model.onnx.data").stat().st_mode) == 0o644


def test_verify_ok(pbs2p_bundle: Path) -> None:
    from pbs2p_edge import ops

    result = run_cli("verify", pbs2p_bundle)
    assert result.returncode == 0, result.stderr
    files = len(_manifest(pbs2p_bundle)["files"])
    assert f"OK: {files} files" in result.stdout and "sha256 match" in result.stdout
    assert str(ops.library_path()) in result.stdout  # the installed library, not the bundle's copy


# ------------------------------------------------------------------------------- native code


def test_foreign_library_path_in_manifest_is_never_loaded(
    pbs2p_bundle: Path, evil_library: Path, tmp_path: Path
) -> None:
    copy = _copy(pbs2p_bundle, tmp_path)
    sentinel = tmp_path / "ran"
    _write_manifest(copy, {**_manifest(copy), "ops_library": str(evil_library)})
    assert_one_line_error(_generate(copy, env=_env(sentinel)), "absolute path")
    assert_one_line_error(run_cli("verify", copy, env=_env(sentinel)), "absolute path")
    (copy / "lib.so").symlink_to(evil_library)  # a relative name whose target is outside the bundle
    _write_manifest(copy, {**_manifest(copy), "ops_library": "lib.so"})
    assert_one_line_error(_generate(copy, env=_env(sentinel)), "resolves outside the bundle")
    assert not sentinel.exists()


def test_library_inside_a_consistent_bundle_is_not_loaded(
    pbs2p_bundle: Path, evil_library: Path, tmp_path: Path
) -> None:
    """A hostile bundle whose own ops library (hashes and all) is foreign: the installed library runs it."""
    copy = _copy(pbs2p_bundle, tmp_path)
    sentinel = tmp_path / "ran"
    shutil.copyfile(evil_library, copy / "libpbs2p_edge_ops.so")
    _write_manifest(copy, _manifest(copy), refresh_files=True)
    result = _generate(copy, env=_env(sentinel))
    assert result.returncode == 0, result.stderr
    assert run_cli("verify", copy, env=_env(sentinel)).returncode == 0
    assert not sentinel.exists()
    # The sentinel works: naming the library explicitly loads it (to read its Pbs2pOpsInfo, which it lacks:
    # op version 1, refused for a newer bundle; or onnxruntime refuses it): one line either way.
    explicit = _generate(copy, "--ops-library", copy / "libpbs2p_edge_ops.so", env=_env(sentinel))
    assert_one_line_error(explicit, "the ops library")
    assert sentinel.exists()


def test_tampered_bundle_refused_before_an_explicit_library_loads(
    pbs2p_bundle: Path, evil_library: Path, tmp_path: Path
) -> None:
    copy = _copy(pbs2p_bundle, tmp_path)
    sentinel = tmp_path / "ran"
    _flip_byte(copy / "model.onnx.data")
    result = _generate(copy, "--ops-library", evil_library, env=_env(sentinel))
    assert_one_line_error(result, "model.onnx.data", "sha256")
    assert not sentinel.exists()


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("ops_library", "../libpbs2p_edge_ops.so", "escapes the bundle"),
        ("ops_library", "/etc/passwd", "absolute path"),
        ("files", {"../../etc/passwd": {"size": 1, "sha256": "0" * 64}}, "escapes the bundle"),
        ("files", {"/etc/passwd": {"size": 1, "sha256": "0" * 64}}, "absolute path"),
    ],
)
def test_manifest_paths_must_stay_inside(
    pbs2p_bundle: Path, tmp_path: Path, key: str, value: object, needle: str
) -> None:
    copy = _copy(pbs2p_bundle, tmp_path)
    manifest = _manifest(copy)
    if key == "files":
        value = {**manifest["files"], **value}
    _write_manifest(copy, {**manifest, key: value})
    assert_one_line_error(_generate(copy), needle)


# ------------------------------------------------------------------------------- integrity


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    position = len(data) // 2 if offset is None else offset
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_in_weights_is_refused(pbs2p_bundle: Path, tmp_path: Path) -> None:
    copy = _copy(pbs2p_bundle, tmp_path)
    _flip_byte(copy / "model.onnx.data")
    assert_one_line_error(_generate(copy), "model.onnx.data does not match its sha256")
    assert_one_line_error(run_cli("verify", copy), "model.onnx.data does not match its sha256")
    eval_result = run_cli("eval", copy, "--text", copy / "tokenizer.json", "--tokens", "64", "--ctx", "32")
    assert_one_line_error(eval_result, "model.onnx.data", "sha256")
    bench = run_cli("bench", copy, "--pp", "4", "--tg", "4", "--reps", "1", "--warmup", "0")
    assert_one_line_error(bench, "model.onnx.data", "sha256")
    # --no-verify-hash skips the hash (sizes still match), so the flipped weight loads: the documented trade.
    assert _generate(copy, "--no-verify-hash").returncode == 0


def test_size_mismatch_is_refused_even_without_hashing(pbs2p_bundle: Path, tmp_path: Path) -> None:
    copy = _copy(pbs2p_bundle, tmp_path)
    with open(copy / "model.onnx.data", "ab") as f:
        f.write(b"\0")
    assert_one_line_error(_generate(copy, "--no-verify-hash"), "model.onnx.data is", "the manifest says")
    from pbs2p_edge.runtime.bundle import load_bundle

    shutil.copyfile(pbs2p_bundle / "model.onnx.data", copy / "model.onnx.data")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(Pbs2pError, match="tokenizer.json is missing"):
        load_bundle(copy, verify_hash=False)


def test_truncated_model_is_refused(pbs2p_bundle: Path, tmp_path: Path) -> None:
    copy = _copy(pbs2p_bundle, tmp_path)
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[: len(data) // 2])
    assert_one_line_error(_generate(copy), "model.onnx is", "the manifest says")
    # Truncated at export (the manifest agrees with it): onnxruntime's refusal, still one line.
    _write_manifest(copy, _manifest(copy), refresh_files=True)
    assert_one_line_error(_generate(copy), "onnxruntime cannot load", "model.onnx")


def test_op_version_mismatch_names_the_version_to_install(pbs2p_bundle: Path, tmp_path: Path) -> None:
    import pbs2p_edge

    copy = _copy(pbs2p_bundle, tmp_path)
    manifest = _manifest(copy)
    _write_manifest(copy, {**manifest, "requires_ops": {"op_version": 99, "format_versions": [1]}})
    result = _generate(copy)
    assert_one_line_error(result, "op version 99", f"install pbs2p-edge {pbs2p_edge.__version__} or newer")
    _write_manifest(copy, {**manifest, "requires_ops": {"op_version": 1, "format_versions": [7]}})
    assert_one_line_error(_generate(copy), "packed format 7")
    _write_manifest(copy, {**manifest, "requires_ops": {"op_version": "two"}})
    assert_one_line_error(run_cli("verify", copy), "requires_ops")


def test_old_bundle_without_hashes_loads_with_a_warning(pbs2p_bundle: Path, tmp_path: Path) -> None:
    from pbs2p_edge.runtime.bundle import load_bundle

    copy = _copy(pbs2p_bundle, tmp_path)
    old = {k: v for k, v in _manifest(copy).items() if k not in ("files", "requires_ops")}
    _write_manifest(copy, old)
    result = _generate(copy)
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "re-export" in result.stderr
    assert_one_line_error(run_cli("verify", copy), "no file sizes or hashes", "re-export")
    warnings: list[str] = []
    bundle = load_bundle(copy, warn=warnings.append)
    assert bundle.files is None and len(warnings) == 1
    assert bundle.ops_requirement is not None and bundle.ops_requirement.op_version == 1  # inferred


def test_unlisted_files_are_reported_not_read(pbs2p_bundle: Path, tmp_path: Path) -> None:
    copy = _copy(pbs2p_bundle, tmp_path)
    (copy / "NOTES.txt").write_text("mine")
    result = run_cli("verify", copy)
    assert result.returncode == 0 and "NOTES.txt" in result.stdout
    manifest = _manifest(copy)
    files = {k: v for k, v in manifest["files"].items() if k != "model.onnx.data"}
    _write_manifest(copy, {**manifest, "files": files})
    with pytest.raises(Pbs2pError, match="model.onnx.data is not in the manifest"):
        from pbs2p_edge.runtime.bundle import load_bundle

        load_bundle(copy)
