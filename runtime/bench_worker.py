"""The per-bundle half of `pbs2p-edge bench`, run in its own process so its RSS is that bundle's alone.

Protocol: the parent writes one JSON command per line on stdin; the worker answers one JSON object per line on
its original stdout (anything else the process prints goes to stderr). Commands: `pp`, `tg`, `mem`, `profile`,
`quit`. `--bare` instead measures a bare onnxruntime session (a one-node graph) and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, TextIO

import numpy as np
import onnxruntime as ort
import tokenizers  # noqa: F401 - loaded up front, so "bare" and "before load" RSS include the same libraries

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.runtime.bundle import Bundle
from pbs2p_edge.runtime.memory import current_rss, peak_rss, reset_peak_rss


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def minimal_model_bytes() -> bytes:
    """A serialized ONNX ModelProto `y = Identity(x)`, x float[1]: the smallest session onnxruntime will load."""
    shape = _field(2, _field(1, _field(1, 1)))  # TensorShapeProto{dim{dim_value: 1}}
    tensor_type = _field(1, _field(1, 1) + shape)  # TypeProto{tensor_type{elem_type: FLOAT, shape}}
    node = _field(1, b"x") + _field(2, b"y") + _field(4, b"Identity")
    graph = (
        _field(1, node)
        + _field(2, b"bare")
        + _field(11, _field(1, b"x") + _field(2, tensor_type))
        + _field(12, _field(1, b"y") + _field(2, tensor_type))
    )
    return _field(1, 8) + _field(8, _field(2, 13)) + _field(7, graph)  # ir_version 8, opset 13


def measure_bare(threads: int | None) -> dict[str, Any]:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        minimal_model_bytes(), sess_options=options, providers=["CPUExecutionProvider"]
    )
    session.run(None, {"x": np.ones(1, dtype=np.float32)})
    return {"rss": current_rss(), "peak_rss": peak_rss()}


def _summarize_profile(trace_path: str, decode_runs: int) -> dict[str, float]:
    """Kernel microseconds per op type, summed over the last `decode_runs` session runs of the trace."""
    with open(trace_path, encoding="utf-8") as f:
        events = json.load(f)
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in runs[-decode_runs:]]
    per_op: dict[str, float] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        ts = event["ts"]
        if any(start <= ts <= end for start, end in windows):
            op = event.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + float(event["dur"])
    return per_op


def weight_bytes(bundle: Bundle) -> int:
    """Bytes of weights a decode step reads: the manifest's per-kind initializer sizes, else the graph files."""
    kinds = bundle.manifest.get("sizes", {}).get("weights")
    if isinstance(kinds, dict) and kinds and all(isinstance(v, int) for v in kinds.values()):
        return sum(kinds.values())
    data = bundle.model_path.with_name(bundle.model_path.name + ".data")
    return bundle.model_path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


