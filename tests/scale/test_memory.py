"""Memory the process holds but no tensor uses goes back to the system (:func:`moeaudit.scale.memory.trim_heap`)."""

from __future__ import annotations

import os

import pytest
import torch

from moeaudit.scale.memory import _malloc_trim, trim_heap

MIB = 2**20


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or _malloc_trim() is None,
                    reason="needs Linux with glibc (malloc_trim and /proc)")
def test_trim_returns_the_freed_blocks_of_a_fragmented_heap_and_keeps_the_live_ones():
    """After glibc's mmap threshold has risen (a freed 24 MiB block), 1 MiB tensors come from the heap; freeing
    every other one leaves holes the heap keeps resident. Trimming returns them; the live tensors keep their
    values."""
    big = torch.ones(6 * MIB)  # 24 MiB: mmapped, and its free raises the threshold
    del big
    blocks = [torch.full((MIB // 4,), float(i)) for i in range(96)]  # 96 x 1 MiB, touched
    before = _resident_bytes()
    del blocks[::2]  # 48 MiB of holes between live blocks: not at the heap's top, so free() keeps them
    kept = _resident_bytes()
    trim_heap()
    after = _resident_bytes()
    assert before - kept < 16 * MIB  # the holes stayed resident ...
    assert kept - after > 32 * MIB  # ... until trimmed
    assert all(torch.all(block == 2 * i + 1) for i, block in enumerate(blocks))
