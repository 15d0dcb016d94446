"""Keep freed memory in the process heap while compressing (glibc only; a no-op elsewhere).

glibc serves every allocation above its mmap threshold (at most 32 MiB by default) with a fresh mmap and
unmaps it on free, so each weight-sized temporary of the recovery steps (W_hat, its gradient, the int8 planes
converted to float) pays one page fault per 4 KiB on first touch. On a 8960 x 1536 linear that made a 55 MB
copy take 49 ms instead of 8, and one bf16 recovery step of the linear 1.52 s instead of 0.58
(docs/METHOD.md "Session 12"). Raising the mmap and trim thresholds lets the heap reuse those pages; the
freed memory stays resident (peak RSS is unchanged, the process does not shrink after its peak).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1 << 30  # allocations up to 1 GiB come from the heap


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when they were set."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES)
    )
