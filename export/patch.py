"""Swap linear layers for modules that export as one custom ONNX node, and switch them into emitting mode.

Each swapped module computes the same thing in eager PyTorch as in ONNX Runtime: in eager mode it runs a
plain matmul with the weight the node represents; while `onnx_emission` is active it emits the node through
`torch.onnx.ops.symbolic`, whose inputs are the module's buffers (they become the graph's initializers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pbs2p_edge.errors import Pbs2pError

PBS2P_OP = "pbs2p.edge::SparseBinaryMatMul"
PBS2P_OP_VERSION = 4  # = pbs2p_edge.ops.OP_VERSION


class EmittingModule(nn.Module):
    """A module that runs eagerly, or emits its ONNX node while `emit_onnx` is set (by `onnx_emission`)."""

    emit_onnx: bool = False


@contextlib.contextmanager
def _flag_modules(model: nn.Module, kind: type, flag: str) -> Iterator[None]:
    """Set the boolean attribute `flag` on every `kind` module of `model` for the duration of the block."""
    modules = [m for m in model.modules() if isinstance(m, kind)]
    for module in modules:
        setattr(module, flag, True)
    try:
        yield
    finally:
        for module in modules:
            setattr(module, flag, False)


def onnx_emission(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Make every EmittingModule in `model` emit its ONNX node for the duration of the block."""
    return _flag_modules(model, EmittingModule, "emit_onnx")


def _register_inputs(module: nn.Module, inputs: list[tuple[str, Any]]) -> list[str]:
    names = []
    for name, array in inputs:
        buffer_name = name.replace(".", "_")
        module.register_buffer(buffer_name, torch.from_numpy(array.copy()))
        names.append(buffer_name)
    return names


class SparseBinaryLinear(EmittingModule):
    """A compressed linear: `x @ W_hat.T (+ bias)` eagerly, one `SparseBinaryMatMul` node when exported.

    `packed` is a `pbs2p_edge.format.PackedWeight`; the node's inputs and attributes come from its
    `op_inputs()` / `op_attributes()`, so this module never depends on the packed layout.

    Eager arithmetic: `"float"` is the compressed PyTorch model (fp32 activations); `"kernel"` reproduces what
    the C++ kernels compute (`pbs2p_edge.format.kernel_matmul`: activations rounded to int7 per chunk of a
    scale group, exact integer sums per chunk, salient columns in float), so the graph can be checked against
    PyTorch to rounding noise. Both run on the packed weight decoded at 1 byte per weight (`decode_weight`),
    except "float" on a model that holds W_hat (a plain matmul with it).
    """

    def __init__(self, linear: nn.Linear, packed: Any) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed = packed
        self.arithmetic = "float"
        # Plain attributes, not parameters: the graph must not carry the dense weight.
        self.weight_hat = linear.weight.detach()
        self.bias_eager = None if linear.bias is None else linear.bias.detach()
        self.keep_decoded = False
        self._decoded: DecodedWeight | None = None
        # Set by validation (export/forcing.py): the output to return instead of computing one.
        self.replace_output: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.attributes = {k: int(v) for k, v in packed.op_attributes().items()}
        self.input_names = _register_inputs(self, packed.op_inputs())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.emit_onnx:
            inputs = [x, *(getattr(self, name) for name in self.input_names)]
            return torch.onnx.ops.symbolic(
                PBS2P_OP,
                inputs,
                self.attributes,
                dtype=x.dtype,
                shape=(*x.shape[:-1], self.out_features),
                version=PBS2P_OP_VERSION,
            )
        if self.replace_output is not None:
            return self.replace_output(x)
        if self.arithmetic == "kernel":
            return self._kernel_forward(x)
        if not self.weight_hat.is_meta:
            return nn.functional.linear(x, self.weight_hat, self.bias_eager)
        # No dense weight held: W_hat rebuilt for this call from the decoded weight (one layer at a time).
        return nn.functional.linear(x, self._weights().dense(), self.bias_eager)

    def _weights(self) -> DecodedWeight:
        """The decoded packed weight: kept while `decoded_once` is active (one decode per layer), else made
        for this call only, so a large model never holds every layer decoded outside validation."""
        if self._decoded is not None:
            return self._decoded
        decoded = decode_weight(self.packed)
        if self.keep_decoded:
            self._decoded = decoded
        return decoded

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from pbs2p_edge.format.packed import ACT_MAX
        from pbs2p_edge.format.reference import chunk_bounds

        w = self._weights()
        flat = x.reshape(-1, self.in_features).float()
        if w.col_scales is not None:  # y = W_hat_v1 @ (x * c), scaled before the int7 quantization
            flat = flat * w.col_scales
        pieces = []
        for begin, end, _ in chunk_bounds(self.in_features, self.packed.group_size):
            chunk = flat[:, begin:end]
            amax = chunk.abs().amax(dim=1, keepdim=True)
            # A true division (torch computes `scalar / tensor` as a reciprocal times the scalar, which
            # rounds differently from the kernels and flips ties of the int7 rounding).
            safe = torch.where(amax > 0, amax, 1.0)
            inv = torch.where(amax > 0, torch.full_like(safe, float(ACT_MAX)) / safe, 0.0)
            q = torch.clamp(torch.round(chunk * inv), -ACT_MAX, ACT_MAX)
            pieces.append(q * (amax / torch.full_like(amax, float(ACT_MAX))))
        xq = torch.cat(pieces, dim=1)
        y = xq @ w.binary().T
        if w.residual is not None:
            y = y + flat[:, w.cols] @ w.residual.T
        if self.bias_eager is not None:
            y = y + self.bias_eager
        return y.reshape(*x.shape[:-1], self.out_features)


