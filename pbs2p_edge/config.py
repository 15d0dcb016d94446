"""PBS2PConfig: every knob of the compression, validated once on construction (no torch).

The methods share one code path and differ only in the config:
- `pbs2p`: stepwise N:M pruning with re-binarization (SPBO) + coarse-to-fine per-layer N search (CFS);
- `naive`: the same metric and binarizer, but the N:M mask is applied in one shot and every layer gets N;
- `binarize_only`: no pruning at all, stored as N = M (an all-ones mask).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from pbs2p_edge.cpu import native_bf16
from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.families import SUPPORTED_MODEL_TYPES as _FAMILY_TYPES
from pbs2p_edge.format.packed import SUPPORTED_M

METHODS = ("pbs2p", "naive", "binarize_only")
# Decoder-only families we compress and export (pbs2p_edge/families.py).
SUPPORTED_MODEL_TYPES = _FAMILY_TYPES
PRUNE_METRICS = ("obs", "magnitude")
# Block-wise recovery targets: the FP layer applied to the compressed model's inputs, or the FP model's own states.
RECOVER_TARGETS = ("compressed_inputs", "fp_states")
# Learning-rate schedules of the end-to-end pass: constant, or cosine decay to 0 over the planned steps.
E2E_SCHEDULES = ("constant", "cosine")
# The heads the end-to-end pass can train through (compress/head.py): the checkpoint's own float weights, or
# the default bundle's int4 (MatMulNBits head + GatherBlockQuantized embedding, shared when tied).
E2E_HEADS = ("float", "int4")
# Compute precision of the end-to-end pass's steps: float32, or bfloat16 autocast (measured faster on a CPU
# with native bf16 dot products, e.g. AVX512_BF16 / AMX; the keep-or-revert check and the teacher stay float32).
# "auto" (the default) resolves on construction to bfloat16 where the CPU has native bf16 (`cpu.native_bf16`),
# else float32; the checkpoint records the resolved value.
E2E_DTYPES = ("float32", "bfloat16")
E2E_DTYPE_AUTO = "auto"
# Defaults of the recovery and budget stages (docs/METHOD.md). Recovery is budgeted in optimizer steps, so
# the same command gives the same model on a busy or an idle machine: with `recover_steps` None each decoder
# layer gets RECOVER_STEPS_PER_LAYER Adam steps while the model has at most RECOVER_FULL_WEIGHTS compressed
# weights (SmolLM2-135M's 106 M), and proportionally fewer above (a step costs in proportion to the layer's
# size, so the total work stays capped at the default model's). With `budget_bits` None the budget is
# DEFAULT_BUDGET_BITS when the pattern stores less, else nothing is spent.
RECOVER_STEPS_PER_LAYER = 120
RECOVER_FULL_WEIGHTS = 106e6
# The end-to-end pass: with `e2e_steps` None it runs E2E_STEPS Adam steps (one pass over 1024 calibration
# windows at 2 per step, lr 2e-3, through the int4 head the bundle deploys: bench/results/e2e.md, chosen on
# held-out calibration-split KL) up to RECOVER_FULL_WEIGHTS, proportionally fewer above (at least 1); the
# low-memory path runs it too where its predicted memory is available, over windows each seen once (its
# teacher costs per window), and skips it with the reason elsewhere (compress/cli.py). Never fewer than
# E2E_MIN_STEPS: at 1.5B the scaled count (41) left perplexity at 32.6, and 88 more steps took it to 27.5
# (bench/results/e2e-qwen1.5b-s13.md) for ~25 min more on 2 cores (docs/METHOD.md "Session 13").
E2E_STEPS = 512
E2E_MIN_STEPS = 128
# The share of the end-to-end windows that are chat-formatted (sources.chat_calibration_ids), by default when
# the tokenizer has a chat template and the calibration text is the built-in corpus (docs/METHOD.md "Session 8").
E2E_CHAT = 0.25
MAX_STEPS = 1_000_000
DEFAULT_BUDGET_BITS = 2.5
# Block binarizers (compress/blockq.py); kept in sync with blockq.BINARIZERS (no torch import here).
BINARIZERS = ("arb", "arbx", "arbrc", "arbrcx")
_NM_PATTERN = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


def default_e2e_dtype() -> str:
    """bfloat16 where the CPU computes bf16 dot products natively (the E2E steps ran 1.57x faster at the same
    quality there: docs/METHOD.md "Session 8"), else float32 (emulated bf16 is expected to be slower)."""
    return "bfloat16" if native_bf16() else "float32"


def parse_nm(text: str) -> tuple[int, int]:
    """Parse and check "N:M" (kept N of every M consecutive weights): 1 <= N <= M."""
    match = _NM_PATTERN.match(str(text))
    if match is None:
        raise Pbs2pError(f"invalid N:M {text!r}: expected two integers like 6:8")
    n, m = int(match.group(1)), int(match.group(2))
    _check_nm(n, m, f"{n}:{m}")
    return n, m


def _check_nm(n: int, m: int, label: str) -> None:
    if m < 1:
        raise Pbs2pError(f"invalid N:M {label}: M must be at least 1")
    if not 1 <= n <= m:
        raise Pbs2pError(f"invalid N:M {label}: N must be between 1 and M ({m})")


@dataclass
class PBS2PConfig:
    """Compression settings. `None` fields are resolved from `method` in `__post_init__`."""

    n: int = 6
    m: int = 8
    method: str = "pbs2p"
    # SPBO: pruning steps per layer (None: M - N of that layer, one pruned weight per group of M per step).
    steps: int | None = None
    # Pruning metric: "obs" = w^2 / [U]_jj^2 (Hessian), "magnitude" = w^2.
    prune_metric: str = "obs"
    # SPBO: choose each step's weights by their extra error over the current binarization (True), or fix the
    # order up front from the metric (False).
    rescore: bool = True
    # Columns per scale group, also the GPTQ block width.
    group_size: int = 128
    arb_iters: int = 15
    # Block binarizer (docs/METHOD.md): "arb" alpha, mu per row; "arbx" the same refitted against the block's
    # GPTQ error; "arbrc" row x column scales; "arbrcx" RC refitted against the GPTQ error.
    binarizer: str = "arbx"
    # RC binarizers: also keep a per-row mean mu (W ~ c_j (alpha_r b + mu_r)).
    rc_mu: bool = False
    # X binarizers: alternations of (GPTQ sweep -> signs, closed-form parameters for those signs).
    x_iters: int = 2
    # Salient columns per group with a second-order residual sign plane (0 = off). One column per group
    # costs ~0.15 bits/weight and keeps SmolLM2-135M out of collapse (docs/METHOD.md, salient columns).
    # With `salient_search` this is the largest S tried; S is then chosen per layer.
    salient: int = 1
    # Salient search: per layer, the S in 0..salient minimizing log2(GPTQ loss) + salient_rate * bits/weight.
    salient_search: bool = False
    salient_rate: float = 2.0
    calib_samples: int = 32
    calib_len: int = 256
    damping: float = 0.01
    seed: int = 0
    # CFS: coarse per-layer N from layer importance (None: on for pbs2p, off otherwise).
    cfs: bool | None = None
    cfs_delta: float = 4.0
    cfs_n_low: int | None = None
    cfs_n_high: int | None = None
    # CFS search budget: calibration sequences used for the layer-importance pass.
    cfs_samples: int = 16
    # Calibration sequences per forward batch (memory only, does not change the result).
    batch_size: int = 8
    # Recovery (compress/recover.py): block-wise Adam steps per decoder layer (0 = off, None = scaled to the
    # model, see RECOVER_STEPS_PER_LAYER), an optional wall-time cap in seconds over all layers (None = no
    # cap, 0 = off), its target, learning rate (relative to each tensor's mean |value|) and sequences per step.
    recover_steps: int | None = None
    recover_seconds: float | None = None
    recover_target: str = "compressed_inputs"
    recover_lr: float = 5e-3
    recover_micro_batch: int = 1
    # End-to-end recovery on the top-k KL to the FP model's log-probs: Adam steps over the whole model (0 =
    # off, None = scaled to the model, see E2E_STEPS) and an optional wall-time cap in seconds (None = no cap,
    # 0 = off).
    e2e_steps: int | None = None
    e2e_seconds: float | None = None
    e2e_lr: float = 2e-3
    e2e_micro_batch: int = 2
    e2e_topk: int = 64
    # Calibration windows the end-to-end pass trains on (the same seed and length as the block stages' windows,
    # which are its first `calib_samples` when it has at least as many), and its learning-rate schedule.
    e2e_samples: int = 1024
    e2e_schedule: str = "constant"
    # The head it trains through: the float weights, or the int4 head the default bundle computes with.
    e2e_head: str = "int4"
    # The share of those windows that are chat-formatted conversations (None: E2E_CHAT when the tokenizer has a
    # chat template and no calibration text file is given, else 0; see `e2e_chat_share`).
    e2e_chat: float | None = None
    # A JSONL conversations file (`conversations.py`) whose conversations fill those windows instead of the
    # built-in questions answered by article intros (e.g. `pbs2p-edge replies`: the FP model's own replies).
    e2e_chat_file: str | None = None
    # The precision its steps compute in (E2E_DTYPES, or E2E_DTYPE_AUTO: chosen by the CPU), and the precision
    # of the teacher's forward that makes its targets (the same choices; bf16 autocast: 1.6-1.8x faster per
    # window at a top-k KL of 0.0003-0.0006 to the float32 targets, bench/results/teacher-dtype-*.md).
    e2e_dtype: str = E2E_DTYPE_AUTO
    e2e_teacher_dtype: str = E2E_DTYPE_AUTO
    # Bit budget (compress/budget.py): honest bits/weight over the compressed linears to spend (None =
    # DEFAULT_BUDGET_BITS if the pattern fits under it; a given value below the pattern is an error); `budget`
    # False turns the stage off; calibration sequences x tokens of the per-layer sensitivity probe.
    budget: bool = True
    budget_bits: float | None = None
    budget_probe_samples: int = 2
    budget_probe_len: int = 128

    @classmethod
    def from_nm(cls, nm: str, **kwargs: Any) -> PBS2PConfig:
        n, m = parse_nm(nm)
        return cls(n=n, m=m, **kwargs)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise Pbs2pError(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        _check_nm(self.n, self.m, f"{self.n}:{self.m}")
        if self.m not in SUPPORTED_M:
            raise Pbs2pError(f"M={self.m} is not supported by the packed format (supported: {SUPPORTED_M})")
        if self.method == "binarize_only":
            self.n = self.m
        elif self.n == self.m:
            raise Pbs2pError(f"method {self.method} needs N < M (got {self.n}:{self.m}); use binarize_only")
        if self.prune_metric not in PRUNE_METRICS:
            raise Pbs2pError(
                f"unknown prune metric {self.prune_metric!r} (choose from {', '.join(PRUNE_METRICS)})"
            )
        if self.group_size < self.m or self.group_size % self.m:
            raise Pbs2pError(f"group size {self.group_size} must be a positive multiple of M ({self.m})")
        if self.binarizer not in BINARIZERS:
            raise Pbs2pError(f"unknown binarizer {self.binarizer!r} (choose from {', '.join(BINARIZERS)})")
        if self.rc_mu and self.binarizer not in ("arbrc", "arbrcx"):
            raise Pbs2pError(f"rc_mu applies to the RC binarizers only (binarizer is {self.binarizer})")
        if self.salient_search and self.salient < 1:
            raise Pbs2pError("salient search needs a largest S of at least 1")
        if not 0 <= self.salient_rate <= 64:
            raise Pbs2pError(f"salient rate must be in [0, 64] (got {self.salient_rate})")
        _positive(self, "arb_iters", "x_iters", "calib_samples", "calib_len", "cfs_samples", "batch_size")
        if self.salient < 0 or self.salient > self.group_size // 2:
            raise Pbs2pError(f"salient columns per group must be between 0 and {self.group_size // 2}")
        if not 0 < self.damping < 10:
            raise Pbs2pError(f"damping must be in (0, 10) (got {self.damping})")
        if self.seed < 0:
            raise Pbs2pError(f"seed must be >= 0 (got {self.seed})")
        self._check_recovery()
        self._resolve_steps()
        self._resolve_cfs()

    def _check_recovery(self) -> None:
        if self.e2e_schedule not in E2E_SCHEDULES:
            raise Pbs2pError(
                f"unknown --e2e-schedule {self.e2e_schedule!r} (choose from {', '.join(E2E_SCHEDULES)})"
            )
        if self.e2e_head not in E2E_HEADS:
            raise Pbs2pError(f"unknown --e2e-head {self.e2e_head!r} (choose from {', '.join(E2E_HEADS)})")
        for name in ("e2e_dtype", "e2e_teacher_dtype"):
            if getattr(self, name) == E2E_DTYPE_AUTO:
                setattr(self, name, default_e2e_dtype())
            if getattr(self, name) not in E2E_DTYPES:
                choices = ", ".join((E2E_DTYPE_AUTO, *E2E_DTYPES))
                option = "--" + name.replace("_", "-")
                raise Pbs2pError(f"unknown {option} {getattr(self, name)!r} (choose from {choices})")
        if self.e2e_chat is not None and not (
            isinstance(self.e2e_chat, (int, float))
            and not isinstance(self.e2e_chat, bool)
            and 0 <= self.e2e_chat <= 1
        ):
            raise Pbs2pError(f"--e2e-chat must be a share in [0, 1] (got {self.e2e_chat!r})")
        if self.recover_target not in RECOVER_TARGETS:
            raise Pbs2pError(
                f"unknown recovery target {self.recover_target!r} (choose from {', '.join(RECOVER_TARGETS)})"
            )
        for name in ("recover_seconds", "e2e_seconds"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e6:
                raise Pbs2pError(f"{name.replace('_', ' ')} must be >= 0 (got {value!r})")
        for name in ("recover_steps", "e2e_steps"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STEPS:
                raise Pbs2pError(
                    f"{name.replace('_', ' ')} must be an integer in [0, {MAX_STEPS}] (got {value!r})"
                )
        for name in ("recover_lr", "e2e_lr"):
            if not 0 < getattr(self, name) < 1:
                raise Pbs2pError(f"{name.replace('_', ' ')} must be in (0, 1) (got {getattr(self, name)})")
        _positive(
            self,
            "recover_micro_batch",
            "e2e_micro_batch",
            "e2e_topk",
            "e2e_samples",
            "budget_probe_samples",
            "budget_probe_len",
        )
        if self.budget_bits is not None and not 0 < self.budget_bits <= 32:
            raise Pbs2pError(f"budget bits must be in (0, 32] bits per weight (got {self.budget_bits})")

    def _resolve_steps(self) -> None:
        pruned = self.m - self.n
        if self.method != "pbs2p":
            if self.steps not in (None, 1):
                raise Pbs2pError(f"steps apply to method pbs2p only ({self.method} prunes in one shot)")
            self.steps = 1
        elif self.steps is not None and not 1 <= self.steps <= pruned:
            raise Pbs2pError(f"steps must be between 1 and M - N = {pruned} (got {self.steps})")

    def _resolve_cfs(self) -> None:
        if self.cfs is None:
            self.cfs = self.method == "pbs2p"
        if self.cfs and self.method == "binarize_only":
            raise Pbs2pError("CFS allocates sparsity and binarize_only has none: drop --cfs")
        if self.cfs_n_low is None:
            self.cfs_n_low = max(1, self.n - 1)
        if self.cfs_n_high is None:
            self.cfs_n_high = min(self.m, self.n + 1)
        if not 1 <= self.cfs_n_low <= self.n <= self.cfs_n_high <= self.m:
            raise Pbs2pError(
                f"CFS bounds must satisfy 1 <= N_low <= N <= N_high <= M "
                f"(got {self.cfs_n_low} <= {self.n} <= {self.cfs_n_high} <= {self.m})"
            )
        if self.cfs_delta < 0:
            raise Pbs2pError(f"CFS delta must be >= 0 (got {self.cfs_delta})")

    def recover_steps_for(self, weights: int) -> int:
        """Block-wise recovery steps per decoder layer for a model with `weights` compressed weights (0 = off)."""
        if self.recover_steps == 0 or self.recover_seconds == 0:
            return 0
        if self.recover_steps is not None:
            return self.recover_steps
        return max(1, round(RECOVER_STEPS_PER_LAYER * min(1.0, RECOVER_FULL_WEIGHTS / max(weights, 1))))

    def e2e_chat_share(self, chat_template: bool, builtin_corpus: bool) -> float:
        """The share of chat-formatted end-to-end windows for a tokenizer with or without a chat template."""
        if self.e2e_chat_file is not None and not chat_template:
            raise Pbs2pError("--e2e-chat-file needs a tokenizer with a chat template; this model's has none")
        if self.e2e_chat is None:
            own_windows = builtin_corpus or self.e2e_chat_file is not None
            return E2E_CHAT if chat_template and own_windows else 0.0
        if self.e2e_chat > 0 and not chat_template:
            raise Pbs2pError("--e2e-chat needs a tokenizer with a chat template; this model's has none")
        if self.e2e_chat == 0 and self.e2e_chat_file is not None:
            raise Pbs2pError("--e2e-chat-file fills the chat-formatted windows, but --e2e-chat is 0")
        return float(self.e2e_chat)

    def e2e_steps_for(self, weights: int) -> int:
        """End-to-end recovery steps for a model with `weights` compressed weights (0 = off)."""
        if self.e2e_steps == 0 or self.e2e_seconds == 0:
            return 0
        if self.e2e_steps is not None:
            return self.e2e_steps
        if E2E_STEPS == 0:
            return 0
        scaled = round(E2E_STEPS * min(1.0, RECOVER_FULL_WEIGHTS / max(weights, 1)))
        return max(min(E2E_STEPS, E2E_MIN_STEPS), scaled)

    def steps_for(self, n: int) -> int:
        """SPBO steps of a layer that keeps `n` of M (CFS may give layers different N)."""
        if self.method != "pbs2p" or n == self.m:
            return 1
        return self.m - n if self.steps is None else min(self.steps, self.m - n)

    @property
    def nm(self) -> str:
        return f"{self.n}:{self.m}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PBS2PConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise Pbs2pError(f"unknown compression config keys: {', '.join(unknown)}")
        return cls(**data)


def _positive(config: PBS2PConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise Pbs2pError(f"{name.replace('_', ' ')} must be a positive integer (got {value!r})")
