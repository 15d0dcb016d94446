"""Soak and concurrency check of a bundle, torch-free: the figures for the README.

1. Soak: `--steps` greedy decode steps (default 10,000) in one process, in sequences of `--seq-len` steps
   (each from a fresh cache after a random 16-token prompt), after `--warmup` steps that let onnxruntime's
   arena reach its size. RSS growth: the highest RSS sampled (every 100 steps) in the last 1,000 measured
   steps against the highest in the last 1,000 warm-up steps; exit status 1 if it reaches `--max-growth`
   (default 1%).
2. Concurrency: `--concurrency` threads (default 4) share one onnxruntime session (`Generator.fork()`),
   each greedy-decoding its own prompt, three rounds; every thread must get the tokens it gets alone.

    .venv/bin/python bench/soak.py out/pbs2p [--steps 10000] [--json bench/results/soak.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.runtime import Generator
from pbs2p_edge.runtime.memory import current_rss

PROMPT_TOKENS = 16


def soak(generator: Generator, steps: int, warmup: int, seq_len: int, seed: int = 0) -> dict[str, Any]:
    """RSS is sampled every 100 steps; the growth compares the highest sample of the last 1,000 measured steps
    with the highest of the last 1,000 warm-up steps (like with like: RSS within a window moves with the
    cache length and the allocators' chunks, a leak moves every window up)."""
    session = generator.session
    rng = np.random.default_rng(seed)
    vocab = generator.bundle.vocab_size
    seq_len = min(seq_len, generator.context_length - PROMPT_TOKENS - 1)
    total, done, sequences = warmup + steps, 0, 0
    warm, samples = [], []
    start = time.perf_counter()
    while done < total:
        session.reset()
        logits = session.prefill(rng.integers(0, vocab, PROMPT_TOKENS))
        sequences += 1
        for _ in range(min(seq_len, total - done)):
            logits = session.forward([int(np.argmax(logits))])
            done += 1
            if done % 100 == 0:
                if done <= warmup:
                    warm.append(current_rss())
                else:
                    samples.append({"steps": done - warmup, "rss_bytes": current_rss()})
            if done == warmup:
                start = time.perf_counter()
    seconds = time.perf_counter() - start
    window = 10  # samples: 1,000 steps
    before = max(warm[-window:])
    after = max(s["rss_bytes"] for s in samples[-window:])
    return {
        "steps": steps,
        "warmup_steps": warmup,
        "seq_len": seq_len,
        "sequences": sequences,
        "seconds": seconds,
        "rss_after_warmup_bytes": before,
        "rss_end_bytes": after,
        "rss_growth_percent": 100.0 * (after - before) / before,
        "samples": samples[9::10],  # every 1,000 steps
    }


def concurrency(generator: Generator, threads: int, new_tokens: int = 24, rounds: int = 3) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    vocab = generator.bundle.vocab_size
    prompts = [[int(t) for t in rng.integers(0, vocab, 5 + 7 * i)] for i in range(threads)]
    alone = [generator.generate(p, new_tokens).token_ids for p in prompts]
    forks = [generator.fork() for _ in prompts]
    mismatches = 0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(rounds):
            jobs = [pool.submit(f.generate, p, new_tokens) for f, p in zip(forks, prompts, strict=True)]
            results = [job.result().token_ids for job in jobs]
            mismatches += sum(r != a for r, a in zip(results, alone, strict=True))
    return {"threads": threads, "rounds": rounds, "new_tokens": new_tokens, "mismatches": mismatches}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=4000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--concurrency", type=int, default=4, help="Python threads sharing the session")
    parser.add_argument("--max-growth", type=float, default=1.0, help="RSS growth limit, percent")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    if args.steps < 1000 or args.warmup < 1000:
        parser.error("--steps and --warmup must be at least 1000")
    try:
        generator = Generator(args.bundle, threads=args.threads)
    except Pbs2pError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"bundle": str(Path(args.bundle).resolve()), "weights": generator.bundle.weights}
    report["soak"] = soak(generator, args.steps, args.warmup, args.seq_len)
    report["concurrency"] = concurrency(generator, args.concurrency) if args.concurrency > 0 else None
    s = report["soak"]
    print(
        f"soak: {s['steps']} decode steps ({s['sequences']} sequences of <= {s['seq_len']}) in "
        f"{s['seconds']:.1f} s; RSS {s['rss_after_warmup_bytes'] / 2**20:.1f} MiB after {s['warmup_steps']} "
        f"warm-up steps -> {s['rss_end_bytes'] / 2**20:.1f} MiB at the end: growth "
        f"{s['rss_growth_percent']:+.3f}% (highest RSS of the last 1000 steps of each)"
    )
    c = report["concurrency"]
    if c:
        print(
            f"concurrency: {c['threads']} threads x {c['rounds']} rounds on one session, {c['new_tokens']} "
            f"greedy tokens each: {c['mismatches']} mismatches against the same prompts run alone"
        )
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    ok = s["rss_growth_percent"] < args.max_growth and (c is None or c["mismatches"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
