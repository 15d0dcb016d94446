"""Python packer -> C++ decoder/kernels, bit for bit: runs custom_ops/tests' program on arrays written here.

The program is taken from $PBS2P_KERNEL_TESTS_BIN, else built from the current sources into a temporary directory
with CMake (a few seconds; needs no ONNX Runtime headers).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_ops_ort import ALL_KERNELS

from pbs2p_edge.format import PackedWeight, kernel_matmul, pack, random_weight

REPO = Path(__file__).resolve().parents[1]
BIN_NAME = "pbs2p_kernel_tests"


@pytest.fixture(scope="session")
def kernel_test_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("PBS2P_KERNEL_TESTS_BIN")
    if env:
        return Path(env)
    if shutil.which("cmake") is None:
        pytest.fail("cmake is needed to build the C++ kernel test program")
    build = tmp_path_factory.mktemp("kernel-build")
    src = REPO / "custom_ops"
    subprocess.run(
        [
            "cmake",
            "-S",
            str(src),
            "-B",
            str(build),
            "-DPBS2P_BUILD_OP=OFF",
            "-DPBS2P_BUILD_TESTS=ON",
            "-DCMAKE_BUILD_TYPE=Release",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["cmake", "--build", str(build), "--target", BIN_NAME, "-j", "2"], check=True, capture_output=True
    )
    return build / BIN_NAME


@pytest.mark.parametrize(
    "rows,k,n,m,gs,salient,bias,tokens,col_scales",
    [
        (33, 200, 5, 8, 48, 2, True, 3, False),
        (64, 576, 6, 8, 128, 0, False, 1, False),
        (70, 640, 9, 16, 160, 3, True, 4, False),
        (33, 200, 5, 8, 48, 2, True, 3, True),
        (45, 1000, 4, 8, 128, 0, False, 2, True),
    ],
)
def test_python_arrays_decode_bit_exactly_in_cpp(
    kernel_test_bin, tmp_path, rows, k, n, m, gs, salient, bias, tokens, col_scales
):
    w = random_weight(rows, k, n, m, gs, salient=salient, bias=bias, seed=k, col_scales=col_scales)
    p = pack(w)
    for name, arr in p.arrays.items():
        (tmp_path / f"{name}.bin").write_bytes(np.ascontiguousarray(arr).tobytes())
    x = np.random.default_rng(k).normal(size=(tokens, k)).astype(np.float32)
    (tmp_path / "x.bin").write_bytes(x.tobytes())
    (tmp_path / "w_dense.bin").write_bytes(w.dense().astype(np.float32).tobytes())
    (tmp_path / "y_kernel.bin").write_bytes(kernel_matmul(x, p).astype(np.float32).tobytes())
    out = subprocess.run(
        [str(kernel_test_bin), "--from", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASSED" in out.stdout


def _write_case(path: Path, p: PackedWeight, w_dense: np.ndarray, x: np.ndarray) -> None:
    for name, arr in p.arrays.items():
        (path / f"{name}.bin").write_bytes(np.ascontiguousarray(arr).tobytes())
    (path / "x.bin").write_bytes(x.tobytes())
    (path / "w_dense.bin").write_bytes(w_dense.astype(np.float32).tobytes())
    (path / "y_kernel.bin").write_bytes(kernel_matmul(x, p).astype(np.float32).tobytes())


@pytest.mark.parametrize("kernel", ALL_KERNELS)
@pytest.mark.parametrize("tokens", [1, 8, 9, 23])  # both sides of kHybridGemv (tile lookups / tile GEMM)
def test_every_kernel_path_matches_the_numpy_twin(kernel_test_bin, tmp_path, kernel, tokens):
    """Each path on its own (--kernel), on an awkward shape: rows past one tile and not a multiple of 8, K not a
    multiple of the group, a group that is not a multiple of 64, salient columns, bias and column scales."""
    w = random_weight(77, 440, 5, 8, 88, salient=2, bias=True, seed=tokens, col_scales=True)
    x = np.random.default_rng(tokens).normal(size=(tokens, 440)).astype(np.float32)
    _write_case(tmp_path, pack(w), w.dense(), x)
    out = subprocess.run(
        [str(kernel_test_bin), "--from", str(tmp_path), "--kernel", kernel],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode == 3:
        pytest.skip(out.stdout.strip())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASSED" in out.stdout and f"kernels: {kernel})" in out.stdout, out.stdout


def test_version_1_arrays_from_the_old_packer_run_in_cpp(kernel_test_bin, tmp_path):
    """The version 1 fixture (8 arrays, no col_scales file) decodes bit-exactly and runs in C++."""
    data = dict(np.load(REPO / "tests/data/packed_v1_9x96.npz"))
    w_dense = data.pop("w_dense")
    for name, arr in data.items():
        (tmp_path / f"{name}.bin").write_bytes(np.ascontiguousarray(arr).tobytes())
    assert not (tmp_path / "col_scales.bin").exists()
    x = np.random.default_rng(5).normal(size=(3, 96)).astype(np.float32)
    (tmp_path / "x.bin").write_bytes(x.tobytes())
    (tmp_path / "w_dense.bin").write_bytes(w_dense.astype(np.float32).tobytes())
    p = PackedWeight.from_arrays(data)
    (tmp_path / "y_kernel.bin").write_bytes(kernel_matmul(x, p).astype(np.float32).tobytes())
    out = subprocess.run(
        [str(kernel_test_bin), "--from", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "PASSED" in out.stdout, out.stdout + out.stderr


def test_cpp_program_rejects_corrupt_python_arrays(kernel_test_bin, tmp_path):
    p = pack(random_weight(8, 64, 6, 8, 32, seed=1))
    for name, arr in p.arrays.items():
        data = np.ascontiguousarray(arr).copy()
        if name == "mask":
            data[0, 0] ^= 1
        (tmp_path / f"{name}.bin").write_bytes(data.tobytes())
    for name in ("x", "w_dense", "y_kernel"):
        (tmp_path / f"{name}.bin").write_bytes(b"")
    out = subprocess.run(
        [str(kernel_test_bin), "--from", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0 and "N:M" in out.stdout
