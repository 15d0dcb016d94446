"""pbs2p_edge/allocator.py: inside `retained_heap()` a freed weight-sized buffer is reused without new page
faults; on exit the free heap goes back to the system."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# In a child process, so the thresholds cannot leak into the test session. 64 MiB = 16,384 pages of 4 KiB.
CHILD = """
import json, resource
import numpy as np
from pbs2p_edge.allocator import retained_heap

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

out = {}
with retained_heap() as active:
    a = np.ones(8 << 20); del a
    before = faults()
    a = np.ones(8 << 20); del a
    out["retained_faults"] = faults() - before
    inside = rss()
out["active"] = active
out["released"] = inside - rss()
a = np.ones(8 << 20); del a
before = faults()
a = np.ones(8 << 20); del a
out["default_faults"] = faults() - before
print(json.dumps(out))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_retained_heap_reuses_pages_inside_and_releases_them_on_exit() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    out = json.loads(done.stdout)
    assert out["active"] is True
    assert out["retained_faults"] < 200, out  # reused: no new pages
    assert out["released"] > 32 << 20, out  # the 64 MiB freed inside went back to the system on exit
    # outside, glibc's default again: the buffer is a fresh mapping each time (huge pages may make it cheap)
    assert out["default_faults"] > out["retained_faults"] or out["default_faults"] < 200, out


# 512 blocks of 64 KiB come from the heap (below glibc's mmap threshold); one more block after them pins the heap's
# top, so freeing them leaves 32 MiB free inside the heap that only malloc_trim hands back.
TRIM_CHILD = """
import json, resource
import numpy as np
from pbs2p_edge.allocator import release_free_heap

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

blocks = [np.ones(8 << 10) for _ in range(512)]
pin = np.ones(8 << 10)
del blocks
before = rss()
released = release_free_heap()
print(json.dumps({"released": released, "drop": before - rss()}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim only")
def test_release_free_heap_returns_freed_heap_pages() -> None:
    done = subprocess.run([sys.executable, "-c", TRIM_CHILD], capture_output=True, text=True, check=True)
    out = json.loads(done.stdout)
    assert out["released"] is True
    assert out["drop"] > 16 << 20, out
