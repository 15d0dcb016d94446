"""Resident-set-size measurement of this process: current, peak, and peak over a block of code.

On Linux the kernel keeps the exact peak (VmHWM) and lets a process reset it (`echo 5 > /proc/self/clear_refs`,
Linux >= 4.0), so the peak over a block is exact. Elsewhere a background thread samples RSS every millisecond
or so, which can miss short spikes.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np
import psutil

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def current_rss() -> int:
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """Peak RSS of this process since start (or since the last `reset_peak_rss`)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS; False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def libc_madvise() -> Callable[[int, int, int], int]:
    """The C library's madvise(addr, length, advice) -> 0 or -1 (errno kept); OSError/AttributeError where
    there is none."""
    import ctypes

    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


_MADV_RANDOM = 1  # no read-ahead on faults in this range
_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now; their contents are kept (re-read on access)


def release_file_pages(path: Path, drop_cache: bool = True) -> int:
    """Hand the resident pages of this process's mappings of `path` back to the kernel; return bytes advised.

    onnxruntime maps external-data initializers from the file. Kernels that repack their weights at load
    (our sparse-binary op, prepacked MatMul) never read those pages again, yet they stay resident and count
    in RSS. MADV_PAGEOUT drops them without changing any data: a page that is read later (an embedding row)
    simply faults back in from the file. The range is also marked random-access: an embedding row then faults
    in its own page instead of a read-ahead window (128 KiB by default) around it, which had added ~10 MiB
    of RSS over a 128-token prompt on the default model (bench/results/memory-smollm2.md).

    Finally the file's clean pages are dropped from the page cache (POSIX_FADV_DONTNEED). Loading left them
    cached in large folios, and a fault maps a whole cached folio: at 1.5B a 128-token prompt brought back
    ~61 MiB of embedding rows (~480 KiB per token) where dropping the cache first brought back 1.6 MiB. The
    cost: the first use of a token reads its row from disk (two 4 KiB pages; bench/memory_breakdown.py times
    one), and the next load of the same bundle reads the file from disk (`drop_cache=False` keeps it cached).
    Best effort: does nothing where unsupported (non-Linux, old kernels).
    """
    target = str(path.resolve())
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
        madvise = libc_madvise()
    except (OSError, AttributeError):
        return 0
    advised = 0
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if madvise(start, end - start, _MADV_PAGEOUT) == 0:
                advised += end - start
            madvise(start, end - start, _MADV_RANDOM)
    if advised and drop_cache:
        _drop_cached_pages(target)
    return advised


_MADV_COLLAPSE = 25  # Linux >= 6.1: back this range with transparent huge pages now (synchronous)
_DEFAULT_HUGE_PAGE = 2 << 20


def huge_page_size() -> int:
    """The transparent huge page size (2 MiB on x86-64 and 4 KiB-page arm64; 32 MiB with 16 KiB pages)."""
    try:
        return int(Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return _DEFAULT_HUGE_PAGE


def anonymous_mappings(min_bytes: int) -> list[tuple[int, int]]:
    """(start, end) of this process's writable anonymous mappings (the heap included) of at least `min_bytes`."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) >= 5 and fields[1].startswith("rw") and (len(fields) == 5 or fields[5] == "[heap]"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end - start >= min_bytes:
                ranges.append((start, end))
    return ranges


def resident_blocks(start: int, end: int, block: int, pagemap: BinaryIO) -> list[int]:
    """Start addresses of the `block`-aligned blocks inside [start, end) whose every page is present, read from
    this process's pagemap (bit 63 of each page's 8-byte entry; readable without privileges), 64 blocks at a
    time so a large sparse mapping costs no large read."""
    page = os.sysconf("SC_PAGE_SIZE")
    per_block = block // page
    first, last = -(-start // block) * block, end // block * block
    starts: list[int] = []
    for piece in range(first, last, 64 * block):
        blocks = min(64, (last - piece) // block)
        pagemap.seek(piece // page * 8)
        entries = np.frombuffer(pagemap.read(blocks * per_block * 8), dtype="<u8")
        if entries.size != blocks * per_block:
            break
        full = (entries >> np.uint64(63)).astype(bool).reshape(blocks, per_block).all(axis=1)
        starts += [piece + i * block for i in np.flatnonzero(full).tolist()]
    return starts


def resident_huge_blocks() -> set[int]:
    """Start addresses of the huge-page-sized, aligned blocks of this process's anonymous memory whose every
    page is resident (empty where /proc/self/pagemap cannot be read)."""
    huge = huge_page_size()
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            return {
                b
                for start, end in anonymous_mappings(huge)
                for b in resident_blocks(start, end, huge, pagemap)
            }
    except OSError:
        return set()


def collapse_to_huge_pages(exclude: set[int] | None = None) -> int:
    """Move the fully resident blocks of this process's anonymous memory, except those in `exclude` (a
    `resident_huge_blocks()` taken earlier), onto transparent huge pages; return the bytes now on huge pages
    there (collapsed by this call or already huge).

    After load, the weights a decode step streams are the kernels' own copies (our op's tile layout,
    onnxruntime's prepacked MatMulNBits) in anonymous memory, on 4 KiB pages where transparent huge pages are
    `madvise`-only: streaming hundreds of MiB through them misses the TLB on every page of every stream.
    MADV_COLLAPSE moves each huge-page-aligned block onto one huge page. Blocks with a page never touched are
    left alone, so RSS does not grow; `exclude` keeps it to what a load added (a process holding a PyTorch
    model is not copied). Best effort: does nothing where unsupported (non-Linux, kernels before 6.1, THP
    disabled).
    """
    if not sys.platform.startswith("linux"):
        return 0
    try:
        madvise = libc_madvise()
    except (OSError, AttributeError):
        return 0
    huge = huge_page_size()
    blocks = sorted(resident_huge_blocks() - (exclude or set()))
    collapsed = 0
    run_start = 0
    for i, block in enumerate(blocks):  # one madvise per run of adjacent blocks
        if i + 1 == len(blocks) or blocks[i + 1] != block + huge:
            first, last = blocks[run_start], block + huge
            if madvise(first, last - first, _MADV_COLLAPSE) == 0:
                collapsed += last - first
            run_start = i + 1
    return collapsed


def _drop_cached_pages(path: str) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_mappings(path: Path) -> list[dict[str, str]]:
    """The /proc/self/smaps fields (`Rss`, `VmFlags`, ...: the text after the colon) of each of this process's
    mappings of `path`; empty where smaps does not exist (non-Linux)."""
    target = str(path.resolve())
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return []
    mappings: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for line in lines:
        head = line.split(maxsplit=5)
        # a mapping's header: range perms offset dev inode [path]; its fields follow as "Key: value" lines
        if head and "-" in head[0] and len(head) >= 5:
            current = {} if len(head) == 6 and head[5] == target else None
            if current is not None:
                mappings.append(current)
        elif current is not None:
            key, _, value = line.partition(":")
            current[key] = value.strip()
    return mappings


class PeakRss:
    """`with PeakRss() as meter: ...` then `meter.peak` is the peak RSS in bytes during the block."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = 0
        self.exact = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRss:
        self.exact = reset_peak_rss()
        self.peak = current_rss()
        if not self.exact:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, int(process.memory_info().rss))
            time.sleep(self.interval)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, peak_rss() if self.exact else current_rss())
