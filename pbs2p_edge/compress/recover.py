"""Recovery: tune the continuous parameters of compressed linears with signs and mask frozen.

W_hat = c[j] * mask * (alpha[r, g] s + mu[r, g] + [j salient] alpha2[r, g] s2)  (c = column scales, if any)

`TunableLinear` computes W_hat from the frozen int8 sign planes on the fly, in forward and again in backward
(a custom autograd function), so no W-sized tensor outlives one linear's forward or backward: the end-to-end
pass of a 1.5B model holds 1 byte per weight (sign * mask) instead of the fp32 weight. Parameters are stored
divided by a per-tensor reference scale so one Adam learning rate means a relative step for every tensor.

- `recover_layer`: one decoder layer, Adam on MSE(layer(x), target) for a number of steps (block-wise).
- `recover_e2e`: the whole model, Adam on the KL from the FP model's top-k log-probs (precomputed by
  `teacher_topk`, so no second model is held).
Both run a fixed number of optimizer steps (so the same command gives the same model on a busy or an idle
machine); an optional wall-time cap in seconds stops them earlier. Both keep the tuned values only if the error on all calibration data went down, then round them to fp16 and
write them back into the SparseBinaryWeight (`write_back`), so checkpoint, eval and export see the same model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from pbs2p_edge.allocator import retained_heap
from pbs2p_edge.config import E2E_DTYPES, E2E_SCHEDULES

FP16_MAX = 65504.0


def _matmul_dtype() -> torch.dtype:
    """The dtype a matmul computes in here: autocast's (the bf16 end-to-end steps) or float32."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32