class Worker:
    def __init__(
        self,
        bundle_dir: str,
        threads: int | None,
        profile_prefix: str | None,
        prefill_chunk: int | None = None,
        ops_library: str | None = None,
        verify_hash: bool = True,
    ) -> None:
        from pbs2p_edge.runtime.bundle import bundle_bytes, load_bundle
        from pbs2p_edge.runtime.sampling import Sampler, SamplingConfig
        from pbs2p_edge.runtime.session import DecoderSession
        from pbs2p_edge.runtime.text import ChatTemplate, load_tokenizer

        self.rss_before_load = current_rss()
        start = time.perf_counter()
        self.bundle = load_bundle(bundle_dir, ops_library=ops_library, verify_hash=verify_hash)
        # Kept for the worker's life: generating holds the tokenizer, so the peak RSS while generating does too.
        self.tokenizer = load_tokenizer(self.bundle.tokenizer_path)
        self.chat_template = ChatTemplate.from_bundle(self.bundle.path)
        self.session = DecoderSession(
            self.bundle, threads=threads, profile_prefix=profile_prefix, prefill_chunk=prefill_chunk
        )
        self.load_seconds = time.perf_counter() - start
        self.peak_rss_load = peak_rss()
        self.rss_after_load = current_rss()
        self.bundle_bytes = bundle_bytes(self.bundle.path)
        self.sampler = Sampler(SamplingConfig())  # greedy: the same code path as `generate`
        self.exact_peak = reset_peak_rss()  # from here on, the peak is the generation peak
        self.generation_peak = 0

    def _random_ids(self, count: int, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, self.bundle.vocab_size, size=count, dtype=np.int64)

    def _track_peak(self) -> None:
        self.generation_peak = max(self.generation_peak, peak_rss() if self.exact_peak else current_rss())

    def ready(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle.path),
            "weights": self.bundle.weights,
            "load_seconds": self.load_seconds,
            "rss_before_load": self.rss_before_load,
            "rss_after_load": self.rss_after_load,
            "peak_rss_load": self.peak_rss_load,
            "bundle_bytes": self.bundle_bytes,
            "kv_bytes_per_token": self.bundle.kv_bytes_per_token(np.dtype(self.session.cache_dtype).itemsize),
            "weight_bytes": weight_bytes(self.bundle),
            "huge_page_bytes": self.session.huge_page_bytes,
            "context_length": self.bundle.context_length,
        }

    def pp(self, n: int, seed: int) -> dict[str, Any]:
        """Prompt processing: one prefill of n tokens from an empty cache, then the first token's choice."""
        ids = self._random_ids(n, seed)
        self.session.reset()
        start = time.perf_counter()
        logits = self.session.prefill(ids)
        prefill = time.perf_counter() - start
        self.sampler.choose(logits, ids.tolist())
        ttft = time.perf_counter() - start
        self._track_peak()
        return {"seconds": prefill, "ttft_seconds": ttft}

    def tg(self, n: int, seed: int) -> dict[str, Any]:
        """Token generation: n single-token decode steps from an empty cache, each step timed."""
        token = int(self._random_ids(1, seed)[0])
        history = [token]
        self.session.reset()
        steps = []
        for _ in range(n):
            start = time.perf_counter()
            logits = self.session.forward([token])
            token = self.sampler.choose(logits, history)
            steps.append(time.perf_counter() - start)
            history.append(token)
        self._track_peak()
        return {
            "seconds": float(sum(steps)),
            "step_seconds": steps,
            "kv_cache_bytes": self.session.kv_cache_bytes(),
        }

    def profile(self, context: int, steps: int) -> dict[str, Any]:
        """Decode `steps` tokens after a `context`-token prefill; split each step's wall time by where it goes."""
        token = int(self._random_ids(1, 0)[0])
        self.session.reset()
        self.session.prefill(self._random_ids(context, 1))
        walls, runs, sampling = [], [], []
        history: list[int] = []
        for _ in range(steps):
            start = time.perf_counter()
            logits = self.session.forward([token])
            mid = time.perf_counter()
            token = self.sampler.choose(logits, history)
            end = time.perf_counter()
            walls.append(end - start)
            runs.append(self.session.last_run_seconds)
            sampling.append(end - mid)
            history.append(token)
        trace = self.session.end_profiling()
        per_op_us = _summarize_profile(str(trace), steps)
        try:
            os.unlink(trace)
        except OSError:
            pass
        return {
            "context": context,
            "steps": steps,
            "step_seconds": float(np.mean(walls)),
            "run_seconds": float(np.mean(runs)),
            "sampling_seconds": float(np.mean(sampling)),
            "kernel_seconds_by_op": {op: us / 1e6 / steps for op, us in sorted(per_op_us.items())},
        }

    def memory(self) -> dict[str, Any]:
        self._track_peak()
        return {
            "peak_rss_generation": self.generation_peak,
            "rss": current_rss(),
            "exact_peak": self.exact_peak,
        }


def _serve(worker: Worker, out: TextIO) -> None:
    def send(payload: dict[str, Any]) -> None:
        out.write(json.dumps(payload) + "\n")
        out.flush()

    send({"ready": True, **worker.ready()})
    for line in sys.stdin:
        command = json.loads(line)
        name = command.pop("cmd")
        if name == "quit":
            return
        handler = {"pp": worker.pp, "tg": worker.tg, "profile": worker.profile, "mem": worker.memory}[name]
        send(handler(**command))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pbs2p_edge.runtime.bench_worker")
    parser.add_argument("bundle", nargs="?")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile-prefix", default=None)
    parser.add_argument("--prefill-chunk", type=int, default=None)
    parser.add_argument("--ops-library", default=None)
    parser.add_argument("--no-verify-hash", action="store_true")
    parser.add_argument("--bare", action="store_true")
    args = parser.parse_args(argv)
    protocol, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the protocol stream
    try:
        if args.bare:
            protocol.write(json.dumps(measure_bare(args.threads)) + "\n")
            return
        worker = Worker(
            args.bundle,
            args.threads,
            args.profile_prefix,
            args.prefill_chunk,
            ops_library=args.ops_library,
            verify_hash=not args.no_verify_hash,
        )
        _serve(worker, protocol)
    except Exception as exc:  # reported to the parent, which raises it as Pbs2pError with this text
        message = str(exc) if isinstance(exc, Pbs2pError) else f"{type(exc).__name__}: {exc}"
        protocol.write(json.dumps({"error": message}) + "\n")
        protocol.flush()
        sys.exit(1)


if __name__ == "__main__":
    main()
