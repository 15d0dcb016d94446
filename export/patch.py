"""Swap linear layers for modules that export as one custom ONNX node, and switch them into emitting mode.

Each swapped module computes the same thing in eager PyTorch as in ONNX Runtime: in eager mode it runs a
plain matmul with the weight the node represents; while `onnx_emission` is active it emits the node through
`torch.onnx.ops.symbolic`, whose inputs are the module's buffers (they become the graph's initializers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from pbs2p_edge.errors import Pbs2pError

PBS2P_OP = "pbs2p.edge::SparseBinaryMatMul"
PBS2P_OP_VERSION = 3  # = pbs2p_edge.ops.OP_VERSION


class EmittingModule(nn.Module):
    """A module that runs eagerly, or emits its ONNX node while `emit_onnx` is set (by `onnx_emission`)."""

    emit_onnx: bool = False


@contextlib.contextmanager
def onnx_emission(model: nn.Module) -> Iterator[None]:
    """Make every EmittingModule in `model` emit its ONNX node for the duration of the block."""
    modules = [m for m in model.modules() if isinstance(m, EmittingModule)]
    for module in modules:
        module.emit_onnx = True
    try:
        yield
    finally:
        for module in modules:
            module.emit_onnx = False


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
    scale group, salient columns in float), so the graph can be checked against PyTorch to rounding noise.
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
        self._kernel_weights: tuple[torch.Tensor, Any, Any, Any, Any] | None = None
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
        if self.arithmetic == "kernel":
            return self._kernel_forward(x)
        return nn.functional.linear(x, self._dense_weight(), self.bias_eager)

    def _dense_weight(self) -> torch.Tensor:
        """W_hat: the model's weight, or (a model built without dense linears) decoded from the packed arrays
        for this call only, so a large model never holds every layer in fp32."""
        if not self.weight_hat.is_meta:
            return self.weight_hat
        from pbs2p_edge.format import unpack

        return torch.from_numpy(unpack(self.packed).dense())

    def _split_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(the binarized part mask*(alpha*s + mu), the salient residual part or None, both [rows, K], without
        the column scales; the column scales c [K] or None)."""
        from pbs2p_edge.format import unpack

        w = unpack(self.packed)
        group = np.arange(w.k) // w.group_size
        binary = w.mask * (w.alpha[:, group] * np.where(w.signs, 1.0, -1.0) + w.mu[:, group])
        residual = None
        if w.salient_cols is not None and w.salient_cols.size:
            residual = np.zeros((w.rows, w.k), dtype=np.float64)
            for g, cols in enumerate(w.salient_cols):
                signs = np.where(w.salient_signs[:, g, :], 1.0, -1.0)
                residual[:, cols] = w.mask[:, cols] * signs * w.alpha2[:, g : g + 1]
        as_tensor = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
        return (
            as_tensor(binary),
            None if residual is None else as_tensor(residual),
            None if w.col_scales is None else as_tensor(w.col_scales),
        )

    def _compact_kernel_weights(self) -> tuple[torch.Tensor, Any, Any, Any, Any]:
        """(binary or W_hat, salient columns, binary - W_hat on them, residual on them, column scales).

        The binarized part equals W_hat off the salient columns, so only those columns are kept beside W_hat
        (a large model would otherwise hold two more fp32 copies of every layer). When it does not (W_hat is
        not this packed weight's reconstruction, or column scales multiply it), the full binarized matrix is
        kept instead.
        """
        binary, residual, col_scales = self._split_weights()
        if col_scales is not None:
            return binary, None, None, residual, col_scales
        if residual is None:
            cols = torch.zeros(0, dtype=torch.long)
        else:
            cols = torch.nonzero(residual.abs().sum(dim=0) > 0).flatten()
        outside = torch.ones(self.in_features, dtype=torch.bool)
        outside[cols] = False
        if self.weight_hat.shape != binary.shape or not torch.equal(
            self.weight_hat[:, outside], binary[:, outside]
        ):
            return binary, None, None, residual, None
        if cols.numel() == 0:
            return self.weight_hat, None, None, None, None
        delta = binary[:, cols] - self.weight_hat[:, cols]
        return self.weight_hat, cols, delta.contiguous(), residual[:, cols].contiguous(), None

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from pbs2p_edge.format.packed import ACT_MAX
        from pbs2p_edge.format.reference import chunk_bounds

        if self.weight_hat.is_meta:  # no dense weights held: decode for this call only
            binary, residual, col_scales = self._split_weights()
            cols, delta = None, None
        else:
            if self._kernel_weights is None:
                self._kernel_weights = self._compact_kernel_weights()
            binary, cols, delta, residual, col_scales = self._kernel_weights
        flat = x.reshape(-1, self.in_features).float()
        if col_scales is not None:  # y = W_hat_v1 @ (x * c), scaled before the int7 quantization
            flat = flat * col_scales
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
        y = xq @ binary.T
        if delta is not None:
            y = y + xq[:, cols] @ delta.T
        if residual is not None:
            y = y + (flat if cols is None else flat[:, cols]) @ residual.T
        if self.bias_eager is not None:
            y = y + self.bias_eager
        return y.reshape(*x.shape[:-1], self.out_features)


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