class _BinaryMatmul(torch.autograd.Function):
    """y = (x * c) @ W_base^T (+ b), W_base rebuilt from (sm, salient, scales) in forward and backward. The
    column scales c act on the activations (tokens x K) instead of the weight (rows x K)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: TunableLinear, *params: torch.Tensor) -> torch.Tensor:
        ctx.module = module
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return nn.functional.linear(
                module.scaled_input(x), module.base_weight(_matmul_dtype()), module.bias
            )

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:
        x, *params = ctx.saved_tensors
        module: TunableLinear = ctx.module
        with torch.no_grad():
            scaled = module.col_scales is not None
            grad_xs = None
            if ctx.needs_input_grad[0] or scaled:
                grad_xs = grad_y @ module.base_weight(_matmul_dtype())
            xs = module.scaled_input(x)
            grad_w = grad_y.reshape(-1, grad_y.shape[-1]).T @ xs.reshape(-1, xs.shape[-1])
            del xs
            grads = module.param_grads(grad_w)
            grad_x = None
            if scaled:
                c = module.col_scales * module.c_ref
                flat = (grad_xs.float() * x.float()).reshape(-1, x.shape[-1])
                grads[id(module.col_scales)] = flat.sum(0) * module.c_ref
                grad_x = grad_xs * c if ctx.needs_input_grad[0] else None
            elif ctx.needs_input_grad[0]:
                grad_x = grad_xs
        return (grad_x, None, *(grads[id(p)] for p in params))


class TunableLinear(nn.Module):
    """A compressed linear whose alpha, mu, alpha2 (and column scales) are trainable; signs and mask frozen.

    The frozen sign * mask plane is held as int8 [rows, G, group_size] (the last group zero-padded), so the
    per-group scales broadcast over it: W_base = sm * (alpha + mu * sm) (= alpha s + mu where kept, as sm^2
    is the mask) takes three passes over the weight and no gathers (bench: 4.7x a dense linear's step with
    gathers, docs/METHOD.md "Session 12")."""

    def __init__(self, weight: Any, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.k = weight.k
        self.groups = weight.groups
        padded = self.groups * weight.group_size
        mask = torch.from_numpy(np.asarray(weight.mask, dtype=bool))
        sm = torch.where(torch.from_numpy(np.asarray(weight.signs, dtype=bool)), 1, -1).to(torch.int8)
        sm = nn.functional.pad(sm * mask.to(torch.int8), (0, padded - self.k))
        self.register_buffer("sm", sm.reshape(weight.rows, self.groups, weight.group_size), persistent=False)
        alpha = torch.from_numpy(np.asarray(weight.alpha, dtype=np.float32)).half().float()
        self.ref = float(alpha.abs().mean().clamp_min(1e-8))
        self.alpha = nn.Parameter(alpha / self.ref)
        self.mu = nn.Parameter(
            torch.from_numpy(np.asarray(weight.mu, dtype=np.float32)).half().float() / self.ref
        )
        self.alpha2: nn.Parameter | None = None
        if weight.salient_cols is not None and weight.salient > 0:
            cols = torch.from_numpy(np.asarray(weight.salient_cols, dtype=np.int64)).reshape(-1)
            signs2 = torch.from_numpy(np.asarray(weight.salient_signs, dtype=bool)).reshape(weight.rows, -1)
            s2 = torch.where(signs2, 1, -1).to(torch.int8) * mask[:, cols].to(torch.int8)
            self.register_buffer("sal_cols", cols, persistent=False)
            self.register_buffer("sal_groups", cols // weight.group_size, persistent=False)
            self.register_buffer("s2", s2, persistent=False)
            a2 = torch.from_numpy(np.asarray(weight.alpha2, dtype=np.float32)).half().float()
            self.alpha2 = nn.Parameter(a2 / self.ref)
        self.col_scales: nn.Parameter | None = None
        self.c_ref = 1.0
        cs = getattr(weight, "col_scales", None)
        if cs is not None:
            c = torch.from_numpy(np.asarray(cs, dtype=np.float32)).half().float()
            self.c_ref = float(c.abs().mean().clamp_min(1e-8))
            self.col_scales = nn.Parameter(c / self.c_ref)
        self.bias = None if bias is None else bias.detach().clone()

    def tuned(self) -> list[nn.Parameter]:
        return [p for p in (self.alpha, self.mu, self.alpha2, self.col_scales) if p is not None]

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """mask * (alpha s + mu + salient term), without column scales, [rows, K]: computed in float32, the
        last multiply written in `dtype` (the one rounding a bf16 matmul would apply anyway). Values only:
        `_BinaryMatmul.backward` forms the gradients."""
        with torch.no_grad():
            return self._base_weight(dtype)

    def _base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        sm = self.sm.float()
        t = torch.addcmul((self.alpha * self.ref).unsqueeze(-1), (self.mu * self.ref).unsqueeze(-1), sm)
        t = t.reshape(self.sm.shape[0], -1)
        flat = sm.reshape(t.shape)
        if self.alpha2 is not None:  # sm * (t + a2 s2 sm) = sm t + a2 s2 where kept (s2 is 0 elsewhere)
            extra = (self.alpha2 * self.ref)[:, self.sal_groups] * self.s2.float() * flat[:, self.sal_cols]
            t[:, self.sal_cols] += extra
        w = torch.mul(t, flat, out=torch.empty(t.shape, dtype=dtype))
        return w[:, : self.k] if w.shape[1] != self.k else w

    def weight(self) -> torch.Tensor:
        w = self.base_weight()
        return w if self.col_scales is None else w * (self.col_scales * self.c_ref)[None, :]

    def scaled_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.col_scales is None else x * (self.col_scales * self.c_ref)

    def param_grads(self, grad_w: torch.Tensor) -> dict[int, torch.Tensor]:
        """Gradients of alpha, mu and alpha2 from the gradient of W_base [rows, K]."""
        grads: dict[int, torch.Tensor] = {}
        rows, groups, size = self.sm.shape
        if grad_w.shape[1] != groups * size:
            grad_w = nn.functional.pad(grad_w, (0, groups * size - grad_w.shape[1]))
        sm = self.sm.float()
        t = grad_w.reshape(rows, groups, size) * sm  # grad * s where kept
        grads[id(self.alpha)] = t.sum(-1) * self.ref
        grads[id(self.mu)] = t.mul_(sm).sum(-1) * self.ref  # grad where kept
        if self.alpha2 is not None:
            g2 = grad_w[:, self.sal_cols].float() * self.s2.float()
            grads[id(self.alpha2)] = torch.zeros(rows, groups).index_add(1, self.sal_groups, g2) * self.ref
        return grads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BinaryMatmul.apply(x, self, *self.tuned())

    def write_back(self, weight: Any) -> None:
        """Round the tuned values to fp16 and store them in the SparseBinaryWeight `weight`."""
        weight.alpha = _fp16_values(self.alpha * self.ref)
        weight.mu = _fp16_values(self.mu * self.ref)
        if self.alpha2 is not None:
            weight.alpha2 = _fp16_values(self.alpha2 * self.ref)
        if self.col_scales is not None:
            weight.col_scales = _fp16_values(self.col_scales * self.c_ref)


def _fp16_values(t: torch.Tensor) -> np.ndarray:
    values = t.detach().float().clamp(-FP16_MAX, FP16_MAX).numpy()
    return values.astype(np.float16).astype(np.float32)


class _Swap:
    """Replace named nn.Linear submodules of `root` by TunableLinears; `restore` writes back and undoes it."""

    def __init__(self, root: nn.Module, weights: dict[str, Any], free_dense: bool = False) -> None:
        """`free_dense`: drop the dense W_hat of the swapped linears while tuning (rebuilt by `restore`), so
        a whole model holds 1 byte per compressed weight instead of 4."""
        self.root = root
        self.weights = weights
        self.originals: dict[str, nn.Module] = {}
        self.tunables: dict[str, TunableLinear] = {}
        self.saved = {
            name: (w.alpha, w.mu, w.alpha2, getattr(w, "col_scales", None)) for name, w in weights.items()
        }
        for name, w in weights.items():
            linear = root.get_submodule(name)
            self.originals[name] = linear
            self.tunables[name] = TunableLinear(w, linear.bias)
            _set(root, name, self.tunables[name])
            if free_dense:
                linear.weight.data = torch.empty(0, dtype=linear.weight.dtype)

    def params(self) -> list[nn.Parameter]:
        return [p for t in self.tunables.values() for p in t.tuned()]

    def restore(self, write: bool) -> None:
        """Put the linears back with W_hat = dense() of their weights (tuned values first if `write`)."""
        for name, linear in self.originals.items():
            if write:
                self.tunables[name].write_back(self.weights[name])
            w_hat = torch.from_numpy(self.weights[name].dense()).to(linear.weight.dtype)
            linear.weight.data = w_hat
            _set(self.root, name, linear)


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class _Norms:
    """RMSNorm weights made trainable in relative units (w = w0 * p, p starts at 1)."""

    def __init__(self, norms: Iterable[nn.Module]) -> None:
        self.norms = list(norms)
        self.originals = [n.weight.detach().clone() for n in self.norms]
        self.scales = [nn.Parameter(torch.ones_like(w)) for w in self.originals]
        self.handles = [n.register_forward_pre_hook(self._hook(i)) for i, n in enumerate(self.norms)]

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, _args: Any) -> None:
            module.weight = self.originals[i] * self.scales[i]  # type: ignore[assignment]

        return hook

    def prepare(self) -> None:
        for n in self.norms:
            w = n.weight
            del n.weight
            n.weight = w.detach()  # a plain tensor attribute while tuning (the hook overwrites it)

    def restore(self) -> None:
        for h in self.handles:
            h.remove()
        for n, w0, s in zip(self.norms, self.originals, self.scales, strict=True):
            value = (w0 * s).detach()
            del n.weight
            n.weight = nn.Parameter(value, requires_grad=False)


def _revert(swap: _Swap, norms: _Norms) -> None:
    """Put back the scales and norm weights recovery started from (used when tuning did not lower the error)."""
    for name, module in swap.originals.items():
        w = swap.weights[name]
        w.alpha, w.mu, w.alpha2, saved = swap.saved[name]
        if saved is not None:
            w.col_scales = saved
        module.weight.data.copy_(torch.from_numpy(w.dense()).to(module.weight.dtype))
    for n, w0 in zip(norms.norms, norms.originals, strict=True):
        n.weight.data.copy_(w0)


def _slice_kwargs(kwargs: dict[str, Any], batch: int, lo: int, hi: int) -> dict[str, Any]:
    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch and batch > 1:
            return v[lo:hi]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return {key: cut(value) for key, value in kwargs.items()}


def micro_batches(
    chunks: list[tuple[torch.Tensor, dict[str, Any]]], targets: list[torch.Tensor], size: int
) -> list[tuple[torch.Tensor, dict[str, Any], torch.Tensor]]:
    out = []
    for (hidden, kwargs), target in zip(chunks, targets, strict=True):
        b = hidden.shape[0]
        for lo in range(0, b, size):
            hi = min(lo + size, b)
            out.append((hidden[lo:hi], _slice_kwargs(kwargs, b, lo, hi), target[lo:hi]))
    return out


def _layer_out(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def layer_outputs(
    layer: nn.Module, chunks: list[tuple[torch.Tensor, dict[str, Any]]], targets: list[torch.Tensor]
) -> tuple[list[torch.Tensor], float]:
    """(layer outputs per chunk, ||layer(x) - target||^2 / ||target - x||^2 over all chunks): the error
    relative to the layer's update of the residual stream."""
    num = den = 0.0
    outs = []
    with torch.no_grad():
        for (hidden, kwargs), target in zip(chunks, targets, strict=True):
            out = _layer_out(layer, hidden, kwargs)
            num += float((out - target).square().sum())
            den += float((target - hidden).square().sum())
            outs.append(out)
    return outs, num / max(den, 1e-30)


