"""SparseBinaryMatMul through a real onnxruntime.InferenceSession vs the numpy references, and its errors."""

from __future__ import annotations

import ctypes
import json
import platform
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tolerances import KERNEL_VS_EXACT_NMSE, OP_VS_KERNEL_REFERENCE_REL, THREADS_AGREE_REL

from pbs2p_edge import ops
from pbs2p_edge.format import PackedWeight, kernel_matmul, pack, random_weight, reference_matmul
from pbs2p_edge.format import packed as fmt

CPU = ["CPUExecutionProvider"]
ALL_KERNELS = (
    "avx512-vbmi-tile",
    "avx512-vnni-tile",
    "avxvnni-tile",
    "avx512-vnni+avx2",
    "avx512-vnni",
    "avx2",
    "sdot+neon",
    "sdot",
    "neon",
    "generic",
)
REPO = Path(__file__).resolve().parents[1]


def build_model(
    p: PackedWeight,
    *,
    x_shape: list | None = None,
    attrs: dict | None = None,
    arrays: dict | None = None,
    weights_as_inputs: bool = False,
) -> bytes:
    """One SparseBinaryMatMul node; weights are initializers unless weights_as_inputs."""
    arrays = arrays if arrays is not None else dict(p.op_inputs())
    names = [f"w.{name}" for name in arrays]
    node = helper.make_node(
        ops.OP_TYPE,
        ["X", *names],
        ["Y"],
        domain=ops.OP_DOMAIN,
        **(attrs if attrs is not None else p.op_attributes()),
    )
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape or ["batch", "seq", p.k])]
    inits = []
    for name, arr in zip(names, arrays.values(), strict=True):
        if weights_as_inputs:
            dtype = helper.np_dtype_to_tensor_dtype(arr.dtype)
            dims = [f"{name}.{i}" for i in range(arr.ndim)]  # symbolic: the op, not ORT, checks sizes
            inputs.append(helper.make_tensor_value_info(name, dtype, dims))
        else:
            inits.append(numpy_helper.from_array(arr, name))
    graph = helper.make_graph(
        [node], "sbmm", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.OP_DOMAIN, ops.OP_VERSION)]
    )
    model.ir_version = 9
    return model.SerializeToString()


def session(model: bytes, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    ops.register(so)
    return ort.InferenceSession(model, so, providers=CPU)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


CASES = [
    # rows, k, n, m, group_size, salient, bias, x leading shape, col_scales
    (1, 8, 6, 8, 128, 0, False, (1, 1), False),
    (33, 200, 5, 8, 48, 2, True, (2, 3), False),
    (64, 576, 6, 8, 128, 0, False, (1, 1), False),
    (70, 576, 4, 8, 128, 1, True, (1, 17), False),
    (31, 64, 2, 4, 64, 0, True, (5,), False),
    (200, 320, 6, 8, 128, 0, False, (2, 1), False),
    (33, 200, 5, 8, 48, 2, True, (2, 3), True),
    (70, 1000, 4, 8, 128, 1, False, (1, 17), True),
    (1, 8, 6, 8, 128, 0, True, (1, 1), True),
    # more tokens than one prefill work item holds (tile GEMM: 128, compact GEMM: 64), the last item short
    (40, 256, 6, 8, 128, 1, True, (1, 150), False),
    # one decode token over two interleaved four-tile groups and the short tiles after them, chunks starting
    # at odd quads (group 36)
    (300, 1000, 6, 8, 36, 1, True, (1, 1), False),
]


def usable_kernels() -> tuple[str, ...]:
    return ops.library_info(ops.library_path()).kernels


def force_kernel(monkeypatch, kernel: str) -> None:
    """PBS2P_KERNEL=kernel for the sessions of a test; a path this CPU cannot run is skipped, with the reason."""
    if kernel == "default":
        return
    if kernel not in usable_kernels():
        pytest.skip(f"kernel {kernel}: not built for or not supported by this CPU ({platform.machine()})")
    monkeypatch.setenv(ops.ENV_KERNEL, kernel)  # read by the library when the session creates the kernel


@pytest.mark.parametrize("kernel", ["default", *ALL_KERNELS])
@pytest.mark.parametrize("rows,k,n,m,gs,salient,bias,lead,col_scales", CASES)
def test_op_matches_numpy(monkeypatch, kernel, rows, k, n, m, gs, salient, bias, lead, col_scales):
    force_kernel(monkeypatch, kernel)
    w = random_weight(rows, k, n, m, gs, salient=salient, bias=bias, seed=rows + k, col_scales=col_scales)
    p = pack(w)
    x = np.random.default_rng(rows).normal(size=(*lead, k)).astype(np.float32)
    x_shape = ["a", k] if len(lead) == 1 else ["a", "b", k]
    (y,) = session(build_model(p, x_shape=x_shape)).run(None, {"X": x})
    assert y.shape == (*lead, rows) and y.dtype == np.float32
    assert rel_err(y, kernel_matmul(x, p)) <= OP_VS_KERNEL_REFERENCE_REL
    exact = reference_matmul(x, p)
    assert float(((y - exact) ** 2).sum() / (exact**2).sum()) <= KERNEL_VS_EXACT_NMSE


@pytest.mark.parametrize("col_scales", [False, True])
def test_threads_and_non_constant_weights_agree(col_scales):
    p = pack(random_weight(300, 512, 6, 8, 128, salient=1, bias=True, seed=9, col_scales=col_scales))
    x = np.random.default_rng(2).normal(size=(2, 9, 512)).astype(np.float32)
    (y1,) = session(build_model(p), threads=1).run(None, {"X": x})
    (y2,) = session(build_model(p), threads=2).run(None, {"X": x})
    assert rel_err(y2, y1) <= THREADS_AGREE_REL
    feeds = {"X": x, **{f"w.{name}": arr for name, arr in p.op_inputs()}}
    (y3,) = session(build_model(p, weights_as_inputs=True)).run(None, feeds)
    assert rel_err(y3, y1) <= THREADS_AGREE_REL


def test_non_finite_activation_gives_nan_for_that_token_only():
    p = pack(random_weight(40, 128, 6, 8, 64, seed=4))
    x = np.ones((3, 128), np.float32)
    x[1, 70] = np.nan
    x[2, 5] = np.inf
    (y,) = session(build_model(p, x_shape=["a", 128])).run(None, {"X": x})
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).all() and np.isnan(y[2]).all()
    assert np.array_equal(np.isnan(kernel_matmul(x, p)), np.isnan(y))


