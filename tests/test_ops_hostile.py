"""SparseBinaryMatMul under hostile input: packed arrays that disagree with their header, header fields out of
range or huge. Every case must fail at session creation (constant weights) or at run time (weights fed as graph
inputs) with an ONNX Runtime error carrying the op's one-line message, never crash or allocate wildly."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_ops_ort import build_model, session

from pbs2p_edge.format import PackedWeight, pack, random_weight
from pbs2p_edge.format import packed as fmt

INT32_MAX = 2**31 - 1
Arrays = dict[str, np.ndarray]


def _base() -> PackedWeight:
    return pack(random_weight(64, 128, 6, 8, 32, salient=2, bias=True, seed=21, col_scales=True))


def _header(**fields: int) -> Callable[[Arrays], None]:
    def edit(a: Arrays) -> None:
        h = a["header"].copy()
        for name, value in fields.items():
            h[getattr(fmt, f"HDR_{name.upper()}")] = value
        a["header"] = h

    return edit


def _set(name: str, make: Callable[[np.ndarray], np.ndarray]) -> Callable[[Arrays], None]:
    def edit(a: Arrays) -> None:
        a[name] = np.ascontiguousarray(make(a[name].copy()))

    return edit


def _salient_cols(value: Callable[[np.ndarray], None]) -> Callable[[Arrays], None]:
    def make(cols: np.ndarray) -> np.ndarray:
        value(cols)
        return cols

    return _set("salient_cols", make)


def _nan_scale(s: np.ndarray) -> np.ndarray:
    s[3, 1, 0] = np.inf
    return s


def _reserved(h: np.ndarray) -> np.ndarray:
    h[fmt.HDR_GROUPS + 3] = 1
    return h


def _dup(c: np.ndarray) -> None:
    c[1, 1] = c[1, 0]


def _outside(c: np.ndarray) -> None:
    c[2, 0] = 5  # group 2 covers columns 64..95


def _negative(c: np.ndarray) -> None:
    c[0, 0] = -(2**31)


# (edit of the arrays, attributes follow the edited header?, expected message fragment)
CASES = {
    "mask-half-the-rows": (_set("mask", lambda m: m[:32]), False, "mask has 512 elements, expected 1024"),
    "header-rows-64-arrays-32": (
        lambda a: [
            _set(n, lambda x: x[:32])(a) for n in ("mask", "signs", "scales", "salient_signs", "alpha2")
        ],
        False,
        "elements, expected",
    ),
    "header-k-huge": (
        _header(k=2**31 - 8, groups=(2**31 - 8 + 31) // 32),
        True,
        "mask has 1024 elements, expected",
    ),
    "header-rows-huge": (_header(rows=INT32_MAX), True, "mask has 1024 elements, expected 34359738352"),
    "header-rows-negative": (_header(rows=-64), True, "bad weight shape [-64, 128]"),
    "header-k-negative": (_header(k=-128), True, "bad weight shape [64, -128]"),
    "header-groups-wrong": (_header(groups=5), True, "header groups=5 != ceil(K / group_size) = 4"),
    "header-groups-huge": (_header(groups=INT32_MAX), True, "header groups=2147483647"),
    "header-group-size-huge": (_header(group_size=2**30), True, "group_size must be a multiple of 4"),
    "header-group-size-zero": (_header(group_size=0), True, "group_size must be a multiple of 4"),
    "header-m-bad": (_header(m=7), True, "M must be 4, 8 or 16, got 7"),
    "header-n-zero": (_header(n=0), True, "N must be in [1, M]"),
    "header-salient-huge": (_header(salient=INT32_MAX), True, "salient count 2147483647"),
    "header-salient-negative": (_header(salient=-1), True, "salient count -1"),
    "header-salient-flag-off": (_header(flags=fmt.FLAG_BIAS | fmt.FLAG_COL_SCALES), True, "salient flag"),
    "header-bias-flag-off": (
        _header(flags=fmt.FLAG_SALIENT | fmt.FLAG_COL_SCALES),
        True,
        "bias has 64 elements",
    ),
    "header-col-scales-flag-off": (
        _header(flags=fmt.FLAG_SALIENT | fmt.FLAG_BIAS),
        True,
        "col_scales has 128 elements, expected 0",
    ),
    "header-unknown-flag": (_header(flags=7 | 64), True, "unknown header flags 71"),
    "header-version-1-with-col-scales": (
        _header(version=1),
        True,
        "unknown header flags 7 for format version 1",
    ),
    "header-version-huge": (_header(version=INT32_MAX), True, "unsupported packed format version 2147483647"),
    "header-reserved": (_set("header", _reserved), True, "reserved header"),
    "header-short": (_set("header", lambda h: h[:10]), False, "header must hold 16 int32 values, got 10"),
    "signs-short": (_set("signs", lambda s: s[:, :-1]), False, "signs has"),
    "scales-long": (_set("scales", lambda s: np.concatenate([s, s])), False, "scales has 1024 elements"),
    "scales-non-finite": (_set("scales", _nan_scale), False, "scales holds a non-finite fp16 value"),
    "salient-cols-short": (_set("salient_cols", lambda c: c[:2]), False, "salient_cols has 4 elements"),
    "salient-col-outside-group": (_salient_cols(_outside), False, "salient column 5 is outside group 2"),
    "salient-col-negative": (
        _salient_cols(_negative),
        False,
        "salient column -2147483648 is outside group 0",
    ),
    "salient-col-repeated": (_salient_cols(_dup), False, "appears twice in group 1"),
    "salient-signs-empty": (_set("salient_signs", lambda s: s[:0]), False, "salient_signs has 0 elements"),
    "alpha2-short": (_set("alpha2", lambda s: s[:-1]), False, "alpha2 has"),
    "bias-empty": (_set("bias", lambda b: b[:0]), False, "bias has 0 elements, expected 64"),
    "col-scales-short": (
        _set("col_scales", lambda c: c[:-1]),
        False,
        "col_scales has 127 elements, expected 128",
    ),
    "mask-breaks-n-m": (_set("mask", lambda m: m ^ np.uint8(1)), False, "N:M requires 6"),
}


def _attributes(arrays: Arrays, p: PackedWeight) -> dict[str, int]:
    """Attributes matching the (edited) header where it parses, so the array checks are what is exercised."""
    h = arrays["header"]
    if h.shape != (fmt.HEADER_LEN,):
        return p.op_attributes()
    flags = int(h[fmt.HDR_FLAGS])
    return {
        "n": int(h[fmt.HDR_N]),
        "m": int(h[fmt.HDR_M]),
        "group_size": int(h[fmt.HDR_GROUP_SIZE]),
        "rows": max(1, int(h[fmt.HDR_ROWS])),
        "k": max(1, int(h[fmt.HDR_K])),
        "salient": int(h[fmt.HDR_SALIENT]),
        "has_bias": int(bool(flags & fmt.FLAG_BIAS)),
        "has_col_scales": int(bool(flags & fmt.FLAG_COL_SCALES)),
    }


def _assert_op_error(exc: BaseException, fragment: str) -> None:
    msg = str(exc)
    assert "SparseBinaryMatMul: " in msg and fragment in msg, msg
    assert "\n" not in msg.strip(), msg


@pytest.mark.parametrize("case", list(CASES))
def test_disagreeing_constant_arrays_fail_at_session_creation(case: str) -> None:
    edit, follow, fragment = CASES[case]
    p = _base()
    arrays = dict(p.op_inputs())
    edit(arrays)
    attrs = _attributes(arrays, p) if follow else p.op_attributes()
    x_dim = attrs["k"] if attrs["k"] <= 4096 else "k"
    model = build_model(p, attrs=attrs, arrays=arrays, x_shape=["a", x_dim])
    with pytest.raises(Exception) as info:  # noqa: B017 - onnxruntime raises several exception types
        session(model)
    _assert_op_error(info.value, fragment)


@pytest.mark.parametrize(
    "case", ["mask-half-the-rows", "header-k-huge", "salient-col-repeated", "bias-empty"]
)
def test_disagreeing_graph_input_arrays_fail_at_run(case: str) -> None:
    edit, follow, fragment = CASES[case]
    p = _base()
    arrays = dict(p.op_inputs())
    edit(arrays)
    attrs = _attributes(arrays, p) if follow else p.op_attributes()
    model = build_model(p, attrs=attrs, arrays=arrays, x_shape=["a", "k"], weights_as_inputs=True)
    sess = session(model)  # weights are not constant: checked per call
    feeds = {"X": np.ones((2, p.k), np.float32), **{f"w.{n}": a for n, a in arrays.items()}}
    with pytest.raises(Exception) as info:  # noqa: B017
        sess.run(None, feeds)
    _assert_op_error(info.value, fragment)


@pytest.mark.parametrize("name,value", [("rows", -5), ("k", -1), ("k", 2**40), ("salient", 2**62)])
def test_attribute_out_of_range_fails_at_session_creation(name: str, value: int) -> None:
    p = _base()
    with pytest.raises(Exception) as info:  # noqa: B017
        session(build_model(p, attrs={**p.op_attributes(), name: value}, x_shape=["a", "k"]))
    msg = str(info.value)
    assert "SparseBinaryMatMul: attribute" in msg and f"{name}={value}" in msg, msg


def test_intact_base_weight_runs() -> None:
    """The base case of the table above is valid: the failures come from the edits, not from the base."""
    p = _base()
    (y,) = session(build_model(p, x_shape=["a", p.k])).run(None, {"X": np.ones((2, p.k), np.float32)})
    assert y.shape == (2, p.rows) and np.isfinite(y).all()
    assert isinstance(ort.get_version_string(), str)


@pytest.mark.parametrize("missing", [1, 5, 9])
def test_a_left_out_input_fails_at_session_creation(missing: int) -> None:
    """ONNX lets a node skip an optional input with an empty name; the op refuses it (it used to crash)."""
    p = _base()
    model = onnx.load_from_string(build_model(p, x_shape=["a", p.k]))
    model.graph.node[0].input[missing] = ""
    with pytest.raises(Exception) as info:  # noqa: B017
        session(model.SerializeToString())
    msg = str(info.value)
    # op version 3 declares the packed arrays a variadic input, so onnxruntime itself refuses the gap; the op's
    # own check (kept for runtimes that let it through) names the input
    assert "is absent, but not optional" in msg or "SparseBinaryMatMul: " in msg, msg
    # (onnxruntime names the variadic slot "Input1" whichever array is missing)
    assert "Input1 is absent" in msg or f"input {missing} is missing (empty name)" in msg, msg