def layer_error(
    layer: nn.Module, chunks: list[tuple[torch.Tensor, dict[str, Any]]], targets: list[torch.Tensor]
) -> float:
    return layer_outputs(layer, chunks, targets)[1]


class _Budget:
    """A step budget with an optional wall-time cap: `more()` is True until `steps` are done or, after at
    least one step, `seconds` of wall time have passed since construction (then `capped` is True)."""

    def __init__(self, steps: int, seconds: float | None) -> None:
        if steps < 1:
            raise ValueError(f"a recovery budget needs at least one step (got {steps})")
        self.steps = steps
        self.deadline = None if seconds is None else time.perf_counter() + seconds
        self.done = 0
        self.capped = False

    def more(self) -> bool:
        if self.done >= self.steps:
            return False
        if self.done > 0 and self.deadline is not None and time.perf_counter() >= self.deadline:
            self.capped = True
            return False
        return True


def _batch_order(n: int, seed: int, clock: _Budget) -> Iterable[int]:
    """Batch indices, a fresh seeded permutation per epoch, for as long as the budget lasts."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        for i in torch.randperm(n, generator=generator).tolist():
            if not clock.more():
                return
            yield i


def recover_layer(
    layer: nn.Module,
    weights: dict[str, Any],
    chunks: list[tuple[torch.Tensor, dict[str, Any]]],
    targets: list[torch.Tensor],
    steps: int,
    lr: float,
    micro_batch: int,
    seed: int = 0,
    seconds: float | None = None,
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Tune `layer`'s compressed linears (`weights`: submodule name -> SparseBinaryWeight) and its RMSNorm
    weights with `steps` Adam steps on MSE(layer(x), target) (fewer if the optional wall-time cap `seconds`
    runs out first; at least one). Keeps the result only if the error over all chunks went down. Returns
    ({before, after, steps, kept, seconds, capped}, the layer's outputs per chunk as stored, i.e. the next
    layer's inputs)."""
    t0 = time.perf_counter()
    outs_before, before = layer_outputs(layer, chunks, targets)
    swap = _Swap(layer, weights)
    norms = _Norms(m for name, m in layer.named_modules() if name.endswith("layernorm"))
    norms.prepare()
    batches = micro_batches(chunks, targets, micro_batch)
    opt = torch.optim.Adam(swap.params() + norms.scales, lr=lr)
    clock = _Budget(steps, seconds)
    # the steps' weight-sized temporaries reuse heap pages (allocator.py); released after the loop
    with torch.enable_grad(), retained_heap():
        for i in _batch_order(len(batches), seed, clock):
            hidden, kwargs, target = batches[i]
            out = _layer_out(layer, hidden, kwargs)
            loss = (out - target).square().mean() / (target - hidden).square().mean().clamp_min(1e-30)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            clock.done += 1
    norms.restore()
    swap.restore(write=True)  # fp16-rounded tuned values, exactly what is stored
    outs, after = layer_outputs(layer, chunks, targets)
    kept = after < before
    if not kept:
        _revert(swap, norms)
        outs, after = outs_before, before
    return _stats(before, after, kept, clock, t0), outs


