"""Packed sparse-binary weights: the disk format of docs/FORMAT.md (numpy only, no torch).

`SparseBinaryWeight` is the logical layer (mask, signs, fp16-rounded scales, optional per-column scales);
`pack` turns it into the arrays stored in checkpoints and ONNX initializers (always format version 2), `unpack`
inverts it bit for bit; `PackedWeight.from_arrays` reads versions 1 and 2. custom_ops/include/pbs2p/format.h
mirrors the constants below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pbs2p_edge.errors import Pbs2pError

MAGIC = 0x50324250  # bytes "PB2P" read as little-endian int32
VERSION = 2  # what pack() writes
READ_VERSIONS = (1, 2)  # what from_arrays() (and the op) read; version 1 has no col_scales
HEADER_LEN = 16
HDR_MAGIC, HDR_VERSION, HDR_N, HDR_M, HDR_GROUP_SIZE, HDR_ROWS, HDR_K, HDR_FLAGS, HDR_SALIENT, HDR_GROUPS = (
    range(10)
)
FLAG_SALIENT = 1
FLAG_BIAS = 2
FLAG_COL_SCALES = 4  # version 2 only: per-input-column fp16 scale c[j]
FLAGS_BY_VERSION = {1: FLAG_SALIENT | FLAG_BIAS, 2: FLAG_SALIENT | FLAG_BIAS | FLAG_COL_SCALES}
SUPPORTED_M = (4, 8, 16)
MAX_GROUP_SIZE = 4096
FP16_MAX = 65504.0

# Runtime layout constants of the C++ kernels (format.h): rows per tile, activation chunk, int7 activations.
TILE_ROWS = 32
CHUNK_COLS = 64
ACT_MAX = 63

# Op input order after X; every name is always present (empty arrays for absent parts). Version 1 stops at bias.
ARRAY_ORDER = (
    "header",
    "mask",
    "signs",
    "scales",
    "salient_cols",
    "salient_signs",
    "alpha2",
    "bias",
    "col_scales",
)
ARRAY_ORDER_V1 = ARRAY_ORDER[:-1]
ARRAY_DTYPES = {
    "header": np.int32,
    "mask": np.uint8,
    "signs": np.uint8,
    "scales": np.float16,
    "salient_cols": np.int32,
    "salient_signs": np.uint8,
    "alpha2": np.float16,
    "bias": np.float32,
    "col_scales": np.float16,
}


def _fp16(values: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    if not np.all(np.isfinite(values)) or np.any(np.abs(values) > FP16_MAX):
        raise Pbs2pError(f"{name} has values that are not finite fp16 numbers (|x| <= {FP16_MAX})")
    return values.astype(np.float16)


def check_params(n: int, m: int, group_size: int, rows: int, k: int) -> None:
    """Raise Pbs2pError unless (n, m, group_size, rows, k) is representable in the format."""
    if m not in SUPPORTED_M:
        raise Pbs2pError(f"M must be one of {SUPPORTED_M}, got {m}")
    if not 1 <= n <= m:
        raise Pbs2pError(f"N must be in [1, M={m}], got {n}")
    if rows < 1 or k < 1:
        raise Pbs2pError(f"bad weight shape [{rows}, {k}]")
    if k % m:
        raise Pbs2pError(
            f"K={k} (in features) is not a multiple of M={m}: N:M pruning needs whole runs of M columns"
        )
    if group_size < 4 or group_size % 4 or group_size > MAX_GROUP_SIZE:
        raise Pbs2pError(f"group_size must be a multiple of 4 in [4, {MAX_GROUP_SIZE}], got {group_size}")


@dataclass
class SparseBinaryWeight:
    """One compressed linear layer W_hat [rows, K] (see docs/ARCHITECTURE.md section 1)."""

    n: int
    m: int
    group_size: int
    mask: np.ndarray  # bool [rows, K]
    signs: np.ndarray  # bool [rows, K], True = +1 (ignored where mask is False)
    alpha: np.ndarray  # float32 [rows, G]
    mu: np.ndarray  # float32 [rows, G]
    salient_cols: np.ndarray | None = None  # int [G, S], absolute column indices
    salient_signs: np.ndarray | None = None  # bool [rows, G, S]
    alpha2: np.ndarray | None = None  # float32 [rows, G]
    bias: np.ndarray | None = None  # float32 [rows]
    col_scales: np.ndarray | None = None  # float32 [K], fp16-representable: W_hat[:, j] *= c[j]

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def k(self) -> int:
        return int(self.mask.shape[1])

    @property
    def groups(self) -> int:
        return -(-self.k // self.group_size)

    @property
    def salient(self) -> int:
        return 0 if self.salient_cols is None else int(np.asarray(self.salient_cols).shape[1])

    def validate(self) -> None:
        """Raise Pbs2pError on any shape, N:M or salient-column inconsistency."""
        mask = np.asarray(self.mask)
        if mask.ndim != 2:
            raise Pbs2pError(f"mask must be 2-D [rows, K], got shape {list(mask.shape)}")
        rows, k, g = self.rows, self.k, self.groups
        check_params(self.n, self.m, self.group_size, rows, k)
        for name, arr, shape in (
            ("signs", self.signs, (rows, k)),
            ("alpha", self.alpha, (rows, g)),
            ("mu", self.mu, (rows, g)),
        ):
            if np.asarray(arr).shape != shape:
                raise Pbs2pError(f"{name} has shape {list(np.asarray(arr).shape)}, expected {list(shape)}")
        counts = mask.astype(bool).reshape(rows, k // self.m, self.m).sum(axis=-1)
        bad = np.argwhere(counts != self.n)
        if bad.size:
            r, run = bad[0]
            raise Pbs2pError(
                f"row {r} columns {run * self.m}..{run * self.m + self.m - 1} keep {counts[r, run]} weights, "
                f"{self.n}:{self.m} requires {self.n}"
            )
        parts = (self.salient_cols, self.salient_signs, self.alpha2)
        if any(p is None for p in parts) and not all(p is None for p in parts):
            raise Pbs2pError("salient_cols, salient_signs and alpha2 must be given together")
        if self.salient_cols is not None:
            cols = np.asarray(self.salient_cols)
            s = self.salient
            if cols.shape != (g, s) or s < 1:
                raise Pbs2pError(f"salient_cols has shape {list(cols.shape)}, expected [{g}, S>=1]")
            if np.asarray(self.salient_signs).shape != (rows, g, s):
                raise Pbs2pError(
                    f"salient_signs has shape {list(np.asarray(self.salient_signs).shape)}, "
                    f"expected {[rows, g, s]}"
                )
            if np.asarray(self.alpha2).shape != (rows, g):
                raise Pbs2pError(
                    f"alpha2 has shape {list(np.asarray(self.alpha2).shape)}, expected {[rows, g]}"
                )
            lo = np.arange(g)[:, None] * self.group_size
            hi = np.minimum(lo + self.group_size, k)
            if np.any(cols < lo) or np.any(cols >= hi):
                raise Pbs2pError("a salient column lies outside its group")
            if any(len(set(row.tolist())) != s for row in cols):
                raise Pbs2pError("salient columns must be distinct within a group")
        if self.bias is not None and np.asarray(self.bias).shape != (rows,):
            raise Pbs2pError(f"bias has shape {list(np.asarray(self.bias).shape)}, expected [{rows}]")
        if self.col_scales is not None and np.asarray(self.col_scales).shape != (k,):
            raise Pbs2pError(
                f"col_scales has shape {list(np.asarray(self.col_scales).shape)}, expected [{k}]"
            )

    def dense(self) -> np.ndarray:
        """W_hat as float32 [rows, K], with alpha, mu, alpha2 (and col_scales) rounded to fp16 as stored."""
        self.validate()
        col_group = np.arange(self.k) // self.group_size
        alpha = _fp16(self.alpha, "alpha").astype(np.float32)[:, col_group]
        mu = _fp16(self.mu, "mu").astype(np.float32)[:, col_group]
        w = np.where(np.asarray(self.signs, dtype=bool), alpha, -alpha) + mu
        if self.salient_cols is not None:
            alpha2 = _fp16(self.alpha2, "alpha2").astype(np.float32)
            signs2 = np.asarray(self.salient_signs, dtype=bool)
            for g, cols in enumerate(np.asarray(self.salient_cols)):
                for s, col in enumerate(cols):
                    w[:, col] += np.where(signs2[:, g, s], alpha2[:, g], -alpha2[:, g])
        w = np.where(np.asarray(self.mask, dtype=bool), w, np.float32(0.0)).astype(np.float32)
        if self.col_scales is not None:
            w = w * _fp16(self.col_scales, "col_scales").astype(np.float32)[None, :]
        return w


def _empty(name: str) -> np.ndarray:
    return np.zeros((0,), dtype=ARRAY_DTYPES[name])


@dataclass(frozen=True)
class PackedWeight:
    """The stored arrays of one layer (`arrays`, in ARRAY_ORDER) plus derived sizes and op wiring."""

    arrays: dict[str, np.ndarray] = field(repr=False)

    @property
    def header(self) -> np.ndarray:
        return self.arrays["header"]

    n = property(lambda self: int(self.header[HDR_N]))
    m = property(lambda self: int(self.header[HDR_M]))
    group_size = property(lambda self: int(self.header[HDR_GROUP_SIZE]))
    rows = property(lambda self: int(self.header[HDR_ROWS]))
    k = property(lambda self: int(self.header[HDR_K]))
    salient = property(lambda self: int(self.header[HDR_SALIENT]))
    groups = property(lambda self: int(self.header[HDR_GROUPS]))
    has_bias = property(lambda self: bool(self.header[HDR_FLAGS] & FLAG_BIAS))
    has_col_scales = property(lambda self: bool(self.header[HDR_FLAGS] & FLAG_COL_SCALES))
    version = property(lambda self: int(self.header[HDR_VERSION]))

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> PackedWeight:
        """Validate magic, version, parameters and every array's dtype and shape (torch tensors accepted).

        Version 1 (no `col_scales`; the key may be absent, as in old checkpoints, or an empty array) and
        version 2 are read; a version 1 header is kept as stored and `col_scales` becomes an empty array.
        """
        missing = [name for name in ARRAY_ORDER_V1 if name not in arrays]
        if missing:
            raise Pbs2pError(f"packed weight lacks arrays {missing}")
        arrays = dict(arrays)
        arrays.setdefault("col_scales", _empty("col_scales"))
        out: dict[str, np.ndarray] = {}
        for name in ARRAY_ORDER:
            value = arrays[name]
            if hasattr(value, "detach"):  # a torch tensor from a checkpoint
                value = value.detach().cpu().numpy()
            arr = np.ascontiguousarray(value)
            if arr.dtype != ARRAY_DTYPES[name]:
                raise Pbs2pError(
                    f"packed array {name} has dtype {arr.dtype}, expected {np.dtype(ARRAY_DTYPES[name])}"
                )
            out[name] = arr
        h = out["header"]
        if h.shape != (HEADER_LEN,):
            raise Pbs2pError(f"packed header has shape {list(h.shape)}, expected [{HEADER_LEN}]")
        if int(h[HDR_MAGIC]) != MAGIC:
            raise Pbs2pError("packed header magic mismatch: not a pbs2p packed weight")
        version = int(h[HDR_VERSION])
        if version not in READ_VERSIONS:
            raise Pbs2pError(
                f"unsupported packed format version {version} (this build reads versions "
                f"{', '.join(map(str, READ_VERSIONS))})"
            )
        if np.any(h[HDR_GROUPS + 1 :] != 0):
            raise Pbs2pError("packed header reserved entries must be 0")
        n, m, gs, rows, k = (int(h[i]) for i in (HDR_N, HDR_M, HDR_GROUP_SIZE, HDR_ROWS, HDR_K))
        check_params(n, m, gs, rows, k)
        flags, s, g = int(h[HDR_FLAGS]), int(h[HDR_SALIENT]), int(h[HDR_GROUPS])
        if g != -(-k // gs):
            raise Pbs2pError(f"packed header groups={g} != ceil(K={k} / group_size={gs})")
        if flags & ~FLAGS_BY_VERSION[version]:
            raise Pbs2pError(f"packed header flags={flags} has bits unknown to format version {version}")
        if bool(flags & FLAG_SALIENT) != (s > 0) or s < 0 or s > gs:
            raise Pbs2pError(f"packed header flags={flags} / salient={s} are inconsistent")
        expected = _shapes(n, m, rows, k, g, s, bool(flags & FLAG_BIAS), bool(flags & FLAG_COL_SCALES))
        for name, shape in expected.items():
            if out[name].shape != shape:
                raise Pbs2pError(
                    f"packed array {name} has shape {list(out[name].shape)}, expected {list(shape)}"
                )
        if s:
            cols = out["salient_cols"].astype(np.int64)
            lo = np.arange(g)[:, None] * gs
            if np.any(cols < lo) or np.any(cols >= np.minimum(lo + gs, k)):
                raise Pbs2pError("packed salient_cols has a column outside its group")
            if np.any(np.diff(np.sort(cols, axis=1), axis=1) == 0):
                raise Pbs2pError("packed salient_cols repeats a column within a group")
        for name in ("scales", "alpha2", "col_scales"):
            if not np.all(np.isfinite(out[name])):
                raise Pbs2pError(f"packed array {name} has non-finite values")
        return cls(out)

    @property
    def nbytes(self) -> int:
        """Every stored byte, header included."""
        return int(sum(a.nbytes for a in self.arrays.values()))

    @property
    def bits_per_weight(self) -> float:
        """Everything stored divided by rows * K (the honest figure; see bits_breakdown)."""
        return self.nbytes * 8 / (self.rows * self.k)

    def bits_breakdown(self) -> dict[str, float]:
        """Bits per weight of each stored array, plus the paper-style figure (kept signs only) for contrast."""
        per = {name: a.nbytes * 8 / (self.rows * self.k) for name, a in self.arrays.items()}
        per["total"] = self.bits_per_weight
        per["paper_style_signs_only"] = self.n / self.m
        per["runtime_layout"] = runtime_bits_per_weight(self)
        per["information_floor"] = information_floor_bits(self)
        return per

    def op_inputs(self) -> list[tuple[str, np.ndarray]]:
        """The SparseBinaryMatMul weight inputs (initializers) after X, in op input order (the 9-array v2
        form; a version 1 weight passes an empty col_scales)."""
        return [(name, self.arrays[name]) for name in ARRAY_ORDER]

    def op_attributes(self) -> dict[str, int]:
        return {
            "n": self.n,
            "m": self.m,
            "group_size": self.group_size,
            "rows": self.rows,
            "k": self.k,
            "salient": self.salient,
            "has_bias": int(self.has_bias),
            "has_col_scales": int(self.has_col_scales),
        }


def runtime_bits_per_weight(p: PackedWeight) -> float:
    """Bits per weight the C++ kernels stream per token (2-bit codes over 32-row tiles, fp16 scales)."""
    tiles_rows = -(-p.rows // TILE_ROWS) * TILE_ROWS
    bits = tiles_rows * p.k * 2 + tiles_rows * p.groups * 32
    if p.salient:
        bits += tiles_rows * p.groups * (8 * p.salient + 16) + p.groups * p.salient * 32
    if p.has_bias:
        bits += p.rows * 32
    if p.has_col_scales:
        bits += p.k * 32  # float32 c[j] in the runtime weight
    return bits / (p.rows * p.k)


def information_floor_bits(p: PackedWeight) -> float:
    """Bits per weight below which no encoding of this weight's values can go: everything stored, with the mask's
    one bit per weight replaced by the entropy of one N:M pattern, log2(C(M, N)) / M (0.601 at 6:8). A kernel that
    streams its weights at the memory's rate can beat another that does, reading B bits per weight, by at most
    B / this (docs/FORMAT.md, "Honest bits per weight")."""
    mask_bits = p.arrays["mask"].nbytes * 8 / (p.rows * p.k)
    return p.bits_per_weight - mask_bits + math.log2(math.comb(p.m, p.n)) / p.m


def _shapes(
    n: int, m: int, rows: int, k: int, g: int, s: int, has_bias: bool, has_col_scales: bool
) -> dict[str, tuple[int, ...]]:
    return {
        "mask": (rows, -(-k // 8)),
        "signs": (rows, -(-(k // m * n) // 8)),
        "scales": (rows, g, 2),
        "salient_cols": (g, s) if s else (0,),
        "salient_signs": (rows, -(-(g * s) // 8)) if s else (0,),
        "alpha2": (rows, g) if s else (0,),
        "bias": (rows,) if has_bias else (0,),
        "col_scales": (k,) if has_col_scales else (0,),
    }


def pack(w: SparseBinaryWeight) -> PackedWeight:
    """Logical layer -> disk arrays. Scales are rounded to fp16; signs of pruned weights are dropped."""
    w.validate()
    rows, k, g, s = w.rows, w.k, w.groups, w.salient
    mask = np.asarray(w.mask, dtype=bool)
    signs = np.asarray(w.signs, dtype=bool)
    header = np.zeros(HEADER_LEN, dtype=np.int32)
    flags = (
        (FLAG_SALIENT if s else 0)
        | (FLAG_BIAS if w.bias is not None else 0)
        | (FLAG_COL_SCALES if w.col_scales is not None else 0)
    )
    header[: HDR_GROUPS + 1] = [MAGIC, VERSION, w.n, w.m, w.group_size, rows, k, flags, s, g]
    kept = k // w.m * w.n
    arrays = {
        "header": header,
        "mask": np.packbits(mask, axis=1, bitorder="little"),
        # boolean indexing walks row-major, and every row keeps exactly `kept` weights
        "signs": np.packbits(signs[mask].reshape(rows, kept), axis=1, bitorder="little"),
        "scales": np.ascontiguousarray(np.stack([_fp16(w.alpha, "alpha"), _fp16(w.mu, "mu")], axis=-1)),
        "salient_cols": _empty("salient_cols"),
        "salient_signs": _empty("salient_signs"),
        "alpha2": _empty("alpha2"),
        "bias": _empty("bias"),
        "col_scales": _empty("col_scales"),
    }
    if s:
        arrays["salient_cols"] = np.ascontiguousarray(w.salient_cols, dtype=np.int32)
        flat = np.asarray(w.salient_signs, dtype=bool).reshape(rows, g * s)
        arrays["salient_signs"] = np.packbits(flat, axis=1, bitorder="little")
        arrays["alpha2"] = _fp16(w.alpha2, "alpha2")
    if w.bias is not None:
        arrays["bias"] = np.ascontiguousarray(w.bias, dtype=np.float32)
    if w.col_scales is not None:
        arrays["col_scales"] = _fp16(w.col_scales, "col_scales")
    return PackedWeight.from_arrays(arrays)


def unpack(p: PackedWeight) -> SparseBinaryWeight:
    """Disk arrays -> logical layer (signs of pruned weights come back False; scales as float32 of fp16)."""
    a = p.arrays
    rows, k, g, s = p.rows, p.k, p.groups, p.salient
    mask = np.unpackbits(a["mask"], axis=1, count=k, bitorder="little").astype(bool)
    kept = k // p.m * p.n
    sign_bits = np.unpackbits(a["signs"], axis=1, count=kept, bitorder="little").astype(bool)
    signs = np.zeros((rows, k), dtype=bool)
    signs[mask] = sign_bits.ravel()
    scales = a["scales"].astype(np.float32)
    w = SparseBinaryWeight(
        n=p.n,
        m=p.m,
        group_size=p.group_size,
        mask=mask,
        signs=signs,
        alpha=np.ascontiguousarray(scales[..., 0]),
        mu=np.ascontiguousarray(scales[..., 1]),
    )
    if s:
        w.salient_cols = a["salient_cols"].astype(np.int64)
        flat = np.unpackbits(a["salient_signs"], axis=1, count=g * s, bitorder="little").astype(bool)
        w.salient_signs = flat.reshape(rows, g, s)
        w.alpha2 = a["alpha2"].astype(np.float32)
    if p.has_bias:
        w.bias = a["bias"].copy()
    if p.has_col_scales:
        w.col_scales = a["col_scales"].astype(np.float32)
    return w