def _v1_graph(data: dict[str, np.ndarray]) -> bytes:
    """A node as op version 1 graphs have it: 9 inputs (no col_scales), no has_col_scales attribute."""
    p = PackedWeight.from_arrays(data)
    attrs = p.op_attributes()
    del attrs["has_col_scales"]
    return build_model(p, attrs=attrs, arrays={name: data[name] for name in fmt.ARRAY_ORDER_V1})


def test_version_1_graphs_and_arrays_still_run():
    data = dict(np.load(REPO / "tests/data/packed_v1_9x96.npz"))
    w_dense = data.pop("w_dense")
    x = np.random.default_rng(6).normal(size=(2, 5, 96)).astype(np.float32)
    p = PackedWeight.from_arrays(data)
    (y1,) = session(_v1_graph(data)).run(None, {"X": x})
    (y2,) = session(build_model(p)).run(None, {"X": x})  # the 10-input form with a version 1 header
    assert np.array_equal(y1, y2)
    assert rel_err(y1, kernel_matmul(x, p)) <= OP_VS_KERNEL_REFERENCE_REL
    exact = x.astype(np.float64) @ w_dense.T.astype(np.float64) + data["bias"]
    assert float(((y1 - exact) ** 2).sum() / (exact**2).sum()) <= KERNEL_VS_EXACT_NMSE
    # a 9-input node cannot carry column scales
    q = pack(random_weight(40, 64, 6, 8, 32, col_scales=True))
    short = {name: q.arrays[name] for name in fmt.ARRAY_ORDER_V1}
    assert "has_col_scales=1" in _run_error(build_model(q, arrays=short), np.ones((1, 2, 64), np.float32))


def test_col_scales_attribute_and_arrays_are_checked():
    p = pack(random_weight(40, 64, 6, 8, 32, col_scales=True))
    x = np.ones((1, 2, 64), np.float32)
    msg = _run_error(build_model(p, attrs={**p.op_attributes(), "has_col_scales": 0}), x)
    assert "attribute has_col_scales=0 but the packed header says 1" in msg
    arrays = dict(p.op_inputs())
    msg = _run_error(build_model(p, arrays={**arrays, "col_scales": arrays["col_scales"][:-1]}), x)
    assert "col_scales has 63 elements, expected 64" in msg