def teacher_topk(
    model: nn.Module,
    calib_ids: torch.Tensor,
    k: int,
    batch_size: int,
    progress: bool = False,
    dtype: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    # (batch_size sequences at a time: the full-vocabulary logits of one batch are the peak)
    """The FP model's top-k log-probabilities and their token ids per calibration position (fp16 / int32);
    `dtype` "bfloat16" runs its matmuls under bf16 autocast (`teacher_autocast`); `progress` shows a bar
    over the windows (minutes on the default model's 1024)."""
    from tqdm.auto import tqdm

    values, indices = [], []
    with (
        torch.no_grad(),
        teacher_autocast(dtype),
        tqdm(total=calib_ids.shape[0], desc="teacher top-k", unit="window", disable=not progress) as bar,
    ):
        for batch in calib_ids.split(batch_size):
            bar.update(batch.shape[0])
            top = topk_logprobs(model(input_ids=batch, use_cache=False).logits, k)
            values.append(top[0])
            indices.append(top[1])
    return torch.cat(values), torch.cat(indices)


def teacher_autocast(dtype: str) -> torch.autocast:
    """bf16 autocast for the teacher's forward when `dtype` is "bfloat16" (matmuls in bf16 with fp32
    accumulation, norms and softmax in fp32; bench/teacher_dtype.py measures what it changes), else off."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k log-probabilities (fp16) and token ids (int32) of each position's logits."""
    top = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return top.values.half(), top.indices.int()


def _kl_topk(logits: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) restricted to the teacher's top-k tokens, mean over positions."""
    s_logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, t_idx.long())
    t = t_logp.float()
    return (t.exp() * (t - s_logp)).sum(-1).mean()


