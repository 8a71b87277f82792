"""``swapformer.measure.speed``: the kernel's RSS high-water mark and its restart."""

from __future__ import annotations

import pytest
import torch

from swapformer.measure.speed import max_rss_mib, reset_max_rss, rss_mib


def test_max_rss_restarts_and_catches_a_peak_between_samples():
    if not reset_max_rss():
        pytest.skip("this kernel does not let /proc/self/clear_refs restart the high-water mark")
    start = rss_mib()
    assert max_rss_mib() <= start + 16  # restarted at the current resident memory
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page touched
    del block
    assert rss_mib() < start + 32  # gone again: a sampler would have to catch it while it lived
    assert max_rss_mib() >= start + 60
