"""One onnxruntime session over a bundle's decoder graph, with the KV cache kept as OrtValues.

The graph (docs/ARCHITECTURE.md §3) takes `past_key_values.{i}.key|value [1, kv_heads, P, head_dim]` and returns
`present.{i}.key|value [1, kv_heads, P+S, head_dim]`. The presents come back as onnxruntime-owned OrtValues
(`run_with_ort_values`) and are fed straight back as the next step's past: Python never converts or copies the
cache. (IO binding does the same but costs ~120 bind calls per step, 1.1 ms against 0.25 ms here for a 30-layer
model. The graph's own Concat still writes P+S rows per layer per step; that copy lives in the exported graph.)

A fused graph (export/fused.py; it has a `logits_to_keep` input) takes fixed-length buffers instead:
`past_key_values.{i}` and `present.{i}` are bound (IO binding, once per buffer) to the same numpy-backed memory,
which GroupQueryAttention extends in place; the buffers grow by doubling (copying the valid rows) when a
sequence outgrows them, up to the context. Only input_ids, attention_mask and logits_to_keep are bound per
run, and a decode step asks for the last row of logits only, written into one buffer the session keeps.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.runtime.bundle import Bundle
from pbs2p_edge.runtime.memory import collapse_to_huge_pages, release_file_pages, resident_huge_blocks

DEFAULT_PREFILL_CHUNK: int | None = None  # tokens per prefill run; None = the whole prompt in one run
LOGITS_TO_KEEP = "logits_to_keep"  # the fused graph's optional input (0 = all rows, 1 = the last)
KV_BUFFER_STEP = 256  # fused graphs: buffer lengths are multiples of this many tokens
# A tied int4 head is also the embedding's gather table through a Reshape of the same initializer; constant
# folding turns that view into a second resident copy (111 MiB at Qwen2.5-1.5B, RSS / budget 1.07 -> 0.95 without
# it, decode speed unchanged within the noise: README, large-model section). The fused graph (export/fused.py)
# has no other constant subgraph; unfused graphs keep the folding.
DISABLED_OPTIMIZERS = ["ConstantFolding"]
# "1": after load, move the weights onto transparent huge pages (runtime/memory.py: collapse_to_huge_pages).
# Off by default: decode +3-4% on average, load +1-1.5 s at 1.5B (README, "Session 19: huge pages"; bench/huge_pages.py).
HUGE_PAGES_ENV = "PBS2P_EDGE_HUGE_PAGES"
_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def huge_pages_requested() -> bool:
    """Whether $PBS2P_EDGE_HUGE_PAGES asks for huge pages ("1"; unset or "0": no)."""
    value = os.environ.get(HUGE_PAGES_ENV, "0")
    if value not in ("0", "1"):
        raise Pbs2pError(f"${HUGE_PAGES_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def session_options(
    bundle: Bundle, threads: int | None = None, profile_prefix: str | os.PathLike | None = None
) -> ort.SessionOptions:
    """Session options: thread count, sequential execution, full graph optimisation, the bundle's ops library."""
    options = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise Pbs2pError(f"--threads must be at least 1, got {threads}")
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: warnings about unused initializers are noise to a user
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    if bundle.ops_library is not None:
        try:
            options.register_custom_ops_library(str(bundle.ops_library))
        except Exception as exc:  # onnxruntime raises a bare RuntimeError/Fail
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise Pbs2pError(f"cannot load the ops library {bundle.ops_library}: {first}") from None
    return options


