"""Where a bundle's resident memory goes while it generates (issue 12's memory goal).

`pbs2p-edge bench` reports peak RSS while generating over (bundle + KV cache + bare session); this script says
what the rest is. Each variant runs in a fresh process and records RSS, split into anonymous memory and the
bundle's mapped weight file, at five points: before loading, after loading the tokenizer (first, as `pbs2p-edge
generate` does), after loading the graph, after a `--pp`-token prefill and after `--tg` decode steps, plus the
peak. A last table sets the default variant's peak while generating against the budget of `pbs2p-edge bench`
(bundle + KV buffers + a bare session, measured here too) and splits the excess by stage. The `no prepack`
variant loads with onnxruntime's weight prepacking off (`session.disable_prepacking`), i.e. the weights as
stored, for onnxruntime's kernels: the difference at load is what MatMulNBits' packed copies cost (our op makes
its tile copy when its kernel is created, with or without prepacking). The `keep file cache` variant hands the
weight file's pages back after load but leaves them in the page cache (`release_file_pages(drop_cache=False)`,
the behaviour before session 17): embedding rows then fault back in with whatever the cache holds around them
(large folios: up to ~480 KiB per token at 1.5B), so its figures depend on how the file was last read and move
between runs. The major page faults column is what dropping the cache costs: rows read from disk. The prompt and
the decode steps use random, distinct token ids, so each step gathers a new embedding row. The stored bytes per
consuming op come from the graph.

    .venv/bin/python bench/memory_breakdown.py out/pbs2p --out bench/results/memory-smollm2

Memory does not depend on load, so this may run on a busy machine; the decode latency it prints does.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

VARIANTS = ("default", "keep file cache", "no prepack")
TOKENIZER_PROBE = "tokenizer"  # a worker that loads the tokenizer alone
MIB = 1 << 20


def _rollup(data_file: Path) -> dict[str, int]:
    """RSS, anonymous memory and the resident pages of the bundle's weight file, in bytes (Linux)."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Anonymous"):
            fields[key.lower()] = int(rest.split()[0]) * 1024
    from pbs2p_edge.runtime.memory import file_mappings

    mapped = sum(int(m["Rss"].split()[0]) * 1024 for m in file_mappings(data_file))
    return {
        **fields,
        "weight_file": mapped,
        "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt,
    }


def worker(bundle_dir: Path, variant: str, pp: int, tg: int, threads: int) -> dict[str, Any]:
    import numpy as np

    from pbs2p_edge.runtime import session as session_module
    from pbs2p_edge.runtime.bundle import load_bundle
    from pbs2p_edge.runtime.memory import peak_rss, reset_peak_rss
    from pbs2p_edge.runtime.text import load_tokenizer  # imports `tokenizers`, as the bare session has

    bundle = load_bundle(bundle_dir)
    data_file = bundle.model_path.with_name(bundle.model_path.name + ".data").resolve()
    if variant == "no prepack":
        plain = session_module.session_options

        def unpacked(*args: Any, **kwargs: Any) -> Any:
            options = plain(*args, **kwargs)
            options.add_session_config_entry("session.disable_prepacking", "1")
            return options

        session_module.session_options = unpacked
    if variant == "keep file cache":
        from pbs2p_edge.runtime.memory import release_file_pages

        session_module.release_file_pages = lambda path: release_file_pages(path, drop_cache=False)
    points = {"before load": _rollup(data_file)}
    # first and alive to the end, as in `pbs2p-edge generate`
    tokenizer = load_tokenizer(bundle.tokenizer_path)
    points["after tokenizer"] = _rollup(data_file)
    session = session_module.DecoderSession(bundle, threads=threads)
    points["after load"] = _rollup(data_file)
    load_peak = peak_rss()
    peak_resets = reset_peak_rss()  # from here on, the peak `pbs2p-edge bench` reports as "while generating"
    count = pp + tg  # distinct ids while the vocabulary lasts
    tokens = np.random.default_rng(0).choice(bundle.vocab_size, count, replace=count > bundle.vocab_size)
    prompt, steps = tokens[:pp], tokens[pp:]
    session.forward(prompt)
    points[f"after prefill {pp}"] = _rollup(data_file)
    start = time.perf_counter()
    for token in steps:
        session.forward(np.array([int(token)]))
    decode_ms = (time.perf_counter() - start) / max(tg, 1) * 1e3
    points[f"after {tg} decode steps"] = _rollup(data_file)
    kv = bundle.kv_bytes_per_token(np.dtype(session.cache_dtype).itemsize) * (pp + tg)
    generation_peak = peak_rss() if peak_resets else None
    del tokenizer
    return {
        "points": points,
        "peak_rss": max(load_peak, peak_rss()),
        "generation_peak_rss": generation_peak,
        "kv_bytes": kv,
        "kv_buffer_bytes": session.kv_cache_bytes(),  # as allocated: what `pbs2p-edge bench`'s budget counts
        "decode_ms": decode_ms,
    }


