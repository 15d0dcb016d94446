"""Keep freed memory in the process heap during recovery steps (glibc only; a no-op elsewhere).

glibc serves every allocation above its mmap threshold (at most 32 MiB by default) with a fresh mmap and
unmaps it on free, so each weight-sized temporary of a recovery step (W_hat, its gradient, the float sign
plane) pays one page fault per 4 KiB on first touch, at every step (`bench/recover_linear.py`: ~130,000 faults
per bf16 step of one 8960 x 1536 linear). Inside `retained_heap()` allocations up to 1 GiB come from the heap
and stay there when freed, so the next step's same-shaped temporaries reuse those pages. The recovery loops
alone run inside it (`compress/recover.py`): a whole compress held that way kept 20 GiB of freed, fragmented
heap at 1.5B (its live memory: 3.7 GiB). On exit glibc's thresholds are set back and the free memory is handed
to the system (`malloc_trim`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from typing import Any

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
RETAINED_BYTES = 1 << 30  # inside: allocations up to 1 GiB come from the heap, and stay there
# outside: glibc's own steady state (its dynamic mmap threshold stops at 32 MiB, the trim threshold at twice it)
DEFAULT_MMAP_BYTES = 32 << 20
DEFAULT_TRIM_BYTES = 64 << 20


def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # musl and other libcs without mallopt / malloc_trim
        return None
    return libc


def _thresholds(libc: Any, mmap_bytes: int, trim_bytes: int) -> bool:
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_bytes)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, trim_bytes)
    )


@contextlib.contextmanager
def retained_heap() -> Iterator[bool]:
    """Within: freed memory stays in the heap for reuse (yields whether glibc took the setting). On exit:
    glibc's default thresholds, and the free heap returned to the system. Also a decorator."""
    libc = _glibc()
    active = libc is not None and _thresholds(libc, RETAINED_BYTES, RETAINED_BYTES)
    try:
        yield active
    finally:
        if active:
            _thresholds(libc, DEFAULT_MMAP_BYTES, DEFAULT_TRIM_BYTES)
            libc.malloc_trim(0)


def release_free_heap() -> bool:
    """Hand the heap's free pages back to the system now (glibc `malloc_trim`); False where there is no glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