class DecoderSession:
    """Prefill and decode steps for batch size 1; the cache grows by one step's tokens per call."""

    def __init__(
        self,
        bundle: Bundle,
        threads: int | None = None,
        profile_prefix: str | os.PathLike | None = None,
        prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
        release_pages: bool = True,
        huge_pages: bool | None = None,
    ) -> None:
        if prefill_chunk is not None and prefill_chunk < 1:
            raise Pbs2pError(f"prefill chunk must be at least 1 token, got {prefill_chunk}")
        self.bundle = bundle
        self.prefill_chunk = prefill_chunk
        if huge_pages is None:
            huge_pages = huge_pages_requested()
        resident_before = resident_huge_blocks() if huge_pages else set()
        options = session_options(bundle, threads, profile_prefix)
        try:
            self.session = ort.InferenceSession(
                str(bundle.model_path),
                sess_options=options,
                providers=["CPUExecutionProvider"],
                disabled_optimizers=DISABLED_OPTIMIZERS if bundle.manifest.get("graph") == "fused" else [],
            )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise Pbs2pError(f"onnxruntime cannot load {bundle.model_path}: {first}") from None
        # Initializers the kernels repacked at load are not read again: let their file pages go.
        data_file = bundle.model_path.with_name(bundle.model_path.name + ".data")
        if release_pages and data_file.is_file():
            release_file_pages(data_file)
        self.huge_page_bytes = collapse_to_huge_pages(exclude=resident_before) if huge_pages else 0
        layers = range(bundle.num_layers)
        self.past_names = [f"past_key_values.{i}.{kind}" for i in layers for kind in ("key", "value")]
        self.present_names = [f"present.{i}.{kind}" for i in layers for kind in ("key", "value")]
        self._check_contract()
        past_type = next(i.type for i in self.session.get_inputs() if i.name == self.past_names[0])
        self.cache_dtype = _NUMPY_DTYPES.get(past_type, np.float32)
        self.has_position_ids = any(i.name == "position_ids" for i in self.session.get_inputs())
        optional = self.session.get_overridable_initializers()  # inputs with a default value
        self.fused = any(i.name == LOGITS_TO_KEEP for i in [*self.session.get_inputs(), *optional])
        self._output_names = ["logits", *self.present_names]
        self._past: list[ort.OrtValue] = []
        self._buffers: list[np.ndarray] = []  # fused graphs: the shared past/present buffers
        self._binding: ort.IOBinding | None = None
        # fused graphs: attention_mask rows are views of this (read-only)
        self._mask = np.ones(0, dtype=np.int64)
        self._keep = {n: ort.OrtValue.ortvalue_from_numpy(np.array(n, dtype=np.int64)) for n in (0, 1)}
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        vocab = logits.shape[-1] if isinstance(logits.shape[-1], int) else self.bundle.vocab_size
        self._own_logits_buffer(np.empty((1, 1, vocab), dtype=_NUMPY_DTYPES.get(logits.type, np.float32)))
        self.past_len = 0
        self.last_run_seconds = 0.0  # wall time of the last onnxruntime run (the rest of forward is Python)
        self.reset()

    def fork(self) -> DecoderSession:
        """The same onnxruntime session (thread-safe to run) with a new, empty KV cache of its own."""
        other = copy.copy(self)
        other._buffers, other._binding = [], None
        other._own_logits_buffer(np.empty_like(self._last_logits))
        other.reset()
        return other

    def _own_logits_buffer(self, buffer: np.ndarray) -> None:
        """The [1, 1, vocab] array a fused graph's decode step writes its logits into."""
        self._last_logits = buffer
        self._last_logits_value = ort.OrtValue.ortvalue_from_numpy(buffer)

    def _check_contract(self) -> None:
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in ["input_ids", "attention_mask", *self.past_names] if n not in inputs]
        missing += [n for n in ["logits", *self.present_names] if n not in outputs]
        if missing:
            raise Pbs2pError(
                f"{self.bundle.model_path} does not match its manifest ({self.bundle.num_layers} layers): "
                f"graph lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
            )

    @property
    def context_length(self) -> int:
        return self.bundle.context_length

    def reset(self) -> None:
        """Start a new sequence: empty (length 0) past tensors; a fused graph keeps its buffers."""
        self.past_len = 0
        if self.fused:
            return
        shape = (1, self.bundle.num_kv_heads, 0, self.bundle.head_dim)
        empty = np.zeros(shape, dtype=self.cache_dtype)
        self._past = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past_names]
        self.past_len = 0

    def kv_cache_bytes(self) -> int:
        """Bytes held by the current cache tensors."""
        if self.fused:
            return sum(buffer.nbytes for buffer in self._buffers)
        itemsize = np.dtype(self.cache_dtype).itemsize
        return sum(int(np.prod(v.shape())) * itemsize for v in self._past)

    def forward(self, token_ids: np.ndarray | list[int], all_logits: bool = False) -> np.ndarray:
        """Run the graph on the next tokens (prefill if many, decode if one) and return the last row of logits.

        With `all_logits=True`, returns logits for every input position, shape [S, vocab].
        """
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        new, past = ids.shape[1], self.past_len
        if new == 0:
            raise Pbs2pError("no tokens to run")
        if past + new > self.context_length:
            raise Pbs2pError(
                f"sequence of {past + new} tokens exceeds the model's context of {self.context_length}"
            )
        if self.fused:
            return self._forward_fused(ids, all_logits)
        attention_mask = np.ones((1, past + new), dtype=np.int64)
        position_ids = np.arange(past, past + new, dtype=np.int64).reshape(1, -1)
        feeds = {
            "input_ids": ort.OrtValue.ortvalue_from_numpy(ids),
            "attention_mask": ort.OrtValue.ortvalue_from_numpy(attention_mask),
        }
        if self.has_position_ids:
            feeds["position_ids"] = ort.OrtValue.ortvalue_from_numpy(position_ids)
        feeds.update(zip(self.past_names, self._past, strict=True))
        start = time.perf_counter()
        outputs = self.session.run_with_ort_values(self._output_names, feeds)
        self.last_run_seconds = time.perf_counter() - start
        self._past = list(outputs[1:])
        self.past_len = past + new
        logits = outputs[0].numpy()
        # Own copy of the rows we return, so nothing outlives the OrtValue that the next call releases.
        return np.array(logits[0] if all_logits else logits[0, -1], dtype=np.float32)

    def _ensure_capacity(self, needed: int) -> None:
        """Grow the shared buffers (doubling, in KV_BUFFER_STEP multiples, at most the context) to `needed`."""
        capacity = self._buffers[0].shape[2] if self._buffers else 0
        if needed <= capacity and self._binding is not None:
            return
        length = max(needed, 2 * capacity, KV_BUFFER_STEP)
        length = min(-(-length // KV_BUFFER_STEP) * KV_BUFFER_STEP, max(self.context_length, needed))
        shape = (1, self.bundle.num_kv_heads, length, self.bundle.head_dim)
        buffers = [np.zeros(shape, dtype=self.cache_dtype) for _ in self.past_names]
        for old, new in zip(self._buffers, buffers, strict=False):
            new[:, :, : self.past_len] = old[:, :, : self.past_len]
        binding = self.session.io_binding()
        binding.bind_output("logits")
        for past, present, buffer in zip(self.past_names, self.present_names, buffers, strict=True):
            value = ort.OrtValue.ortvalue_from_numpy(buffer)  # shares the numpy memory
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self._buffers, self._binding = buffers, binding
        self._mask = np.ones(length, dtype=np.int64)

    def _forward_fused(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        past, new = self.past_len, ids.shape[1]
        self._ensure_capacity(past + new)
        binding = self._binding
        assert binding is not None
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", self._mask[: past + new].reshape(1, -1))
        # An input with a default value binds only as an OrtValue (bind_cpu_input does not find it).
        binding.bind_ortvalue_input(LOGITS_TO_KEEP, self._keep[0 if all_logits else 1])
        if all_logits:
            binding.bind_output("logits")  # onnxruntime allocates [1, S, vocab]
        else:  # [1, 1, vocab] into the same buffer every step: no allocation per token
            binding.bind_ortvalue_output("logits", self._last_logits_value)
        start = time.perf_counter()
        self.session.run_with_iobinding(binding)
        self.last_run_seconds = time.perf_counter() - start
        self.past_len = past + new
        if not all_logits:
            return self._last_logits[0, -1].astype(np.float32)  # a copy: the buffer is rewritten next step
        return np.array(binding.get_outputs()[0].numpy()[0], dtype=np.float32)

    def prefill(self, token_ids: np.ndarray | list[int]) -> np.ndarray:
        """Run a prompt through the graph `prefill_chunk` tokens at a time; return the last row of logits.

        Chunking bounds the activations and the [tokens, vocab] logits a single run allocates (25 MB for 128
        tokens of a 49k vocabulary), which is most of the peak RSS of a small compressed model.
        """
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        chunk = self.prefill_chunk or max(ids.size, 1)
        logits = np.empty(0, dtype=np.float32)
        for start in range(0, max(ids.size, 1), chunk):
            logits = self.forward(ids[start : start + chunk])
        return logits

    def end_profiling(self) -> Path:
        """Stop onnxruntime's profiler and return the JSON trace it wrote."""
        return Path(self.session.end_profiling())