def tokenizer_worker(bundle_dir: Path) -> dict[str, int]:
    """RSS the tokenizer adds on its own: as loaded, and live once the heap has handed back what parsing freed."""
    from pbs2p_edge.allocator import release_free_heap
    from pbs2p_edge.runtime.bundle import load_bundle
    from pbs2p_edge.runtime.memory import current_rss
    from pbs2p_edge.runtime.text import load_tokenizer

    bundle = load_bundle(bundle_dir)
    before = current_rss()
    tokenizer = load_tokenizer(bundle.tokenizer_path)
    loaded = current_rss()
    release_free_heap()
    live = current_rss()
    del tokenizer
    return {"loaded": loaded - before, "live": live - before}


def cold_read_microseconds(data_file: Path, count: int = 256) -> float | None:
    """Mean time of a 4 KiB read at a random page of the weight file just dropped from the page cache: what a
    major fault on an embedding row costs on this storage. None where posix_fadvise does not exist."""
    import os

    import numpy as np

    if not hasattr(os, "posix_fadvise") or not data_file.is_file():
        return None
    fd = os.open(data_file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead: one page per read
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        pages = np.random.default_rng(0).integers(0, max(os.fstat(fd).st_size // 4096, 1), count)
        start = time.perf_counter()
        for page in pages:
            os.pread(fd, 4096, int(page) * 4096)
        return (time.perf_counter() - start) / count * 1e6
    finally:
        os.close(fd)


def stored_bytes(model_path: Path) -> dict[str, int]:
    """Initializer bytes by the op types that consume them (shared initializers count once, under all)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(model_path), load_external_data=False)
    consumers: dict[str, set[str]] = defaultdict(set)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].add(node.op_type)
    totals: dict[str, int] = defaultdict(int)
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            size = int(next(e.value for e in tensor.external_data if e.key == "length"))
        else:
            size = len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
        totals[" + ".join(sorted(consumers[tensor.name])) or "(unused)"] += size
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    command = [sys.executable, __file__, str(args.bundle), "--worker", variant, "--pp", str(args.pp)]
    command += ["--tg", str(args.tg), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()
        from peers import exit_usage

        exit_usage(f"the {variant!r} worker failed: {tail[-1] if tail else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def anonymous_added_by_load(run: dict[str, Any]) -> int:
    """Anonymous memory the onnxruntime session added (the tokenizer is loaded before it)."""
    return run["points"]["after load"]["anonymous"] - run["points"]["after tokenizer"]["anonymous"]


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Resident memory of {report['bundle']} ({report['threads']} thread(s))", ""]
    lines += [
        "| variant | point | RSS MiB | anonymous MiB | weight file resident MiB | major page faults since the last point |",
        "|---|---|---|---|---|---|",
    ]
    for variant, run in report["variants"].items():
        previous = None
        for point, values in run["points"].items():
            row = (values["rss"] / MIB, values["anonymous"] / MIB, values["weight_file"] / MIB)
            faults = "" if previous is None else values["major_faults"] - previous
            previous = values["major_faults"]
            lines.append(f"| {variant} | {point} | {row[0]:.1f} | {row[1]:.1f} | {row[2]:.1f} | {faults} |")
        lines.append(f"| {variant} | peak | {run['peak_rss'] / MIB:.1f} | | | |")
    default, plain = report["variants"]["default"], report["variants"]["no prepack"]
    grown = {"default": anonymous_added_by_load(default), "plain": anonymous_added_by_load(plain)}
    lines += [
        "",
        f"Bundle {report['bundle_bytes'] / MIB:.1f} MiB; KV cache at {report['pp']}+{report['tg']} tokens "
        f"{default['kv_bytes'] / MIB:.1f} MiB. Anonymous memory added by loading: {grown['default'] / MIB:.1f} MiB "
        f"with prepacking, {grown['plain'] / MIB:.1f} MiB without; decode {default['decode_ms']:.2f} ms/step "
        f"with prepacking ({report['variants']['keep file cache']['decode_ms']:.2f} keeping the file cache), "
        f"{plain['decode_ms']:.2f} without.",
        ""
        if report.get("cold_read_us") is None
        else f"A cold 4 KiB read of the weight file (random pages, page cache dropped): "
        f"{report['cold_read_us']:.0f} us, the cost of one major fault above.",
        "",
        "Stored initializer bytes by consuming op:",
        "",
        "| consumers | MiB |",
        "|---|---|",
    ]
    lines += [f"| {name} | {size / MIB:.1f} |" for name, size in report["stored"].items()]
    lines += over_budget(report)
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def budget_ledger(report: dict[str, Any]) -> dict[str, int] | None:
    """The default variant's peak while generating against `pbs2p-edge bench`'s budget, and the stages the excess
    comes from; they add up to it exactly. None where the peak could not be reset after loading."""
    run = report["variants"]["default"]
    peak = run.get("generation_peak_rss")
    if peak is None or report.get("bare_session_rss") is None:
        return None
    rss = {point: values["rss"] for point, values in run["points"].items()}
    budget = report["bundle_bytes"] + run["kv_buffer_bytes"] + report["bare_session_rss"]
    return {
        "budget": budget,
        "peak": peak,
        "over": peak - budget,
        "imports": rss["before load"] - report["bare_session_rss"],
        "tokenizer": rss["after tokenizer"] - rss["before load"],
        "load": rss["after load"] - rss["after tokenizer"] - report["bundle_bytes"],
        "prepacking": anonymous_added_by_load(run)
        - anonymous_added_by_load(report["variants"]["no prepack"]),
        "generation": peak - rss["after load"] - run["kv_buffer_bytes"],
    }


def over_budget(report: dict[str, Any]) -> list[str]:
    ledger = budget_ledger(report)
    if ledger is None:
        return []
    run, tokenizer = report["variants"]["default"], report["tokenizer_alone"]
    rows = [
        ("bundle (every file)", report["bundle_bytes"]),
        ("KV cache buffers as allocated", run["kv_buffer_bytes"]),
        (
            "bare session (the runtime's libraries and a one-node onnxruntime session)",
            report["bare_session_rss"],
        ),
        ("**budget**", ledger["budget"]),
        ("**peak RSS while generating** (prompt and decode steps, after load)", ledger["peak"]),
        (f"**over the budget** (peak / budget {ledger['peak'] / ledger['budget']:.2f})", ledger["over"]),
        ("- before loading, beyond the bare session (importing the runtime)", ledger["imports"]),
        (
            "- loading the tokenizer (its file is in the bundle's bytes); in a process of its own it adds "
            f"{tokenizer['loaded'] / MIB:.1f} MiB, {tokenizer['live'] / MIB:.1f} live once the heap hands back what "
            "parsing freed, which the graph's load below reuses here",
            ledger["tokenizer"],
        ),
        (
            "- loading the graph, beyond the bundle's bytes (runtime copies of the weights against their stored "
            "bytes, onnxruntime's graph and kernels, code paged in)",
            ledger["load"],
        ),
        (
            "  (of the load: onnxruntime's prepacking, i.e. MatMulNBits' packed int4 weights, anonymous memory "
            "with prepacking - without; our op makes its tile copy when its kernel is created, in both)",
            ledger["prepacking"],
        ),
        (
            "- generating, beyond the KV buffers (activations, onnxruntime's arena, embedding rows and code paged in)",
            ledger["generation"],
        ),
    ]
    return [
        "",
        "Against the budget of `pbs2p-edge bench` (RSS / budget = peak RSS while generating / (bundle + KV cache "
        "+ bare session)), default variant; the four stages add up to the excess:",
        "",
        "| | MiB |",
        "|---|---|",
        *(f"| {name} | {value / MIB:.1f} |" for name, value in rows),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--pp", type=int, default=128)
    parser.add_argument("--tg", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="bench/results/NAME: writes NAME.md and NAME.json")
    parser.add_argument("--worker", choices=[*VARIANTS, TOKENIZER_PROBE], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is None:  # the workers' RSS baseline stays free of the peers module's imports
        from peers import exit_usage

        if not (args.bundle / "manifest.json").is_file():
            exit_usage(f"{args.bundle} is not a bundle (no manifest.json)")
        if min(args.pp, args.threads) < 1 or args.tg < 0:
            exit_usage("--pp and --threads must be at least 1, --tg at least 0")
    if args.worker == TOKENIZER_PROBE:
        print(json.dumps(tokenizer_worker(args.bundle)))
        return
    if args.worker:
        print(json.dumps(worker(args.bundle, args.worker, args.pp, args.tg, args.threads)))
        return
    from pbs2p_edge.runtime.bench import bare_session
    from pbs2p_edge.runtime.bundle import bundle_bytes

    report = {
        "bundle": str(args.bundle),
        "bundle_bytes": bundle_bytes(args.bundle),
        "bare_session_rss": bare_session(args.threads)["rss"],
        "threads": args.threads,
        "pp": args.pp,
        "tg": args.tg,
        "variants": {variant: _run_variant(args, variant) for variant in VARIANTS},
        "tokenizer_alone": _run_variant(args, TOKENIZER_PROBE),
        "stored": stored_bytes(args.bundle / "model.onnx"),
        "cold_read_us": cold_read_microseconds(args.bundle / "model.onnx.data"),
        "command": "bench/memory_breakdown.py " + " ".join(sys.argv[1:]),
    }
    text = markdown(report)
    print(text)
    if args.out:
        from peers import write_report

        write_report(args.out, report, text)


if __name__ == "__main__":
    main()
