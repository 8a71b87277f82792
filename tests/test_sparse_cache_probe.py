"""The attention of the sparse-cache probe (``benchmarks/sparse_cache_probe.py``): its degenerate cases
and what each cache rule keeps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from swapformer.targets.reference import repeat_kv
from swapformer.targets.window import WindowAttention, WindowConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sparse_cache_probe as probe  # noqa: E402

B, H, HKV, T, D = 2, 4, 2, 40, 8


def _qkv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, HKV, T, D, generator=g),
            torch.randn(B, HKV, T, D, generator=g))


@pytest.mark.parametrize("rule", probe.RULES)
def test_no_cache_is_the_window_target(rule):
    q, k, v = _qkv()
    window = WindowAttention(H, HKV, D, config=WindowConfig(window=8, sinks=2))
    out = probe.sparse_cache_attention(q, k, v, D**-0.5, window=8, sinks=2, cache=0, rule=rule)
    torch.testing.assert_close(out, window(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", probe.RULES)
def test_a_cache_of_every_token_is_the_host_attention(rule):
    q, k, v = _qkv(1)
    out = probe.sparse_cache_attention(q, k, v, D**-0.5, window=8, sinks=2, cache=T, rule=rule)
    host = F.scaled_dot_product_attention(q, repeat_kv(k, H // HKV), repeat_kv(v, H // HKV), is_causal=True)
    torch.testing.assert_close(out, host, rtol=1e-5, atol=1e-5)


def test_recent_is_the_window_of_equal_keys():
    q, k, v = _qkv(2)
    out = probe.sparse_cache_attention(q, k, v, D**-0.5, window=8, sinks=2, cache=6, rule="recent")
    wider = WindowAttention(H, HKV, D, config=WindowConfig(window=14, sinks=2))
    torch.testing.assert_close(out, wider(q, k, v), rtol=1e-5, atol=1e-5)


def test_keynorm_keeps_the_largest_evicted_keys_and_no_more():
    """One query head per kv head and a zero query: attention is uniform over the kept keys, so the
    output is the mean of their values; with one-hot values, which keys were kept is readable."""
    t, window, sinks, cache = 12, 3, 1, 2
    q = torch.zeros(1, 1, t, 4)
    k = torch.zeros(1, 1, t, 4)
    norms = torch.tensor([9.0, 1, 5, 2, 8, 3, 7, 4, 6, 0.5, 0.6, 0.7])
    k[..., 0] = norms
    v = torch.eye(t)[None, None]
    out = probe.sparse_cache_attention(q, k, v, 1.0, window=window, sinks=sinks, cache=cache, rule="keynorm")
    last = t - 1  # sees sink 0, window 9..11, and of the evicted 1..8 the two largest norms: 4 (8) and 6 (7)
    expected = torch.zeros(t)
    expected[[0, 9, 10, 11, 4, 6]] = 1 / 6
    torch.testing.assert_close(out[0, 0, last], expected)


def test_heavy_scores_count_attention_inside_the_window_only():
    t, window = 6, 2
    s = torch.zeros(1, 1, 1, t, t)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    near = (j <= i) & (i - j < window)
    k = torch.zeros(1, 1, t, 1)
    mass = probe.token_scores("heavy", s, k, near, window, 0)[0, 0]
    # uniform over the window: token j gets 1 from query j (if j = 0, alone) or 1/2, then 1/2 from j + 1
    torch.testing.assert_close(mass, torch.tensor([1.5, 1.0, 1.0, 1.0, 1.0, 0.5]))


def test_an_unknown_rule_is_an_error():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown cache rule 'lru'"):
        probe.sparse_cache_attention(q, k, v, 1.0, window=4, sinks=0, cache=2, rule="lru")