def recover_e2e(
    model: nn.Module,
    weights: dict[str, Any],
    calib_ids: torch.Tensor,
    teacher: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    lr: float,
    micro_batch: int,
    seed: int = 0,
    seconds: float | None = None,
    progress: Callable[[int], None] | None = None,
    schedule: str = "constant",
    check_samples: int | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Tune every compressed linear's scales and every RMSNorm (incl. the final norm) with `steps` Adam
    steps on the top-k KL to the FP model's log-probs (fewer if the optional wall-time cap `seconds` runs out
    first), at a constant learning rate or one decaying to 0 on a cosine over the `steps`. Kept only if the KL
    over the first `check_samples` windows (None: all) fell. `progress` gets the steps done so far."""
    if schedule not in E2E_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    if dtype not in E2E_DTYPES:
        raise ValueError(f"unknown end-to-end dtype {dtype!r}")
    t0 = time.perf_counter()
    t_logp, t_idx = teacher
    n_check = calib_ids.shape[0] if check_samples is None else min(check_samples, calib_ids.shape[0])
    check = (calib_ids[:n_check], (t_logp[:n_check], t_idx[:n_check]))

    def total_kl() -> float:
        return mean_topk_kl(model, *check, micro_batch)

    before = total_kl()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # no gradients for the embedding/head or anything not tuned
    swap = _Swap(model, weights, free_dense=True)
    norms = _Norms(m for name, m in model.named_modules() if name.endswith("norm") and hasattr(m, "weight"))
    norms.prepare()
    opt = torch.optim.Adam(swap.params() + norms.scales, lr=lr)
    starts = list(range(0, calib_ids.shape[0], micro_batch))
    clock = _Budget(steps, seconds)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    with torch.enable_grad(), autocast, retained_heap():  # as in recover_layer
        for i in _batch_order(len(starts), seed, clock):
            if schedule == "cosine":
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * clock.done / steps))
            lo = starts[i]
            hi = lo + micro_batch
            logits = model(input_ids=calib_ids[lo:hi], use_cache=False).logits
            loss = _kl_topk(logits, t_logp[lo:hi], t_idx[lo:hi])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            clock.done += 1
            if progress is not None:
                progress(clock.done)
    norms.restore()
    swap.restore(write=True)
    after = total_kl()
    kept = after < before
    if not kept:
        _revert(swap, norms)
        after = before
    return _stats(before, after, kept, clock, t0)


def mean_topk_kl(
    model: nn.Module, ids: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor], micro_batch: int
) -> float:
    """Mean top-k KL(FP || model) over the windows `ids` (`teacher`: their top-k log-probs from
    `teacher_topk`), what the end-to-end pass minimizes; no gradients."""
    t_logp, t_idx = teacher
    total = 0.0
    with torch.no_grad():
        for lo in range(0, ids.shape[0], micro_batch):
            hi = min(lo + micro_batch, ids.shape[0])
            logits = model(input_ids=ids[lo:hi], use_cache=False).logits
            total += float(_kl_topk(logits, t_logp[lo:hi], t_idx[lo:hi])) * (hi - lo)
    return total / ids.shape[0]


def _stats(before: float, after: float, kept: bool, clock: _Budget, t0: float) -> dict[str, Any]:
    """What one recovery stage reports: the error before and after, the steps run, and whether it was kept."""
    return {
        "before": before,
        "after": after,
        "steps": clock.done,
        "kept": kept,
        "seconds": time.perf_counter() - t0,
        "capped": clock.capped,
    }
