"""``swapformer.measure.speed``: the kernel's RSS high-water mark and its restart."""

from __future__ import annotations

import mmap

import pytest

from swapformer.measure.speed import max_rss_mib, reset_max_rss, rss_mib


def test_max_rss_restarts_and_catches_a_peak_between_samples():
    if not reset_max_rss():
        pytest.skip("this kernel does not let /proc/self/clear_refs restart the high-water mark")
    start = rss_mib()
    assert max_rss_mib() <= start + 16  # restarted at the current resident memory
    # 64 MiB of fresh anonymous pages, every one touched: an mmap, so that memory the allocator
    # kept from earlier tests (already resident) cannot serve it without raising the RSS
    size, page = 64 * 2**20, mmap.PAGESIZE
    block = mmap.mmap(-1, size)
    for offset in range(0, size, page):
        block[offset] = 1
    block.close()
    assert rss_mib() < start + 32  # gone again: a sampler would have to catch it while it lived
    assert max_rss_mib() >= start + 60


_TRIM_PROBE = """
import gc, json, torch
from swapformer.measure.speed import release_freed_memory, rss_mib
# 250 MiB in 64 KiB tensors (below glibc's mmap threshold: heap memory), a live one after them so
# that freeing them cannot shrink the heap from its top
blocks = [torch.ones(16_000) for _ in range(4_000)]
pin = torch.ones(100)
del blocks
gc.collect()
held = rss_mib()
trimmed = release_freed_memory()
print(json.dumps({"trimmed": trimmed, "held": held, "after": rss_mib()}))
"""


def test_release_freed_memory_returns_the_heaps_freed_pages():
    # a fresh interpreter: in a long test session the heap's state (earlier frees, a raised mmap
    # threshold, other arenas) decides where the blocks go, and the drop is not the test's to predict
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _TRIM_PROBE], capture_output=True, text=True, check=True)
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    if not probe["trimmed"]:
        pytest.skip("no glibc malloc_trim here")
    assert probe["after"] < probe["held"] - 100
