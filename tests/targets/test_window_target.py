"""``"window"``: equals the host without a window, the visibility rule, blocked prefill, decoding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from target_helpers import attention_site, build, decode, padding_bias, qkv_inputs

from swapformer.targets.reference import masked_sdpa
from swapformer.targets.sdpa import SdpaAttention
from swapformer.targets.window import WindowAttention, WindowConfig

D_MODEL = 24


def test_wide_window_without_sinks_equals_host():
    site, weights = attention_site(d_model=D_MODEL)
    core = build("window", site, weights, window=64, sinks=0)
    host = SdpaAttention.from_site(site, None, weights)
    q, k, v, h = qkv_inputs(site, 2, 23, D_MODEL, seed=1)
    torch.testing.assert_close(core(q, k, v, hidden=h), host(q, k, v), rtol=1e-12, atol=1e-12)
    bias = padding_bias([23, 15], 23)
    torch.testing.assert_close(core(q, k, v, bias, hidden=h)[1, :, :15], host(q, k, v, bias)[1, :, :15])


def _reference(q, k, v, window, sinks, scale):
    i = torch.arange(q.shape[-2])[:, None]
    j = torch.arange(k.shape[-2])[None, :]
    keep = (j <= i) & ((i - j < window) | (j < sinks))
    return masked_sdpa(q, k, v, keep, scale)


@pytest.mark.parametrize(("window", "sinks", "block"), [(1, 0, 0), (3, 2, 0), (5, 1, 2), (4, 4, 7)])
def test_visibility_rule_and_blocked_prefill(window, sinks, block):
    site, weights = attention_site(d_model=D_MODEL)
    core = build("window", site, weights, window=window, sinks=sinks, block_size=block)
    q, k, v, h = qkv_inputs(site, 2, 37, D_MODEL, seed=2)
    ref = _reference(q, k, v, window, sinks, site.scale)
    torch.testing.assert_close(core(q, k, v, hidden=h), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(decode(core, q, k, v, h, prefill=9, step=2), ref, rtol=1e-12, atol=1e-12)


def test_decode_cache_stays_bounded():
    site, weights = attention_site(d_model=D_MODEL)
    core = build("window", site, weights, window=6, sinks=2)
    q, k, v, h = qkv_inputs(site, 1, 40, D_MODEL, seed=3)
    state: dict = {}
    for t in range(40):
        core(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state=state)
        assert state["k"].shape[2] <= 2 + 6 - 1
    assert state["pos"] == 40
    assert core.state_bytes(10_000) == (2 + 5) * (site.num_kv_heads * 2 * site.head_dim * 4 + 8 + 1)


def test_host_window_is_kept_when_smaller():
    site, weights = attention_site(d_model=D_MODEL)
    core = build("window", dataclasses.replace(site, window=3), weights, window=16)
    assert core.window == 3


def test_explicit_sizes_constructor():
    core = WindowAttention(9, 3, 64, config=WindowConfig(window=128, sinks=4))
    q = torch.randn(1, 9, 300, 64)
    k, v = torch.randn(1, 3, 300, 64), torch.randn(1, 3, 300, 64)
    assert core(q, k, v).shape == (1, 9, 300, 64)
    assert core.flops_per_token(8192) == core.flops_per_token(132)