def test_ops_info_symbol():
    lib = ctypes.CDLL(str(ops.library_path()))
    lib.Pbs2pOpsInfo.restype = ctypes.c_char_p
    info = json.loads(lib.Pbs2pOpsInfo().decode())
    assert info["op_version"] == ops.OP_VERSION and info["format_versions"] == list(fmt.READ_VERSIONS)
    # best first, generic always last; every path this CPU can run
    assert info["kernels"][-1] == "generic" and set(info["kernels"]) <= set(ALL_KERNELS)
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        assert "neon" in info["kernels"]
    if machine in ("x86_64", "amd64") and "avx_vnni" in _cpu_flags():  # the AVX-VNNI path is built and usable
        assert "avxvnni-tile" in info["kernels"]
    if machine in ("x86_64", "amd64") and {"avx512vbmi", "avx512_vnni"} <= _cpu_flags():  # the default there
        assert info["kernels"][0] == "avx512-vbmi-tile"


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    return {f for ln in text.splitlines() if ln.startswith("flags") for f in ln.split(":", 1)[1].split()}


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_every_kernel_gives_the_same_bits(monkeypatch, kernel):
    """All paths compute the same integer sums and float operations in the same order (GEMV and GEMM)."""
    p = pack(random_weight(77, 448, 5, 8, 96, salient=1, bias=True, seed=8, col_scales=True))
    x = np.random.default_rng(3).normal(size=(70, 448)).astype(np.float32)
    monkeypatch.setenv(ops.ENV_KERNEL, "generic")
    want = [session(build_model(p, x_shape=["a", 448])).run(None, {"X": x[:t]})[0] for t in (1, 3, 70)]
    force_kernel(monkeypatch, kernel)
    for t, y_want in zip((1, 3, 70), want, strict=True):
        (y,) = session(build_model(p, x_shape=["a", 448]), threads=2).run(None, {"X": x[:t]})
        np.testing.assert_array_equal(y, y_want)


def test_forcing_a_kernel_this_build_lacks_is_a_clear_error(monkeypatch):
    p = pack(random_weight(8, 64, 6, 8, 32))
    monkeypatch.setenv(ops.ENV_KERNEL, "no-such-kernel")
    with pytest.raises(Exception, match="PBS2P_KERNEL=no-such-kernel is not a kernel of this build"):  # noqa: B017
        session(build_model(p))
    lacking = [k for k in ALL_KERNELS if k not in usable_kernels()]
    if lacking:  # e.g. neon on x86-64: not built here
        monkeypatch.setenv(ops.ENV_KERNEL, lacking[0])
        with pytest.raises(Exception, match=f"PBS2P_KERNEL={re.escape(lacking[0])}"):  # noqa: B017
            session(build_model(p))


def test_shape_inference_names_the_output_shape():
    p = pack(random_weight(40, 64, 6, 8, 32))
    assert session(build_model(p, x_shape=["b", "s", 64])).get_outputs()[0].shape == ["b", "s", 40]
    assert session(build_model(p, x_shape=[3, 64])).get_outputs()[0].shape == [3, 40]


def test_empty_batch():
    p = pack(random_weight(40, 64, 6, 8, 32))
    (y,) = session(build_model(p)).run(None, {"X": np.zeros((0, 3, 64), np.float32)})
    assert y.shape == (0, 3, 40)


def _run_error(model: bytes, x: np.ndarray, feeds: dict | None = None) -> str:
    """The op must report a clean onnxruntime error, at session creation or at run time."""
    with pytest.raises(Exception) as info:  # noqa: B017 - onnxruntime raises several exception types
        session(model).run(None, {"X": x, **(feeds or {})})
    return str(info.value)


def test_bad_inputs_give_clear_errors():
    p = pack(random_weight(40, 64, 6, 8, 32, bias=True))
    x = np.ones((1, 2, 64), np.float32)

    msg = _run_error(build_model(p, x_shape=["a", "b", "k"]), np.ones((1, 2, 60), np.float32))
    assert "[1, 2, 60]" in msg and "[40, 64]" in msg

    msg = _run_error(build_model(p, attrs={**p.op_attributes(), "n": 4}), x)
    assert "attribute n=4" in msg

    attrs = p.op_attributes()
    del attrs["group_size"]
    assert "attribute" in _run_error(build_model(p, attrs=attrs), x)

    arrays = dict(p.op_inputs())
    header = arrays["header"].copy()
    header[fmt.HDR_MAGIC] = 1
    assert "magic" in _run_error(build_model(p, arrays={**arrays, "header": header}), x)

    header = arrays["header"].copy()
    header[fmt.HDR_VERSION] = 3
    assert "version 3" in _run_error(build_model(p, arrays={**arrays, "header": header}), x)

    mask = arrays["mask"].copy()
    mask[0, 0] ^= 1
    assert "N:M" in _run_error(build_model(p, arrays={**arrays, "mask": mask}), x)

    assert "signs has" in _run_error(build_model(p, arrays={**arrays, "signs": arrays["signs"][:-1]}), x)

    # the same checks hold when the weights arrive as graph inputs instead of initializers
    feeds = {f"w.{name}": arr for name, arr in arrays.items()}
    feeds["w.scales"] = arrays["scales"][:-1]
    msg = _run_error(build_model(p, weights_as_inputs=True), x, feeds)
    assert "scales has" in msg


def test_library_path_override(monkeypatch, tmp_path):
    real = ops.library_path()
    assert real.name == ops.LIBRARY_NAME and real.is_file()
    monkeypatch.setenv(ops.ENV_LIBRARY, str(tmp_path / "missing.so"))
    with pytest.raises(ops.Pbs2pError, match="does not exist"):
        ops.library_path()
    monkeypatch.setenv(ops.ENV_LIBRARY, str(real))
    assert ops.library_path() == real
