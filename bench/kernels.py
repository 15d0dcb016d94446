"""Kernel benchmark: SparseBinaryMatMul vs ONNX Runtime MatMul (fp32) and MatMulNBits (4-bit, 2-bit if supported).

Every kernel path this CPU can run (Pbs2pOpsInfo "kernels", forced per session with PBS2P_KERNEL) is measured
as its own op `pbs2pN:M@path`. All ops run in the same process through onnxruntime sessions with the same intra-op thread count. Each
measured model holds enough distinct weight matrices (one node each, all reading the same X) that one run
streams more than 2x the 32 MiB L3, unless that would need more than MAX_NODES nodes (small shapes: then the
`cold` column is False and the row measures cache-resident weights). A memcpy probe in the same run gives
the bandwidth reference. Writes bench/results/kernels[-quick].md and .json.

    .venv/bin/python bench/kernels.py [--quick] [--threads 1 2] [--kernels avx512-vnni generic]
        [--baselines nbits4] [--rounds 5] [--salient S [S ...]] [--bias] [--out bench/results]

The pbs2p weights carry what `compress` writes by default: --salient defaults to PBS2PConfig().salient (1
salient column per group, hence alpha2 and a salient sign plane), without bias (q/k/v projections of some
families have one: --bias). Several --salient values measure each S as its own op, `pbs2pN:M/sS@path`,
interleaved with the others (the cost of the salient pass in one run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pbs2p_edge import ops
from pbs2p_edge.config import PBS2PConfig
from pbs2p_edge.format import information_floor_bits, pack, random_weight, runtime_bits_per_weight
from pbs2p_edge.runtime.bench import cpu_name

L3_BYTES = 32 << 20
TARGET_BYTES = 2 * L3_BYTES + (8 << 20)
MAX_NODES = 256
SMOL = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # (K in, rows out)
LLAMA = [(4096, 4096), (4096, 11008), (11008, 4096)]
NMS = [(6, 8), (5, 8), (4, 8)]
# paths whose GEMV streams the repacked tile layout (2.25 bpw + salient coefficients); the hybrid's prefill
# reads the disk arrays instead, so its GB/s at more than 8 tokens is understated by about 2.1 / 2.4
TILE_KERNELS = ("avx2", "neon", "avx512-vbmi-tile", "avx512-vnni-tile", "avxvnni-tile", "avx512-vnni+avx2")


def memcpy_gbps(threads: int, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes copied per second (numpy copy; numpy releases the GIL, so threads copy in parallel)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(nbytes), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]

    def copy(b: int, e: int) -> None:
        np.copyto(dst[b:e], src[b:e])

    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=copy, args=be) for be in bounds]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def make_model(nodes: list, inits: list, k: int, outputs: list[str]):
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        inits,
    )
    opsets = [
        helper.make_opsetid("", 17),
        helper.make_opsetid(ops.OP_DOMAIN, ops.OP_VERSION),
        helper.make_opsetid("com.microsoft", 1),
    ]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return model


def copies_for(bytes_per_copy: int) -> tuple[int, bool]:
    n = -(-TARGET_BYTES // max(bytes_per_copy, 1))
    return max(2, min(MAX_NODES, n)), min(MAX_NODES, n) * bytes_per_copy > 2 * L3_BYTES


def pbs2p_model(
    k: int, rows: int, n: int, m: int, seed: int, kernel: str, salient: int = 0, bias: bool = False
):
    p0 = pack(random_weight(rows, k, n, m, 128, salient=salient, bias=bias, seed=seed))
    # compact paths read the disk arrays in place; the tile paths (avx2, neon) stream the repacked 2.25-bit layout
    compact = kernel not in TILE_KERNELS
    runtime_bytes = p0.nbytes if compact else runtime_bits_per_weight(p0) * rows * k / 8
    copies, cold = copies_for(int(runtime_bytes))
    nodes, inits, outs = [], [], []
    for c in range(copies):
        # Same packed values under distinct names: each node reads its own initializer (or repacked buffer), which
        # is what defeats the caches, and packing large random layers 2-256 times would dominate the run time.
        p = p0
        names = []
        for name, arr in p.op_inputs():
            inits.append(numpy_helper.from_array(arr, f"w{c}.{name}"))
            names.append(f"w{c}.{name}")
        nodes.append(
            helper.make_node(ops.OP_TYPE, ["X", *names], [f"Y{c}"], domain=ops.OP_DOMAIN, **p.op_attributes())
        )
        outs.append(f"Y{c}")
    info = {
        "weight_bytes": runtime_bytes,
        "disk_bpw": p0.bits_per_weight,
        "read_bpw": runtime_bytes * 8 / (rows * k),
        "floor_bpw": information_floor_bits(p0),
    }
    return make_model(nodes, inits, k, outs), copies, cold, info


def ceilings(base_bpw: float, info: dict) -> list[float]:
    """The most a matmul streaming its weights at a baseline's GB/s can gain over it: the baseline's bits per
    weight over those of the layout the op reads, and over the information floor of the same values."""
    return [base_bpw / info["read_bpw"], base_bpw / info["floor_bpw"]]


def fp32_model(k: int, rows: int, seed: int, copies: int | None = None):
    nbytes = rows * k * 4
    if copies is None:
        copies, cold = copies_for(nbytes)
    else:
        cold = copies * nbytes > 2 * L3_BYTES
    rng = np.random.default_rng(seed)
    nodes, inits, outs = [], [], []
    for c in range(copies):
        w = (rng.standard_normal((k, rows), dtype=np.float32) * 0.02).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{c}"))
        nodes.append(helper.make_node("MatMul", ["X", f"W{c}"], [f"Y{c}"], name=f"mm{c}"))
        outs.append(f"Y{c}")
    return make_model(nodes, inits, k, outs), copies, cold, {"weight_bytes": nbytes}


def nbits_model(k: int, rows: int, seed: int, bits: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    per_copy = rows * k * bits // 8 + rows * (k // 32) * 4  # packed weights + fp32 scales per block of 32
    copies, cold = copies_for(per_copy)
    model, _, _, _ = fp32_model(k, rows, seed, copies)
    quant = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True, accuracy_level=4)
    quant.process()
    qmodel = quant.model.model
    if not any(nd.op_type == "MatMulNBits" for nd in qmodel.graph.node):
        raise RuntimeError(f"quantizer produced no MatMulNBits for bits={bits}")
    wbytes = sum(numpy_helper.to_array(t).nbytes for t in qmodel.graph.initializer) / copies
    return qmodel, copies, cold, {"weight_bytes": wbytes}


def build_model(op: str, k: int, rows: int, salient: int = 0, bias: bool = False):
    """(model, nodes, cold, info) for op in fp32 | nbits4 | nbits2 | pbs2pN:M@kernel | pbs2pN:M/sS@kernel."""
    if op == "fp32":
        return fp32_model(k, rows, 1)
    if op.startswith("nbits"):
        return nbits_model(k, rows, 1, int(op[len("nbits") :]))
    nm, kernel = op[len("pbs2p") :].split("@")
    if "/s" in nm:
        nm, sal = nm.split("/s")
        salient = int(sal)
    n, m = (int(v) for v in nm.split(":"))
    return pbs2p_model(k, rows, n, m, 7, kernel, salient, bias)


def make_session(model, threads: int, op: str = "") -> ort.InferenceSession:
    # the library reads PBS2P_KERNEL when a session creates the op's kernel
    if "@" in op:
        os.environ[ops.ENV_KERNEL] = op.split("@")[1]
    else:
        os.environ.pop(ops.ENV_KERNEL, None)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    ops.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def time_session(
    sess: ort.InferenceSession, copies: int, tokens: int, k: int, min_seconds: float
) -> list[float]:
    """Seconds per matmul of each run (after warm-up), running for at least min_seconds (3 runs minimum)."""
    x = np.random.default_rng(0).standard_normal((tokens, k), dtype=np.float32)
    feeds = {"X": x}
    for _ in range(2):
        sess.run(None, feeds)
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_seconds and len(times) < 200):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) / copies)
    return times


def nbits_supported(bits: int) -> bool:
    try:
        model, copies, _, _ = nbits_model(64, 32, 0, bits)
        time_session(make_session(model, 1), copies, 1, 64, 0.0)
        return True
    except Exception as exc:  # unsupported bit width in this onnxruntime build
        print(f"MatMulNBits {bits}-bit unavailable: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes / token counts, shorter timing")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shapes", nargs="+", metavar="KxROWS", help="override the shape list, e.g. 4096x4096")
    ap.add_argument("--tokens", type=int, nargs="+", help="override the token counts (M)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument(
        "--kernels", nargs="+", help="kernel paths to measure (default: every path this CPU runs)"
    )
    ap.add_argument(
        "--baselines", nargs="+", help="baseline ops (default: fp32, nbits4, nbits2 if supported)"
    )
    ap.add_argument(
        "--nm", nargs="+", metavar="N:M", help="N:M patterns (default 6:8 5:8 4:8; quick 6:8 4:8)"
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="round-robin rounds (the speedup spread is over rounds)"
    )
    ap.add_argument("--stem", help="output file stem (default kernels or kernels-quick)")
    ap.add_argument(
        "--salient",
        type=int,
        nargs="+",
        default=[PBS2PConfig().salient],
        help="salient columns per group of the pbs2p weights (default: what compress writes, %(default)s)",
    )
    ap.add_argument("--bias", action="store_true", help="pbs2p weights with a bias")
    args = ap.parse_args()

    import logging

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    shapes = [(576, 1536), (4096, 4096)] if args.quick else SMOL + LLAMA
    token_counts = [1, 128] if args.quick else [1, 16, 128]
    if args.shapes:
        shapes = [tuple(int(v) for v in sh.lower().split("x")) for sh in args.shapes]
    if args.tokens:
        token_counts = args.tokens
    nms = [(6, 8), (4, 8)] if args.quick else NMS
    if args.nm:
        nms = [tuple(int(v) for v in nm.split(":")) for nm in args.nm]
    rounds = args.rounds
    if any(not 0 <= s <= 128 for s in args.salient):
        print(f"error: --salient {args.salient}: each must be 0..128 (group size 128)", file=sys.stderr)
        return 2
    slice_seconds = 0.1 if args.quick else 0.25
    if args.baselines:
        baselines = [b for b in args.baselines if not b.startswith("nbits") or nbits_supported(int(b[5:]))]
    else:
        baselines = ["fp32"] + [f"nbits{b}" for b in (4, 2) if nbits_supported(b)]
    usable = ops.library_info(ops.library_path()).kernels
    kernels = args.kernels or list(usable)
    for kernel in kernels:
        if kernel not in usable:
            print(
                f"error: kernel {kernel} cannot run on this CPU (usable: {', '.join(usable)})",
                file=sys.stderr,
            )
            return 2

    env = {
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "nproc": os.cpu_count(),
        "ops_library": str(ops.library_path()),
        "kernel_override": os.environ.get(ops.ENV_KERNEL, ""),
        "loadavg_start": os.getloadavg(),
        "salient": args.salient,
        "bias": args.bias,
    }
    memcpy = {t: memcpy_gbps(t) for t in args.threads}
    print(f"memcpy GB/s: {memcpy}", flush=True)
    rows_out = []
    sal_tags = [f"/s{s}" for s in args.salient] if len(args.salient) > 1 else [""]
    op_names = baselines + [
        f"pbs2p{n}:{m}{tag}@{kernel}" for n, m in nms for tag in sal_tags for kernel in kernels
    ]
    for k, rows in shapes:
        built = {op: build_model(op, k, rows, args.salient[0], args.bias) for op in op_names}
        sessions = {(op, th): make_session(built[op][0], th, op) for op in op_names for th in args.threads}
        for th in args.threads:
            for tokens in token_counts:
                # Round-robin over the ops so a noisy neighbour on the shared machine hits all of them alike.
                samples: dict[str, list[float]] = {op: [] for op in op_names}
                round_med: dict[str, list[float]] = {op: [] for op in op_names}
                for _ in range(rounds):
                    for op in op_names:
                        got = time_session(sessions[(op, th)], built[op][1], tokens, k, slice_seconds)
                        samples[op].extend(got)
                        round_med[op].append(statistics.median(got))
                med = {op: statistics.median(v) for op, v in samples.items()}
                for op in op_names:
                    _, copies, cold, info = built[op]
                    row = dict(
                        op=op,
                        k=k,
                        rows=rows,
                        tokens=tokens,
                        threads=th,
                        seconds=med[op],
                        min_seconds=min(samples[op]),
                        runs=len(samples[op]),
                        copies=copies,
                        cold=cold,
                        **info,
                    )
                    if op.startswith("pbs2p"):
                        for base in baselines:
                            row[f"speedup_vs_{base}"] = med[base] / med[op]
                            per_round = [b / o for b, o in zip(round_med[base], round_med[op], strict=True)]
                            row[f"spread_vs_{base}"] = [min(per_round), max(per_round)]
                            base_bpw = built[base][3]["weight_bytes"] * 8 / (k * rows)
                            row[f"ceiling_vs_{base}"] = ceilings(base_bpw, info)
                    rows_out.append(row)
                    extra = " ".join(
                        f"x{row[f'speedup_vs_{b}']:.2f} vs {b}" for b in baselines if f"speedup_vs_{b}" in row
                    )
                    print(f"{op:>9} {k}x{rows} M={tokens} t={th}: {med[op] * 1e3:.3f} ms {extra}", flush=True)
        del sessions, built
        write_results(args, env, memcpy, baselines, rows_out, partial=(k, rows) != shapes[-1])
    return 0


def write_results(args, env: dict, memcpy: dict, baselines: list, rows_out: list, partial: bool) -> None:
    """(Re)write the markdown + json after every shape, so an interrupted run keeps what it measured."""
    for r in rows_out:
        r["weight_gbps"] = r["weight_bytes"] / r["seconds"] / 1e9
        r["ratio_to_memcpy"] = r["weight_gbps"] / memcpy[r["threads"]]
    env["loadavg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("kernels-quick" if args.quick else "kernels")
    result = {
        "env": env,
        "memcpy_gbps": memcpy,
        "baselines": baselines,
        "rows": rows_out,
        "partial": partial,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(render_markdown(result))
    print(f"wrote {args.out / (stem + '.md')}")


def _salient_text(sal: int | list[int]) -> str:
    if isinstance(sal, int):
        return str(sal)
    return str(sal[0]) if len(sal) == 1 else " or ".join(map(str, sal)) + " (op suffix /sS)"


def _versus(row: dict, base: str) -> str:
    """The speedup and ceiling cells of a pbs2p row against one baseline (empty for the baselines' own rows)."""
    if f"speedup_vs_{base}" not in row:
        return " | "
    low, high = row[f"spread_vs_{base}"]
    speed = f"{row[f'speedup_vs_{base}']:.2f}x [{low:.2f}-{high:.2f}]"
    ceiling = row.get(f"ceiling_vs_{base}")  # absent from results written before session 22
    return speed + " | " + (f"{ceiling[0]:.2f}x / {ceiling[1]:.2f}x" if ceiling else "")


def render_markdown(res: dict) -> str:
    env, base = res["env"], res["baselines"]
    lines = [
        f"# Kernel benchmark ({'quick' if 'quick' in res['command'] else 'full'})"
        + (" - PARTIAL (interrupted or still running)" if res.get("partial") else ""),
        "",
        f"`{res['command']}` on {env['cpu']} ({env['nproc']} cores), onnxruntime {env['onnxruntime']}, "
        f"load average {env['loadavg_start'][0]:.2f} at start / {env['loadavg_end'][0]:.2f} at end (shared machine).",
        "",
        f"pbs2p weights: 128-column groups, {_salient_text(env.get('salient', 0))} salient column(s) per group"
        + (", with bias" if env.get("bias") else ", no bias")
        + " (`--salient`, `--bias`); bpw = bits the op reads per weight.",
        "",
        "memcpy probe (bytes copied per second, numpy, same process): "
        + ", ".join(f"{t} thread(s): {g:.1f} GB/s" for t, g in res["memcpy_gbps"].items()),
        "",
        "Time is per matmul: median over all runs (ops measured round-robin, `--rounds` rounds as in the command) "
        "of run time / nodes. "
        "Weight GB/s = bytes the op reads for its weights (pbs2p compact paths: the disk arrays in place, "
        "mask + kept signs + fp16 scales (+ salient signs and alpha2); pbs2p tile paths "
        "avx2/neon/avx512-vbmi-tile/avx512-vnni-tile/avxvnni-tile and "
        "the hybrid avx512-vnni+avx2: the repacked tile layout, 2.25 bpw + salient coefficients; "
        "MatMulNBits: packed weights + scales; fp32: 4 bytes/weight) divided by time. `cold` = the nodes' "
        "weights together exceed 2x L3, so they stream from DRAM. Speedup: ratio of medians, and in brackets "
        "the lowest and highest ratio of the per-round medians. Ceiling: the baseline's bits per weight over the "
        "op's, i.e. the most a kernel streaming at the baseline's GB/s can gain: for the layout the op reads, and "
        "for the information floor of the same values (the N:M mask at its entropy, log2 C(M,N) / M bits per "
        "weight; `information_floor_bits`), which no layout can beat.",
        "",
        "| op | K x rows | M | threads | time ms | bpw | weight GB/s | / memcpy | cold | "
        + " | ".join(f"speedup vs {b} | ceiling vs {b}: layout / floor" for b in base)
        + " |",
        "|---|---|---|---|---|---|---|---|---|" + "---|---|" * len(base),
    ]
    for r in res["rows"]:
        sp = " | ".join(_versus(r, b) for b in base)
        lines.append(
            f"| {r['op']} | {r['k']}x{r['rows']} | {r['tokens']} | {r['threads']} | {r['seconds'] * 1e3:.3f} | "
            f"{r['weight_bytes'] * 8 / (r['k'] * r['rows']):.2f} | "
            f"{r['weight_gbps']:.1f} | {r['ratio_to_memcpy']:.2f} | {'yes' if r['cold'] else 'no'} | {sp} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
