"""Our bundles against their peers on one model: ORT GenAI's model builder int4 and llama.cpp on a GGUF.

Every system runs in its own process (ours: `pbs2p_edge.runtime.bench_worker`; peers: bench/peer_worker.py,
same protocol, same prompt ids from the same seeds) with the same thread count. The processes load one after
another, then the repetitions run interleaved (pp of every system, then tg of every system, rep by rep), so a
busy machine slows every system alike; each rep's ratio to the reference bundle is taken within that rep.
Reported (llama-bench style): pp and tg tokens/s (mean, min-max over reps), peak RSS while generating, size
on disk, and each as a ratio to the reference (our PBS2P bundle). Writes OUT.md and OUT.json.

    make install-peers   # onnxruntime-genai, onnx-ir, llama-cpp-python built from source (-DGGML_NATIVE=ON)
    .venv/bin/python bench/peers.py --model default --bundle pbs2p=out/pbs2p --bundle int4=out/int4 \
        --genai-dir out/genai-int4 --threads 2 --reps 5 --out bench/results/peers-smollm2

--model takes 'default', an embedded model's name (`pbs2p-edge models`) or a Hugging Face folder; the GGUF
defaults to the embedded model's shipped file (--gguf overrides). --genai-dir is built with
`python -m onnxruntime_genai.models.builder -i HF_FOLDER -o DIR -p int4 -e cpu` when it does not exist yet.
Optional extra: never part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from pbs2p_edge.runtime.bench import JsonLinesProcess, cpu_name

HERE = Path(__file__).resolve().parent
PEER_WORKER = HERE / "peer_worker.py"
KINDS = ("ours", "genai", "llamacpp")
MB = 1e6


class UsageError(Exception):
    """Bad arguments or inputs: printed as one `error:` line, exit 2."""


@dataclass(frozen=True)
class System:
    label: str
    kind: str  # one of KINDS
    path: Path


def parse_bundle(text: str) -> System:
    """`LABEL=PATH` -> an `ours` system."""
    label, sep, path = text.partition("=")
    if not sep or not label.strip() or not path.strip():
        raise UsageError(f"--bundle takes LABEL=PATH (e.g. pbs2p=out/pbs2p), got {text!r}")
    return System(label.strip(), "ours", Path(path.strip()))


def check_systems(systems: Sequence[System]) -> None:
    labels = [s.label for s in systems]
    if not any(s.kind == "ours" for s in systems):
        raise UsageError(
            "give at least one of our bundles with --bundle LABEL=PATH (the first is the reference)"
        )
    if len(set(labels)) != len(labels):
        raise UsageError(f"system labels must be distinct, got {', '.join(labels)}")
    for system in systems:
        if system.kind == "ours" and not (system.path / "manifest.json").is_file():
            raise UsageError(f"{system.path} is not a bundle (no manifest.json)")
        if system.kind == "llamacpp" and not system.path.is_file():
            raise UsageError(f"GGUF {system.path} does not exist")


# ------------------------------------------------------------------------------------------ statistics


def spread(values: Sequence[float]) -> dict[str, float]:
    """mean, min, max and (max - min) / mean of a list of positive samples."""
    if not values:
        raise ValueError("no samples")
    mean = sum(values) / len(values)
    return {
        "mean": mean,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / mean if mean else 0.0,
    }


def summarize(samples: dict[str, dict[str, list[float]]], reference: str) -> dict[str, dict[str, Any]]:
    """Per system: tokens/s statistics, and per-rep ratios to the reference (same rep, interleaved)."""
    out: dict[str, dict[str, Any]] = {}
    ref = samples[reference]
    for label, runs in samples.items():
        row: dict[str, Any] = {}
        for test in ("pp", "tg"):
            row[test] = spread(runs[test])
            row[f"{test}_ratio"] = spread([r / o for r, o in zip(ref[test], runs[test], strict=True)])
        out[label] = row
    return out


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else float("nan")


# ------------------------------------------------------------------------------------------ formatting


def _rate(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.1f} ({stat['min']:.1f}-{stat['max']:.1f})"


def _times(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.2f}x ({stat['min']:.2f}-{stat['max']:.2f})"


def markdown(report: dict[str, Any]) -> str:
    """The llama-bench-style table of a report (as written to OUT.json), plus its settings and notes."""
    s = report["settings"]
    ref = report["reference"]
    pp, tg = f"pp{s['pp']}", f"tg{s['tg']}"
    lines = [
        f"# Peers on {report['model']} ({s['threads']} threads, {s['reps']} interleaved reps)",
        "",
        f"Ratios are `{ref}` (our PBS2P bundle) over each system, per rep, then mean (min-max): "
        "above 1 means ours is faster (pp, tg) or, for size and RSS, ours is larger.",
        "",
        f"| system | {pp} tok/s | {tg} tok/s | peak RSS MB | size MB | {pp} ours/it | {tg} ours/it "
        "| RSS ours/it | size ours/it |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = report["systems"]
    base = rows[ref]
    for label, row in rows.items():
        rss, size = row["peak_rss_generation_bytes"], row["bundle_bytes"]
        lines.append(
            f"| {label} ({row['kind']}) | {_rate(row['pp'])} | {_rate(row['tg'])} | {rss / MB:.0f} | "
            f"{size / MB:.1f} | {_times(row['pp_ratio'])} | {_times(row['tg_ratio'])} | "
            f"{ratio(base['peak_rss_generation_bytes'], rss):.2f}x | {ratio(base['bundle_bytes'], size):.2f}x |"
        )
    lines += ["", "Systems:"]
    lines += [f"- `{label}`: {row['description']}" for label, row in rows.items()]
    machine = report["machine"]
    lines += [
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['platform']}; "
        f"{machine['date']}. Versions: {json.dumps(report['versions'])}.",
        f"Prompt ids: numpy default_rng(seed) over the vocabulary ({report['vocab_size']}), the same for every "
        f"system; warmup {s['warmup']} rep(s) not counted. Command: `{report['command']}`.",
    ]
    if report.get("note"):
        lines += ["", f"Note: {report['note']}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ workers


class Worker(JsonLinesProcess):
    """One system's process and its JSON-lines conversation."""

    def __init__(self, system: System, threads: int, context: int, vocab_size: int) -> None:
        from pbs2p_edge.runtime.session import DEFAULT_PREFILL_CHUNK

        self.system = system
        if system.kind == "ours":
            command = [sys.executable, "-m", "pbs2p_edge.runtime.bench_worker", str(system.path.resolve())]
            command += ["--threads", str(threads)]
            command += ["--prefill-chunk", str(DEFAULT_PREFILL_CHUNK)] if DEFAULT_PREFILL_CHUNK else []
        else:
            command = [sys.executable, str(PEER_WORKER), system.kind, str(system.path.resolve())]
            command += ["--threads", str(threads), "--context", str(context), "--vocab-size", str(vocab_size)]
        super().__init__(command, system.label, UsageError)