@dataclass(frozen=True)
class DecodedWeight:
    """A packed layer decoded for the PyTorch reference at 1 byte per weight: `ternary` int8 [rows, K] =
    mask * sign, the fp16 scales `alpha`, `mu` [rows, G] as float32, and the salient term: `residual`
    [rows, S] (mask * sign * alpha2) on input columns `cols` [S], or None; `col_scales` [K] or None."""

    ternary: torch.Tensor
    alpha: torch.Tensor
    mu: torch.Tensor
    group_size: int
    cols: torch.Tensor | None
    residual: torch.Tensor | None
    col_scales: torch.Tensor | None

    def binary(self) -> torch.Tensor:
        """The binarized part mask * (alpha * sign + mu) [rows, K] in float32 (without salient columns and
        column scales), built for one call."""
        t = self.ternary.float()
        k = t.shape[1]
        alpha = self.alpha.repeat_interleave(self.group_size, dim=1)[:, :k]
        mu = self.mu.repeat_interleave(self.group_size, dim=1)[:, :k]
        signed = t * alpha
        return signed.addcmul_(t.abs_(), mu)

    def dense(self) -> torch.Tensor:
        """W_hat [rows, K] as `SparseBinaryWeight.dense()` computes it, to the bit."""
        w = self.binary()
        if self.residual is not None:
            w[:, self.cols] += self.residual
        if self.col_scales is not None:
            w = w * self.col_scales
        return w


def decode_weight(packed: Any) -> DecodedWeight:
    """Decode one packed layer (`pbs2p_edge.format.PackedWeight`) into a DecodedWeight."""
    from pbs2p_edge.format import unpack

    w = unpack(packed)
    cols = residual = None
    if w.salient_cols is not None and w.salient_cols.size:
        cols_np = np.asarray(w.salient_cols, dtype=np.int64)  # [G, S]
        signs = np.where(w.salient_signs, 1.0, -1.0)  # [rows, G, S]
        residual_np = w.mask[:, cols_np] * signs * w.alpha2[:, :, None]
        cols = torch.from_numpy(cols_np.reshape(-1))
        residual = torch.from_numpy(np.ascontiguousarray(residual_np.reshape(w.rows, -1), np.float32))
    ternary = np.where(w.mask, np.where(w.signs, 1, -1), 0).astype(np.int8)
    as_float = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return DecodedWeight(
        ternary=torch.from_numpy(ternary),
        alpha=as_float(w.alpha),
        mu=as_float(w.mu),
        group_size=w.group_size,
        cols=cols,
        residual=residual,
        col_scales=None if w.col_scales is None else as_float(w.col_scales),
    )


@contextlib.contextmanager
def decoded_once(model: nn.Module) -> Iterator[None]:
    """Within the block, each SparseBinaryLinear of `model` decodes its packed weight at most once and keeps
    it (1 byte per weight: validation runs the model about 50 times); dropped on exit."""
    try:
        with _flag_modules(model, SparseBinaryLinear, "keep_decoded"):
            yield
    finally:
        forget_decoded(model)


def forget_decoded(model: nn.Module) -> None:
    """Drop the decoded weights `decoded_once` keeps (they are rebuilt on the next call if still active)."""
    for module in model.modules():
        if isinstance(module, SparseBinaryLinear):
            module._decoded = None


@contextlib.contextmanager
def eager_arithmetic(model: nn.Module, arithmetic: str) -> Iterator[None]:
    """Run the model's SparseBinaryLinear modules eagerly with `"float"` or `"kernel"` arithmetic."""
    modules = [m for m in model.modules() if isinstance(m, SparseBinaryLinear)]
    previous = [m.arithmetic for m in modules]
    for module in modules:
        module.arithmetic = arithmetic
    try:
        yield
    finally:
        for module, value in zip(modules, previous, strict=True):
            module.arithmetic = value


Factory = Callable[[str, nn.Linear], nn.Module | None]


@contextlib.contextmanager
def swapped_linears(model: nn.Module, factory: Factory) -> Iterator[dict[str, nn.Module]]:
    """Replace each nn.Linear for which `factory(name, linear)` returns a module; restore them on exit."""
    originals: dict[str, tuple[nn.Module, str, nn.Module]] = {}
    swapped: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        replacement = factory(name, module)
        if replacement is None:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        originals[name] = (parent, attr, module)
        setattr(parent, attr, replacement)
        swapped[name] = replacement
    try:
        yield swapped
    finally:
        for parent, attr, module in originals.values():
            setattr(parent, attr, module)


def pbs2p_factory(packed: Mapping[str, Any]) -> Factory:
    """Factory swapping exactly the linears that have a packed weight; checks shapes against the model."""

    def make(name: str, linear: nn.Linear) -> nn.Module | None:
        weight = packed.get(name)
        if weight is None:
            return None
        attrs = weight.op_attributes()
        rows, cols = attrs.get("rows"), attrs.get("cols", attrs.get("k"))
        if (
            rows is not None
            and cols is not None
            and (rows, cols) != (linear.out_features, linear.in_features)
        ):
            raise Pbs2pError(
                f"packed weight {name} is {rows}x{cols} but the model's layer is "
                f"{linear.out_features}x{linear.in_features}"
            )
        return SparseBinaryLinear(linear, weight)

    return make


def check_packed_names(model: nn.Module, packed: Mapping[str, Any]) -> None:
    """Every packed weight must name an nn.Linear of the model (else the checkpoint and model disagree)."""
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = sorted(set(packed) - linears)
    if missing:
        raise Pbs2pError(
            f"checkpoint has packed weights for layers the model does not have: {', '.join(missing[:3])}"
        )
