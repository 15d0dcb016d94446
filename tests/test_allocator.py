"""pbs2p_edge/allocator.py: with glibc, a freed weight-sized buffer is reused without new page faults."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# In a child process, so the thresholds do not stay raised for the rest of the test session: allocate and
# free 64 MiB, then count the minor page faults of allocating and touching 64 MiB again.
CHILD = """
import resource, sys
import numpy as np
from pbs2p_edge.allocator import retain_freed_memory
print(retain_freed_memory() if sys.argv[1] == "1" else False)
a = np.ones(8 << 20); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(8 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(retain: bool) -> tuple[str, int]:
    cmd = [sys.executable, "-c", CHILD, "1" if retain else "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_retained_memory_is_reused_without_page_faults() -> None:
    set_, retained = _faults(True)
    assert set_ == "True"
    _, fresh = _faults(False)
    assert retained < 200, retained  # 64 MiB is 16,384 pages of 4 KiB
    assert fresh > retained or fresh < 200  # (huge pages can make the fresh mapping cheap too)
