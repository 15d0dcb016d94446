"""`pbs2p-edge bench`: llama-bench style prompt processing (pp) and token generation (tg), plus memory.

Every (bundle, thread count) pair gets its own worker process (`bench_worker.py`), loaded one after another so
load times do not compete; then the repetitions run interleaved, pp of every worker, tg of every worker, rep by
rep, so a noisy machine slows all bundles alike and the ratios between them hold. RSS figures are per process,
so each is that bundle's alone.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.runtime.bundle import load_bundle
from pbs2p_edge.runtime.session import DEFAULT_PREFILL_CHUNK

Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchSettings:
    pp: int = 128
    tg: int = 128
    reps: int = 3
    warmup: int = 1
    threads: tuple[int, ...] = field(default_factory=lambda: (default_threads(),))
    profile: bool = False
    profile_context: int = 64
    profile_steps: int = 16
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK
    ops_library: str | None = None  # --ops-library; None = the installed package's
    verify_hash: bool = True  # sha256 of every bundle file, once, in this process (workers check sizes)

    def __post_init__(self) -> None:
        for name in ("pp", "tg", "reps"):
            if getattr(self, name) < 1:
                raise Pbs2pError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise Pbs2pError(f"--warmup must be >= 0, got {self.warmup}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise Pbs2pError(f"--prefill-chunk must be at least 1, got {self.prefill_chunk}")
        if not self.threads or min(self.threads) < 1:
            raise Pbs2pError(f"--threads must list positive counts, got {self.threads}")


def default_threads() -> int:
    """onnxruntime's own default: one intra-op thread per physical core."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def parse_threads(text: str) -> tuple[int, ...]:
    """`"1,2"` -> (1, 2)."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise Pbs2pError(f"--threads takes comma-separated integers like 1,2, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise Pbs2pError(f"--threads takes positive integers like 1,2, got {text!r}")
    return counts


class JsonLinesProcess:
    """A worker subprocess and its JSON-lines conversation: one request line in, one reply line out."""

    def __init__(
        self,
        command: list[str],
        label: str,
        error: type[Exception] = Pbs2pError,
        env: dict[str, str] | None = None,
    ) -> None:
        self.label, self.error = label, error
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        # cwd "/": `python -m` puts the cwd first on sys.path, and run from a source checkout with a regular
        # (non-editable) install, the checkout's pbs2p_edge/ (without runtime/) would shadow the installed one.
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=os.path.abspath(os.sep),
            env={**os.environ, **env} if env else None,
        )
        self.info = self.receive()

    def receive(self) -> dict[str, Any]:
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line:
            self.process.wait()
            self._stderr.seek(0)
            lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
            raise self.error(f"bench worker for {self.label} died: {lines[-1] if lines else 'no output'}")
        reply = json.loads(line)
        if "error" in reply:
            raise self.error(f"{self.label}: {reply['error']}")
        return reply

    def request(self, command: str, **arguments: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"cmd": command, **arguments}) + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self, timeout: float = 60) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._stderr.close()


class WorkerProcess(JsonLinesProcess):
    """A `bench_worker` subprocess."""

    def __init__(
        self,
        bundle: Path,
        threads: int | None,
        profile_prefix: str | None = None,
        bare: bool = False,
        prefill_chunk: int | None = None,
        ops_library: str | None = None,
        env: dict[str, str] | None = None,
    ):
        label = f"{bundle} (threads {threads})" if not bare else "bare onnxruntime session"
        command = [sys.executable, "-m", "pbs2p_edge.runtime.bench_worker"]
        command += ["--bare"] if bare else [str(bundle)]
        command += ["--threads", str(threads)] if threads else []
        command += ["--profile-prefix", profile_prefix] if profile_prefix else []
        command += ["--prefill-chunk", str(prefill_chunk)] if prefill_chunk else []
        command += ["--ops-library", ops_library] if ops_library and not bare else []
        command += [] if bare else ["--no-verify-hash"]  # run_bench hashed the files already
        super().__init__(command, label, env=env)


def bare_session(threads: int) -> dict[str, Any]:
    """RSS of a process that imported the runtime's libraries and opened a one-node onnxruntime session."""
    worker = WorkerProcess(Path("."), threads, bare=True)
    worker.close()
    return worker.info


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo (x86 "model name", arm "Model"), else what platform knows.

    On x86 the family / model / stepping numbers follow it: cloud hosts print one brand string ("AMD EPYC") for
    generations whose vector units differ (AVX-512 double-pumped on family 25, full width on family 26).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}  # the first value of each key: processor 0's
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or fields.get("Model")
    if not name:
        return platform.processor() or platform.machine()
    ids = [f"{key} {fields[key]}" for key in ("cpu family", "model", "stepping") if key in fields]
    return f"{name} ({', '.join(ids)})" if "cpu family" in fields else name


