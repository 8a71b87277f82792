"""The window target's heavy-hitter cache (``window`` with ``cache=K``): the dense rule of the probe it
was measured with, its degenerate cases, decoding and padding."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from target_helpers import attention_site, build, decode, hypothesis_settings, qkv_inputs

from swapformer.errors import ConfigError, InputError
from swapformer.targets.reference import repeat_kv
from swapformer.targets.window import WindowAttention, WindowConfig
from swapformer.targets.window_cache import CachedWindowAttention

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from sparse_cache_probe import sparse_cache_attention  # noqa: E402

D_MODEL = 24


def _core(**options) -> CachedWindowAttention:
    site, weights = attention_site(d_model=D_MODEL)
    return build("window", site, weights, **options)


def _inputs(core, batch: int, length: int, seed: int):
    site, _ = attention_site(d_model=D_MODEL)
    return qkv_inputs(site, batch, length, D_MODEL, seed=seed)


def test_cache_option_builds_the_cached_core_and_zero_the_plain_window():
    assert type(_core(window=4, cache=3)) is CachedWindowAttention
    assert type(_core(window=4)) is WindowAttention
    with pytest.raises(ConfigError, match="window cache must be >= 0"):
        WindowConfig(cache=-1)
    with pytest.raises(ConfigError, match="needs a config with cache >= 1"):
        CachedWindowAttention(4, 2, 8, config=WindowConfig(window=4))


@pytest.mark.parametrize(("window", "sinks", "cache", "block"), [(4, 1, 3, 3), (6, 2, 5, 4), (3, 0, 2, 64), (5, 2, 1, 1)])
def test_prefill_equals_the_dense_rule(window, sinks, cache, block):
    core = _core(window=window, sinks=sinks, cache=cache, block_size=block)
    q, k, v, _ = _inputs(core, 2, 37, seed=window + cache)
    want = sparse_cache_attention(q, k, v, core.scale, window=window, sinks=sinks, cache=cache, rule="heavy")
    torch.testing.assert_close(core(q, k, v), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("window", "sinks", "cache"), [(4, 1, 3), (6, 2, 5), (3, 0, 2)])
def test_split_calls_and_single_steps_equal_one_prefill(window, sinks, cache):
    core = _core(window=window, sinks=sinks, cache=cache, block_size=4)
    q, k, v, h = _inputs(core, 2, 33, seed=cache)
    full = core(q, k, v)
    for prefill, step in [(33, 1), (20, 1), (11, 4), (0, 1), (5, 7)]:
        torch.testing.assert_close(decode(core, q, k, v, h, prefill=prefill, step=step), full,
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("window", "sinks", "cache"), [(4, 1, 3), (6, 2, 5), (3, 0, 2)])
def test_decode_step_equals_the_dense_rule(window, sinks, cache, monkeypatch):
    """The one-token step ``generate()`` takes (no gradient, a full window) against the dense rule."""
    core = _core(window=window, sinks=sinks, cache=cache, block_size=4)
    q, k, v, h = _inputs(core, 2, 30, seed=cache)
    taken, step = [], core._decode_step
    monkeypatch.setattr(core, "_decode_step", lambda *a: taken.append(1) or step(*a))
    with torch.no_grad():
        got = decode(core, q, k, v, h, prefill=5, step=1)
    assert len(taken) == 30 - max(5, sinks + window - 1)
    want = sparse_cache_attention(q, k, v, core.scale, window=window, sinks=sinks, cache=cache, rule="heavy")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_a_cache_of_every_token_is_the_host_attention():
    core = _core(window=3, sinks=1, cache=40, block_size=8)
    q, k, v, _ = _inputs(core, 2, 30, seed=3)
    groups = q.shape[1] // k.shape[1]
    host = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True)
    torch.testing.assert_close(core(q, k, v), host, rtol=1e-10, atol=1e-10)


def test_state_is_bounded_and_counted():
    core = _core(window=4, sinks=1, cache=3, block_size=4)
    q, k, v, h = _inputs(core, 1, 50, seed=4)
    state: dict = {}
    core(q, k, v, state=state)
    assert state["k"].shape[2] == 1 + 4 - 1 and state["cache_k"].shape[2] == 3
    held = sum(t.numel() * 4 for n, t in state.items()
               if isinstance(t, torch.Tensor) and n not in ("k_pos", "keep"))
    held += state["k_pos"].shape[1] * 8 + state["keep"].shape[1]
    assert core.state_bytes(50) == held


def test_padding_is_never_seen_nor_cached():
    """Left padding (positions stay tensor positions, as in the window target): the real rows equal the
    dense rule with the padded keys taken out, in one prefill and decoded in steps."""
    core = _core(window=4, sinks=1, cache=3, block_size=4)
    q, k, v, h = _inputs(core, 2, 26, seed=6)
    pad = 7
    i, j = torch.arange(26)[:, None], torch.arange(26)[None, :]
    real = torch.stack([torch.ones(26, dtype=torch.bool), torch.arange(26) >= pad])
    bias = ((j <= i)[None] & real[:, None, :])[:, None]
    want = sparse_cache_attention(q, k, v, core.scale, window=4, sinks=1, cache=3, rule="heavy", keep=real)
    torch.testing.assert_close(core(q, k, v, bias)[1, :, pad:], want[1, :, pad:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(core(q, k, v, bias)[0], want[0], rtol=1e-10, atol=1e-10)
    state: dict = {}
    outs = [core(q[:, :, :12], k[:, :, :12], v[:, :, :12], bias[..., :12, :12], state=state)]
    for t in range(12, 26):
        outs.append(core(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], bias[..., t:t + 1, : t + 1],
                         state=state))
    stepped = torch.cat(outs, dim=2)
    torch.testing.assert_close(stepped[1, :, pad:], want[1, :, pad:], rtol=1e-10, atol=1e-10)


def test_a_position_bias_is_refused_at_the_site_and_at_run_time():
    site, _ = attention_site(d_model=D_MODEL)
    biased = dataclasses.replace(site, mask="bias")
    assert "position bias" in WindowAttention.unsupported(biased, WindowConfig(cache=2))
    assert WindowAttention.unsupported(biased, WindowConfig()) is None
    core = _core(window=4, sinks=1, cache=3)
    q, k, v, _ = _inputs(core, 1, 10, seed=9)
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    alibi = torch.where(j <= i, -0.1 * (i - j).double(), -torch.inf)
    with pytest.raises(InputError, match="use cache=0"):
        core(q, k, v, alibi)


def test_gradients_equal_the_dense_rule():
    core = _core(window=4, sinks=1, cache=3, block_size=5)
    q, k, v, _ = _inputs(core, 1, 23, seed=8)
    grads = []
    for fn in (core, lambda q, k, v: sparse_cache_attention(q, k, v, core.scale, window=4, sinks=1, cache=3,
                                                             rule="heavy")):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        fn(*x).square().sum().backward()
        grads.append([t.grad for t in x])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def _loop(core: CachedWindowAttention) -> CachedWindowAttention:
    twin = dataclasses.replace(core.config)
    loop = CachedWindowAttention(core.num_heads, core.num_kv_heads, core.head_dim, scale=core.scale, config=twin)
    loop.tiled_prefill = False
    return loop


@hypothesis_settings(25)
@given(window=st.integers(1, 7), sinks=st.integers(0, 3), cache=st.integers(1, 5), length=st.integers(2, 40),
       block=st.integers(1, 6), segment=st.integers(1, 12), seed=st.integers(0, 5))
def test_tiled_prefill_equals_the_block_loop(window, sinks, cache, length, block, segment, seed):
    """Outputs, gradients and the state the prefill leaves (then decoding on from it). Window 1 included:
    every token then draws the same ``a``, and both paths must break the ties alike."""
    core = _core(window=window, sinks=sinks, cache=cache, block_size=block)
    core.segment_len = segment
    loop = _loop(core)
    q, k, v, _ = _inputs(core, 2, length, seed=seed)
    runs = []
    for c in (core, loop):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        state: dict = {}
        out = c(*(t[:, :, :length - 1] for t in x), state=state)
        out = torch.cat([out, c(*(t[:, :, length - 1:] for t in x), state=state)], dim=2)
        out.square().sum().backward()
        runs.append((out, [t.grad for t in x], state))
    (out, grads, state), (out_l, grads_l, state_l) = runs
    torch.testing.assert_close(out, out_l, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, grads_l):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for name in ("k", "v", "cache_score"):
        torch.testing.assert_close(state[name], state_l[name], rtol=1e-10, atol=1e-10)
    # a sink's score is never read (a sink is never evicted): the loop adds what the sink drew as one
    s = min(sinks, length)
    torch.testing.assert_close(state["score"][..., s:], state_l["score"][..., s:], rtol=1e-10, atol=1e-10)


def test_tiled_prefill_runs_for_a_long_call(monkeypatch):
    core = _core(window=4, sinks=1, cache=3, block_size=4)
    q, k, v, _ = _inputs(core, 1, 30, seed=2)
    taken, tiled = [], core._tiled
    monkeypatch.setattr(core, "_tiled", lambda *a: taken.append(1) or tiled(*a))
    core(q, k, v)
    core(q[:, :, :4], k[:, :, :4], v[:, :, :4])  # one block: the loop
    assert taken == [1]
