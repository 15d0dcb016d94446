"""Dynamic instruction counts of the aarch64 kernels per weight and token, under qemu-user (no Raspberry Pi needed).

qemu runs one instruction per translation block (-singlestep) and logs every executed block (-d exec,nochain);
each program counter is looked up in the disassembly of a non-PIE cross build of pbs2p_kernel_bench and counted
when it lies in a kernel function. The counts are exact for the instruction stream (the same on any ARMv8.2 core).
They are binned by the pipes a Cortex-A76 (Raspberry Pi 5) issues them to: vector/FP (2 pipes), load/store
(2 pipes), integer (3 pipes), branch; "A76 issue bound" = the busiest of V/2, (load+store)/2, integer/3 and
total/4 (decode width), in cycles per weight and token: a lower bound from throughput alone (no latencies, caches
or memory bandwidth), not a measurement. docs/FORMAT.md section 6.

    python3 scripts/arm_insn_count.py [--rows 64] [--k 512] [--tokens 1 4 16 64] [--kernels sdot neon]

Needs aarch64-linux-gnu-g++, aarch64-linux-gnu-objdump, qemu-aarch64 and cmake. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNEL_FUNCS = re.compile(r"pbs2p::(rows_sdot|tile_neon)\b|take_bits|pdep64")
ACT_FUNCS = re.compile(r"pbs2p::(build_tables_\w+|quantize_tokens|quantize_chunk)\b")
LOADS = re.compile(r"^(ldr|ldp|ldu|ld1|ld2|ld3|ld4|ldnp|prfm)")
STORES = re.compile(r"^(str|stp|stu|st1|st2|st3|st4|stnp)")
BRANCHES = re.compile(r"^(b|bl|br|blr|ret|cbz|cbnz|tbz|tbnz)(\.|$)")
VREG = re.compile(r"(^|[\s,{\[])([vqdsbh])\d+(\.|\b)")


def build(build_dir: Path) -> Path:
    cfg = [
        "cmake", "-S", str(REPO / "custom_ops"), "-B", str(build_dir), "-DPBS2P_BUILD_OP=OFF",
        "-DPBS2P_BUILD_TESTS=ON", "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_SYSTEM_NAME=Linux",
        "-DCMAKE_SYSTEM_PROCESSOR=aarch64", "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
        "-DCMAKE_EXE_LINKER_FLAGS=-no-pie",
    ]  # fmt: skip
    for cmd in (cfg, ["cmake", "--build", str(build_dir), "--target", "pbs2p_kernel_bench", "-j", "2"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"error: {' '.join(cmd[:3])} failed: {(r.stdout + r.stderr).strip().splitlines()[-1:]}")
    return build_dir / "pbs2p_kernel_bench"


def pipe_class(mnemonic: str, operands: str) -> str:
    if LOADS.match(mnemonic):
        return "load"
    if STORES.match(mnemonic):
        return "store"
    if BRANCHES.match(mnemonic):
        return "branch"
    if mnemonic.startswith(("f", "scvtf", "ucvtf")) or VREG.search(operands):
        return "vector"
    return "integer"


def disassemble(binary: Path) -> dict[int, tuple[str, str]]:
    """pc -> (bin: 'kernel' | 'act' | '', pipe class) for every instruction of the text section."""
    out = subprocess.run(
        ["aarch64-linux-gnu-objdump", "-d", "-C", "--no-show-raw-insn", str(binary)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    table: dict[int, tuple[str, str]] = {}
    func = ""
    for line in out.splitlines():
        head = re.match(r"^([0-9a-f]+) <(.*)>:$", line)
        if head:
            name = head.group(2)
            func = "kernel" if KERNEL_FUNCS.search(name) else "act" if ACT_FUNCS.search(name) else ""
            continue
        ins = re.match(r"^\s+([0-9a-f]+):\s+(\S+)\s*(.*)$", line)
        if ins and func:
            table[int(ins.group(1), 16)] = (func, pipe_class(ins.group(2), ins.group(3)))
    return table


def count(
    binary: Path, table: dict[int, tuple[str, str]], rows: int, k: int, tokens: int, kernel: str
) -> Counter:
    cmd = [
        "qemu-aarch64", "-cpu", "max", "-L", "/usr/aarch64-linux-gnu", "-singlestep", "-d", "exec,nochain",
        "-D", "/dev/stderr", str(binary), str(rows), str(k), str(tokens), kernel, "1",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    counts: Counter = Counter()
    for line in proc.stderr:
        if line.startswith("Trace"):
            hit = table.get(int(line.split("/")[1], 16))
            if hit:
                counts[hit] += 1
    if proc.wait() != 0:
        sys.exit(f"error: {' '.join(cmd)} failed")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--kernels", nargs="+", default=["sdot", "neon"])
    ap.add_argument("--build-dir", type=Path, default=REPO / "build" / "kernel-tests" / "aarch64-insn-count")
    args = ap.parse_args()
    binary = build(args.build_dir)
    table = disassemble(binary)
    print(
        "| path | tokens | instructions / weight / token | vector | load+store | integer | A76 issue bound, "
        "cycles / weight / token | activation side / column / token |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for t in args.tokens:
        for kern in args.kernels:
            c = count(binary, table, args.rows, args.k, t, kern)
            wt = args.rows * args.k * t
            cls = Counter()
            for (where, pipe), n in c.items():
                if where == "kernel":
                    cls[pipe] += n
            total = sum(cls.values())
            act = sum(n for (where, _), n in c.items() if where == "act")
            ls = cls["load"] + cls["store"]
            bound = max(cls["vector"] / 2, ls / 2, cls["integer"] / 3, total / 4) / wt
            print(
                f"| {kern} | {t} | {total / wt:.3f} | {cls['vector'] / wt:.3f} | {ls / wt:.3f} | "
                f"{cls['integer'] / wt:.3f} | {bound:.3f} | {act / (args.k * t):.1f} |"
            )
            sys.stdout.flush()
    print(
        f"\n({args.rows} x {args.k} weight, 6:8, group 128, no salient / bias; one call per path under "
        "qemu-aarch64 -cpu max; activation side = the tile tables (neon) or the int7 quantization (sdot), "
        "paid once per token and column)"
    )


if __name__ == "__main__":
    main()