def build_genai(hf_folder: Path, out: Path, threads: int) -> None:
    """Run ORT GenAI's model builder (int4, cpu) into `out` (atomically), then pin its intra-op threads."""
    tmp = out.with_name(out.name + ".tmp")
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder)]
    command += ["-o", str(tmp), "-p", "int4", "-e", "cpu", "-c", str(tmp) + "-cache"]
    print(f"building {out} with: {' '.join(command)}", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()
        raise UsageError(f"the ORT GenAI model builder failed: {tail[-1] if tail else done.returncode}")
    tmp.rename(out)
    set_genai_threads(out, threads)


def set_genai_threads(folder: Path, threads: int) -> None:
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    path.write_text(json.dumps(config, indent=4) + "\n")


def describe(system: System) -> str:
    if system.kind == "ours":
        manifest = json.loads((system.path / "manifest.json").read_text())
        return f"our bundle {system.path} ({manifest['weights']} weights, {manifest['head']} head)"
    if system.kind == "genai":
        return f"ORT GenAI model builder int4 (-p int4 -e cpu), {system.path}, run by onnxruntime_genai"
    return f"llama.cpp through llama-cpp-python on {system.path}"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("onnxruntime", "onnxruntime-genai", "llama-cpp-python", "pbs2p-edge"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def reference_vocab(systems: Sequence[System]) -> int:
    return int(json.loads((systems[0].path / "manifest.json").read_text())["vocab_size"])


def measure(systems: Sequence[System], args: argparse.Namespace) -> dict[str, Any]:
    context = args.pp + args.tg + 16
    vocab = reference_vocab(systems)
    workers: list[Worker] = []
    try:
        for system in systems:  # loaded one after another: load times do not compete
            print(f"loading {system.label}", file=sys.stderr, flush=True)
            workers.append(Worker(system, args.threads, context, vocab))
        samples: dict[str, dict[str, list[float]]] = {s.label: {"pp": [], "tg": []} for s in systems}
        for rep in range(args.warmup + args.reps):
            for test, n in (("pp", args.pp), ("tg", args.tg)):
                for worker in workers:
                    reply = worker.request(test, n=n, seed=rep)
                    if rep >= args.warmup:
                        samples[worker.system.label][test].append(n / reply["seconds"])
            if rep >= args.warmup:
                latest = {label: {t: round(v[t][-1], 1) for t in v} for label, v in samples.items()}
                print(f"rep {rep - args.warmup + 1}/{args.reps}: {latest}", file=sys.stderr, flush=True)
        memory = {w.system.label: w.request("mem") for w in workers}
        infos = {w.system.label: w.info for w in workers}
    finally:
        for worker in workers:
            worker.close()
    stats = summarize(samples, systems[0].label)
    rows = {}
    for system in systems:
        rows[system.label] = {
            "kind": system.kind,
            "path": str(system.path),
            "description": describe(system),
            "bundle_bytes": infos[system.label]["bundle_bytes"],
            "load_seconds": infos[system.label]["load_seconds"],
            "peak_rss_generation_bytes": memory[system.label]["peak_rss_generation"],
            "peak_rss_exact": memory[system.label]["exact_peak"],
            "samples_tokens_per_second": samples[system.label],
            **stats[system.label],
        }
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/peers.py", description=__doc__.split("\n\n")[0])
    parser.error = lambda message: (_ for _ in ()).throw(UsageError(message))  # type: ignore[method-assign]
    parser.add_argument(
        "--model", default="default", help="'default', an embedded model's name, or an HF folder"
    )
    parser.add_argument("--bundle", action="append", default=[], help="LABEL=PATH of our bundle (repeatable)")
    parser.add_argument("--genai-dir", type=Path, help="ORT GenAI builder output (built if missing)")
    parser.add_argument("--gguf", type=Path, help="GGUF for llama.cpp [default: the model's shipped GGUF]")
    parser.add_argument("--skip", action="append", default=[], choices=["genai", "llamacpp"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pp", type=int, default=128)
    parser.add_argument("--tg", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--note", default="", help="A line written under the table (e.g. machine load).")
    parser.add_argument("--out", type=Path, required=True, help="Output stem: writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    for name in ("threads", "pp", "tg", "reps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if "genai" not in args.skip and args.genai_dir is None:
        raise UsageError("give --genai-dir DIR (built there if missing) or --skip genai")
    args.bundle = [parse_bundle(text) for text in args.bundle]
    return args


def resolve_systems(args: argparse.Namespace) -> tuple[list[System], Path | None]:
    from pbs2p_edge import sources

    systems = list(args.bundle)
    hf_folder = None
    if "genai" not in args.skip:
        if not args.genai_dir.exists():
            hf_folder = sources.model_files(None if args.model == "default" else args.model)
        systems.append(System("ort-genai-int4", "genai", args.genai_dir))
    if "llamacpp" not in args.skip:
        gguf = args.gguf
        if gguf is None:
            named = sources.resolve_name(args.model)
            if named is None:
                raise UsageError(f"--model {args.model} is not an embedded model: give its GGUF with --gguf")
            gguf = sources.embedded_gguf(named)
        systems.append(System(f"llama.cpp-{Path(gguf).stem}", "llamacpp", Path(gguf)))
    check_systems(systems)
    return systems, hf_folder


def main(argv: Sequence[str] | None = None) -> int:
    from pbs2p_edge.errors import Pbs2pError

    try:
        args = parse_args(argv)
        systems, hf_folder = resolve_systems(args)
        if hf_folder is not None:
            build_genai(hf_folder, args.genai_dir, args.threads)
        elif "genai" not in args.skip:
            set_genai_threads(args.genai_dir, args.threads)
        rows = measure(systems, args)
    except (UsageError, Pbs2pError, OSError) as exc:
        print(
            f"error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
            file=sys.stderr,
        )
        return 2
    vocab = reference_vocab(systems)
    report = {
        "model": args.model,
        "reference": systems[0].label,
        "vocab_size": vocab,
        "settings": {k: getattr(args, k) for k in ("threads", "pp", "tg", "reps", "warmup")},
        "systems": rows,
        "machine": machine(),
        "versions": versions(),
        "command": shlex.join(["bench/peers.py", *(sys.argv[1:] if argv is None else argv)]),
        "note": args.note,
    }
    write_report(args.out, report, markdown(report))
    print(markdown(report))
    return 0


def exit_usage(message: str) -> NoReturn:
    """Bad arguments or inputs in a bench script: one `error:` line on stderr, exit 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def print_report(out: Path | None, report: dict[str, Any], lines: list[str]) -> None:
    """Print a bench script's md lines; with `out`, also write OUT.json (the report) and OUT.md."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        write_report(out, report, text)


def write_report(out: Path, report: dict[str, Any], text: str) -> None:
    """OUT.json (the report) and OUT.md (its table), each written whole or not at all."""
    write_atomic(out.with_name(out.name + ".json"), json.dumps(report, indent=2) + "\n")
    write_atomic(out.with_name(out.name + ".md"), text)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
