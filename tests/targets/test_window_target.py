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


def _left_padding_bias(lengths: list[int], total: int) -> torch.Tensor:
    """Boolean causal + left-padding mask ``[B, 1, T, T]`` (padding first)."""
    i = torch.arange(total)[:, None]
    j = torch.arange(total)[None, :]
    real = torch.arange(total)[None, :] >= total - torch.tensor(lengths)[:, None]
    return ((j <= i)[None] & real[:, None, :])[:, None]


@pytest.mark.parametrize("length", [1, 5, 17, 40, 77])
@pytest.mark.parametrize(("window", "sinks", "block"), [(4, 2, 3), (8, 0, 0), (6, 3, 16)])
def test_blocked_stateful_path_equals_dense(length, window, sinks, block):
    """Prefill with a state, split calls and single steps: the blocked path equals the dense mask."""
    site, weights = attention_site(d_model=D_MODEL)
    core = build("window", site, weights, window=window, sinks=sinks, block_size=block)
    q, k, v, h = qkv_inputs(site, 2, length, D_MODEL, seed=length)
    dense = core._dense(q, k, v, None)
    for prefill, step in [(length, 1), (max(0, length - 5), 1), (length // 3, 4), (0, 1)]:
        got = decode(core, q, k, v, h, prefill=prefill, step=step)
        torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_padding_mask_takes_the_blocked_path_and_equals_dense(padding, monkeypatch):
    site, weights = attention_site(d_model=D_MODEL)
    core = build("window", site, weights, window=5, sinks=2, block_size=4)
    q, k, v, h = qkv_inputs(site, 2, 29, D_MODEL, seed=5)
    bias = padding_bias([29, 18], 29) if padding == "right" else _left_padding_bias([29, 18], 29)
    dense = core._dense(q, k, v, bias)
    monkeypatch.setattr(core, "_dense", lambda *a: pytest.fail("padding-only mask went dense"))
    got = core(q, k, v, bias)
    real = slice(0, 18) if padding == "right" else slice(11, 29)
    torch.testing.assert_close(got[1, :, real], dense[1, :, real], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0], dense[0], rtol=1e-12, atol=1e-12)
    # with a state: the padding flags are cached and later steps skip the padded keys
    state: dict = {}
    first = core(q[:, :, :20], k[:, :, :20], v[:, :, :20], bias[..., :20, :20], state=state)
    torch.testing.assert_close(first[0], dense[0, :, :20], rtol=1e-12, atol=1e-12)
    assert state["keep"].shape == (2, state["k"].shape[2])


def test_position_bias_stays_dense():
    site, weights = attention_site(d_model=D_MODEL)
    core = build("window", site, weights, window=5, sinks=1)
    q, k, v, h = qkv_inputs(site, 1, 12, D_MODEL, seed=6)
    bias = padding_bias([12], 12) + torch.randn(1, 1, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(core(q, k, v, bias), core._dense(q, k, v, bias), rtol=1e-12, atol=1e-12)
    assert not core._padding_only(bias, 1, 12)[0]


def test_state_holds_copies_not_views_of_the_prefill():
    site, weights = attention_site(d_model=D_MODEL)
    core = build("window", site, weights, window=4, sinks=2)
    q, k, v, h = qkv_inputs(site, 1, 50, D_MODEL, seed=7)
    state: dict = {}
    core(q, k, v, state=state)
    assert state["k"].shape[2] == 2 + 3
    assert state["k"].untyped_storage().nbytes() == state["k"].numel() * state["k"].element_size()
    assert state["k_pos"][0].tolist() == [0, 1, 47, 48, 49]


def test_padding_first_seen_after_a_clean_call():
    site, weights = attention_site(d_model=D_MODEL)
    core = build("window", site, weights, window=5, sinks=2, block_size=4)
    q, k, v, h = qkv_inputs(site, 2, 20, D_MODEL, seed=8)
    bias = padding_bias([20, 16], 20)
    dense = core._dense(q, k, v, bias)
    state: dict = {}
    first = core(q[:, :, :12], k[:, :, :12], v[:, :, :12], state=state)
    assert bool(state["keep"].all())
    rest = core(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], bias[..., 12:, :], state=state)
    got = torch.cat([first, rest], dim=2)
    torch.testing.assert_close(got[0], dense[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1, :, :16], dense[1, :, :16], rtol=1e-12, atol=1e-12)


def _window_calls(core, q, k, v, bounds):
    state: dict = {}
    outs, states = [], []
    with torch.no_grad():
        for a, e in zip(bounds[:-1], bounds[1:]):
            outs.append(core(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], state=state))
            states.append(dict(state))
    return outs, states


@pytest.mark.parametrize("window,sinks", [(1, 0), (2, 0), (4, 2), (5, 3), (3, 7)])
@pytest.mark.parametrize("heads,batch", [((4, 2, 8), 2), ((3, 3, 8), 1)])
def test_decode_step_equals_the_block_path(window, sinks, heads, batch):
    """One-token steps after the window fills run ``_decode_step``; the block path is the reference:
    every output and the state after every call (a multi-token call in between included)."""
    from target_helpers import assert_same_decode

    site, weights = attention_site(*heads, d_model=24)
    core = build("window", site, weights, window=window, sinks=sinks, block_size=2)
    bounds = [0, 3] + list(range(4, 14)) + [16] + list(range(17, 24))
    q, k, v, _ = qkv_inputs(site, batch, bounds[-1], 24)
    results = []
    for fast in (True, False):
        core.fast_decode = fast
        results.append(_window_calls(core, q, k, v, bounds))
    (fast_outs, fast_states), (slow_outs, slow_states) = results
    assert_same_decode(fast_outs, fast_states, slow_outs, slow_states)
    # and the whole decode equals the full-sequence forward
    torch.testing.assert_close(torch.cat(fast_outs, dim=2), core(q, k, v), rtol=1e-10, atol=1e-10)


def test_decode_step_runs_once_the_window_fills(monkeypatch):
    window, sinks = 4, 2
    site, weights = attention_site(4, 2, 8, d_model=24)
    core = build("window", site, weights, window=window, sinks=sinks)
    calls = []
    original = core._decode_step
    monkeypatch.setattr(core, "_decode_step", lambda *a: calls.append(a[-1]["pos"]) or original(*a))
    q, k, v, _ = qkv_inputs(site, 1, 12, 24)
    _window_calls(core, q, k, v, list(range(13)))
    assert calls == list(range(window + sinks - 1, 12))  # from position s + w − 1 on
