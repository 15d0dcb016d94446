"""One peer system (ORT GenAI or llama.cpp) in its own process, for bench/peers.py.

It speaks `pbs2p_edge.runtime.bench_worker`'s protocol (one JSON command per stdin line, one JSON reply per
stdout line: `pp`, `tg`, `mem`, `quit`) and draws prompt ids exactly as that worker does
(`numpy.random.default_rng(seed).integers(0, vocab_size, n)`), so every system sees the same ids.

    python bench/peer_worker.py {genai,llamacpp} PATH --threads T
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from pbs2p_edge.runtime.memory import current_rss, peak_rss, reset_peak_rss


def random_ids(vocab_size: int, count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=count, dtype=np.int64)


def path_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class GenAIPeer:
    """onnxruntime_genai on a model builder output folder (threads set in its genai_config.json by peers.py)."""

    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(folder))
        config = json.loads((folder / "genai_config.json").read_text())
        self.vocab_size = int(config["model"]["vocab_size"])
        self.threads = threads

    def _generator(self, length: int) -> Any:
        params = self.og.GeneratorParams(self.model)
        # min_length = max_length: no early stop on an end-of-sequence token; greedy as in our worker.
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        return self.og.Generator(self.model, params)

    def prefill(self, ids: np.ndarray) -> float:
        generator = self._generator(len(ids) + 2)
        start = time.perf_counter()
        generator.append_tokens(ids.astype(np.int32))
        int(np.argmax(generator.get_logits()[0, -1]))
        return time.perf_counter() - start

    def decode(self, token: int, n: int) -> list[float]:
        generator = self._generator(n + 4)
        generator.append_tokens(np.array([token], dtype=np.int32))
        # The first call only samples from the logits append_tokens computed; each later call runs one
        # forward step on the token it appended last, then samples: that is the timed step.
        generator.generate_next_token()
        steps = []
        for _ in range(n):
            start = time.perf_counter()
            generator.generate_next_token()
            steps.append(time.perf_counter() - start)
        return steps


class LlamaCppPeer:
    """llama-cpp-python on a GGUF file, greedy, one context of pp + tg + 16 tokens."""

    def __init__(self, gguf: Path, threads: int, context: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(gguf),
            n_ctx=context,
            n_batch=context,
            n_ubatch=context,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.vocab_size = int(self.llm.n_vocab())

    def _argmax(self) -> int:
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def prefill(self, ids: np.ndarray) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids.tolist())
        self._argmax()
        return time.perf_counter() - start

    def decode(self, token: int, n: int) -> list[float]:
        self.llm.reset()
        steps = []
        for _ in range(n):
            start = time.perf_counter()
            self.llm.eval([token])
            token = self._argmax()
            steps.append(time.perf_counter() - start)
        return steps


def serve(peer: Any, size: int, load_seconds: float, out: TextIO) -> None:
    def send(payload: dict[str, Any]) -> None:
        out.write(json.dumps(payload) + "\n")
        out.flush()

    exact = reset_peak_rss()  # from here on, the peak is the generation peak (as in our worker)
    generation_peak = 0
    send({"ready": True, "bundle_bytes": size, "vocab_size": peer.vocab_size, "load_seconds": load_seconds})
    for line in sys.stdin:
        command = json.loads(line)
        name = command.pop("cmd")
        if name == "quit":
            return
        if name == "pp":
            seconds = peer.prefill(random_ids(peer.vocab_size, command["n"], command["seed"]))
            reply: dict[str, Any] = {"seconds": seconds}
        elif name == "tg":
            token = int(random_ids(peer.vocab_size, 1, command["seed"])[0])
            steps = peer.decode(token, command["n"])
            reply = {"seconds": float(sum(steps)), "step_seconds": steps}
        elif name == "mem":
            reply = {"rss": current_rss(), "exact_peak": exact}
        else:
            reply = {"error": f"unknown command {name!r}"}
        generation_peak = max(generation_peak, peak_rss() if exact else current_rss())
        if name == "mem":
            reply["peak_rss_generation"] = generation_peak
        send(reply)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench/peer_worker.py")
    parser.add_argument("kind", choices=["genai", "llamacpp"])
    parser.add_argument("path", type=Path)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, required=True, help="Draw prompt ids in [0, this).")
    args = parser.parse_args(argv)
    protocol, sys.stdout = sys.stdout, sys.stderr
    try:
        start = time.perf_counter()
        if args.kind == "genai":
            peer: Any = GenAIPeer(args.path, args.threads)
        else:
            peer = LlamaCppPeer(args.path, args.threads, args.context)
        if peer.vocab_size < args.vocab_size:
            raise ValueError(f"vocabulary of {peer.vocab_size} < the reference's {args.vocab_size}")
        peer.vocab_size = args.vocab_size  # the reference bundle's: the same prompt ids everywhere
        serve(peer, path_bytes(args.path), time.perf_counter() - start, protocol)
    except Exception as exc:  # reported to peers.py, which prints it as one line
        protocol.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        protocol.flush()
        sys.exit(1)


if __name__ == "__main__":
    main()
