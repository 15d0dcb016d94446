"""Huge pages for the weights after load (runtime/memory.py: resident_blocks, collapse_to_huge_pages)."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import pytest

from pbs2p_edge.runtime import memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page tables")

_MADV_NOHUGEPAGE = 15
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _region(blocks: int) -> tuple[mmap.mmap, int, int, int]:
    """An anonymous mapping holding `blocks` aligned huge-page-sized blocks: (map, its address, the first
    block's address, the block size)."""
    huge = memory.huge_page_size()
    region = mmap.mmap(-1, (blocks + 1) * huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    return region, base, -(-base // huge) * huge, huge


def _touch(region: mmap.mmap, base: int, start: int, length: int) -> None:
    for offset in range(start - base, start - base + length, mmap.PAGESIZE):
        region[offset] = 1


def test_resident_blocks_are_the_blocks_whose_every_page_is_present() -> None:
    region, base, first, huge = _region(4)
    # one page per fault even where THP is "always", so a block half touched stays half present
    assert memory.libc_madvise()(base, len(region), _MADV_NOHUGEPAGE) == 0
    _touch(region, base, first, huge)  # block 0: every page
    _touch(region, base, first + huge, huge - mmap.PAGESIZE)  # block 1: all but its last page
    _touch(region, base, first + 2 * huge, huge)  # block 2: every page; block 3 untouched
    with open("/proc/self/pagemap", "rb") as pagemap:
        found = memory.resident_blocks(base, base + len(region), huge, pagemap)
    assert found == [first, first + 2 * huge]
    assert first in memory.resident_huge_blocks() and first + huge not in memory.resident_huge_blocks()
    region.close()


def test_collapse_advises_runs_of_new_blocks_only(monkeypatch: pytest.MonkeyPatch) -> None:
    huge = memory.huge_page_size()
    a, b = 100 * huge, 200 * huge
    resident = {a, a + huge, a + 3 * huge, b}
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(memory, "resident_huge_blocks", lambda: set(resident))
    monkeypatch.setattr(memory, "libc_madvise", lambda: lambda *call: calls.append(call) or 0)
    assert memory.collapse_to_huge_pages(exclude={b}) == 3 * huge
    assert calls == [(a, 2 * huge, 25), (a + 3 * huge, huge, 25)]  # 25 = MADV_COLLAPSE


def _anon_huge_bytes(address: int) -> int:
    """AnonHugePages of the mapping holding `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:
            start, end = (int(x, 16) for x in head[0].split("-"))
            inside = start <= address < end
        elif inside and line.startswith("AnonHugePages:"):
            return int(head[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not _THP.exists() or "[never]" in _THP.read_text(), reason="no transparent huge pages")
def test_collapse_moves_a_written_region_onto_huge_pages() -> None:
    if tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit()) < (6, 1):
        pytest.skip("MADV_COLLAPSE needs Linux 6.1")
    before = memory.resident_huge_blocks()
    region, base, first, huge = _region(4)
    pattern = bytes(range(251)) * (len(region) // 251) + bytes(len(region) % 251)
    region[:] = pattern
    assert memory.collapse_to_huge_pages(exclude=before) >= 4 * huge
    assert _anon_huge_bytes(first) >= 4 * huge
    assert region[:] == pattern  # the contents moved with the pages
    region.close()