def _machine() -> dict[str, Any]:
    import onnxruntime

    return {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _row(worker: WorkerProcess, threads: int, samples: dict[str, list], memory: dict, bare_rss: int) -> dict:
    info = worker.info
    pp_mean, pp_std = _mean_std(samples["pp_tps"])
    tg_mean, tg_std = _mean_std(samples["tg_tps"])
    budget = info["bundle_bytes"] + samples["kv_cache_bytes"] + bare_rss
    # A decode step reads every weight once plus the cache so far (on average half the final tg cache).
    bytes_per_token = info["weight_bytes"] + samples["kv_cache_bytes"] // 2
    return {
        "bundle": info["bundle"],
        "name": Path(info["bundle"]).name,
        "weights": info["weights"],
        "threads": threads,
        "bundle_bytes": info["bundle_bytes"],
        "load_seconds": info["load_seconds"],
        "pp_tokens_per_second": pp_mean,
        "pp_tokens_per_second_std": pp_std,
        "tg_tokens_per_second": tg_mean,
        "tg_tokens_per_second_std": tg_std,
        "ttft_seconds": float(np.mean(samples["ttft"])),
        "decode_latency_p50_seconds": float(np.percentile(samples["steps"], 50)),
        "decode_latency_p95_seconds": float(np.percentile(samples["steps"], 95)),
        "rss_before_load_bytes": info["rss_before_load"],
        "rss_after_load_bytes": info["rss_after_load"],
        "peak_rss_load_bytes": info["peak_rss_load"],
        "peak_rss_generation_bytes": memory["peak_rss_generation"],
        "peak_rss_exact": memory["exact_peak"],
        "bare_session_rss_bytes": bare_rss,
        "kv_cache_bytes": samples["kv_cache_bytes"],
        "kv_bytes_per_token": info["kv_bytes_per_token"],
        "weight_bytes": info["weight_bytes"],
        "decode_bytes_per_token": bytes_per_token,
        "decode_bandwidth_gb_per_second": tg_mean * bytes_per_token / 1e9,
        "memory_budget_bytes": budget,
        "peak_rss_over_budget": memory["peak_rss_generation"] / budget,
    }


def _ratios(rows: list[dict]) -> list[dict]:
    """The first bundle against each other bundle, per thread count."""
    first = rows[0]["bundle"]
    out = []
    for row in rows:
        if row["bundle"] != first:
            continue
        for other in rows:
            if other["bundle"] == first or other["threads"] != row["threads"]:
                continue
            out.append(
                {
                    "bundle": row["name"],
                    "baseline": other["name"],
                    "threads": row["threads"],
                    "tg_speedup": row["tg_tokens_per_second"] / other["tg_tokens_per_second"],
                    "pp_speedup": row["pp_tokens_per_second"] / other["pp_tokens_per_second"],
                    "size_ratio": row["bundle_bytes"] / other["bundle_bytes"],
                    "peak_rss_ratio": row["peak_rss_generation_bytes"] / other["peak_rss_generation_bytes"],
                }
            )
    return out


def _profile(bundle: Path, threads: int, settings: BenchSettings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pbs2p-profile-") as tmp:
        worker = WorkerProcess(
            bundle,
            threads,
            profile_prefix=str(Path(tmp) / "ort"),
            prefill_chunk=settings.prefill_chunk,
            ops_library=settings.ops_library,
        )
        try:
            context = min(
                settings.profile_context, worker.info["context_length"] - settings.profile_steps - 1
            )
            result = worker.request("profile", context=max(context, 1), steps=settings.profile_steps)
        finally:
            worker.close()
    return {"bundle": str(bundle), "name": bundle.name, "threads": threads, **result}


def run_bench(
    bundle_dirs: Sequence[str | os.PathLike], settings: BenchSettings, log: Log | None = None
) -> dict:
    """Measure every bundle at every thread count; return the full report (see `docs/DEPLOY.md` for fields)."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    # Fail fast, before any subprocess: manifest, paths, sizes, hashes, ops library versions.
    bundles = [
        load_bundle(path, ops_library=settings.ops_library, verify_hash=settings.verify_hash)
        for path in bundle_dirs
    ]
    names = [b.name for b in bundles]
    if len(set(b.path for b in bundles)) != len(bundles):
        raise Pbs2pError(f"the same bundle is listed twice: {names}")
    for bundle in bundles:
        limit = max(settings.pp, settings.tg)
        if limit > bundle.context_length:
            raise Pbs2pError(
                f"{bundle.path}: pp/tg of {limit} tokens exceed its context of {bundle.context_length}"
            )
    bare = bare_session(settings.threads[0])
    log(f"bare onnxruntime session: RSS {bare['rss'] / 2**20:.1f} MiB")
    workers: list[tuple[WorkerProcess, int]] = []
    samples: list[dict[str, list]] = []
    try:
        for bundle in bundles:
            for threads in settings.threads:
                worker = WorkerProcess(
                    bundle.path,
                    threads,
                    prefill_chunk=settings.prefill_chunk,
                    ops_library=settings.ops_library,
                )
                log(f"loaded {bundle.name} (threads {threads}) in {worker.info['load_seconds']:.2f} s")
                workers.append((worker, threads))
                samples.append({"pp_tps": [], "tg_tps": [], "ttft": [], "steps": [], "kv_cache_bytes": 0})
        for rep in range(settings.warmup + settings.reps):
            measured = rep >= settings.warmup
            label = f"rep {rep - settings.warmup + 1}/{settings.reps}" if measured else "warm-up"
            log(f"{label}: pp{settings.pp} then tg{settings.tg} on {len(workers)} worker(s)")
            for (worker, _), sample in zip(workers, samples, strict=True):
                result = worker.request("pp", n=settings.pp, seed=rep)
                if measured:
                    sample["pp_tps"].append(settings.pp / result["seconds"])
                    sample["ttft"].append(result["ttft_seconds"])
            for (worker, _), sample in zip(workers, samples, strict=True):
                result = worker.request("tg", n=settings.tg, seed=rep)
                if measured:
                    sample["tg_tps"].append(settings.tg / result["seconds"])
                    sample["steps"].extend(result["step_seconds"])
                    sample["kv_cache_bytes"] = result["kv_cache_bytes"]
        memories = [worker.request("mem") for worker, _ in workers]
    finally:
        for worker, _ in workers:
            worker.close()
    rows = [_row(w, t, s, m, bare["rss"]) for (w, t), s, m in zip(workers, samples, memories, strict=True)]
    profiles = []
    if settings.profile:
        for bundle in bundles:
            log(f"profiling {settings.profile_steps} decode steps of {bundle.name}")
            profiles.append(_profile(bundle.path, settings.threads[0], settings))
    return {
        "format": "pbs2p-edge-bench",
        "version": 1,
        "settings": {**asdict(settings), "threads": list(settings.threads)},
        "machine": _machine(),
        "bare_session": bare,
        "results": rows,
        "ratios": _ratios(rows),
        "profiles": profiles,
    }
