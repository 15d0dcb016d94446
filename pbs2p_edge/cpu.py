"""What the CPU computes natively, read from the kernel's feature flags (no torch)."""

from __future__ import annotations

from pathlib import Path

# x86 flags (avx512_bf16: VDPBF16PS; amx_bf16: AMX tiles) and the arm64 "bf16" feature (BFDOT / BFMMLA)
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags ("flags" on x86, "Features" on arm64); empty where there is no cpuinfo."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU has bf16 dot-product instructions."""
    return not _BF16_FLAGS.isdisjoint(cpu_flags(cpuinfo))
