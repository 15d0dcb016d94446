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
from pathlib import Path
from types import TracebackType

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
        import ctypes

        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
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
