"""The hybrids with a heavy-hitter cache (``cache=K`` for fastweight and elita): the exact part sees the
window, the sinks and ``K`` heavy hitters per kv head, and the far memory holds the evicted tokens the
cache does not (LoLA's layout). The dense rule of the module docstring, its degenerate cases, decoding,
padding, gradients and the counted state."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from target_helpers import (
    attention_site,
    build,
    decode,
    hypothesis_settings,
    padding_bias,
    qkv_inputs,
    randomize,
)

from swapformer.errors import ConfigError
from swapformer.targets.elita import ElitaConfig
from swapformer.targets.fastweight import FastWeightConfig
from swapformer.targets.reference import repeat_kv
from swapformer.targets.sdpa import SdpaAttention, SdpaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from sparse_cache_probe import token_scores  # noqa: E402

D_MODEL = 24
MEMORIES = {"elita": {"decay_half_life": 0.0}, "elita+decay": {"decay_half_life": 3.0},
            "fastweight": {"update": "sum", "decay_half_life": 0.0},
            "fastweight+decay": {"update": "sum", "decay_half_life": 3.0}}


def _core(memory: str, window: int, sinks: int, cache: int, block: int = 3, seed: int = 1, heads=(4, 2, 8),
          dtype=torch.float64):
    site, weights = attention_site(*heads, d_model=D_MODEL, qkv_bias=True, dtype=dtype)
    core = build(memory.split("+")[0], site, weights, local_window=window, sinks=sinks, cache=cache,
                 block_size=block, **MEMORIES[memory])
    core = randomize(core, seed=seed)
    core.set_mix(torch.linspace(0.3, 2.0, core.num_heads))
    return core, site


def dense_rule(core, q, k, v, hidden) -> torch.Tensor:
    """The docstring's rule over whole ``[T, T]`` masks: ``C_i`` the top ``K`` evicted tokens by the
    window attention they drew, exact softmax terms over ``N_i ∪ C_i``, the far memory over the rest."""
    w, s, n, g = core.window, core.sinks, core.cache, core.mix()
    b, h, t, _ = q.shape
    hk, hm = core.num_kv_heads, core.memory_heads
    scores = torch.einsum("bkgtd,bksd->bkgts", q.view(b, hk, h // hk, t, -1), k) * core.scale
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    causal = j <= i
    near = causal & ((i - j < w) | (j < s))
    evicted = causal & ~near
    ranked = token_scores("heavy", scores, k, near, w, 0)[:, :, None, :].masked_fill(~evicted, -math.inf)
    kth = ranked.topk(min(n, t), dim=-1).values[..., -1:]
    cached = evicted & (ranked >= kth) & torch.isfinite(ranked)  # [B, Hkv, T, T]
    logits = scores.masked_fill(~(near | cached)[:, :, None], -math.inf)
    c = logits.amax(-1, keepdim=True)
    e = torch.exp(logits - c)
    num, den = (e @ v[:, :, None]).reshape(b, h, t, -1), e.sum(-1).reshape(b, h, t, 1)
    pos = torch.arange(t)
    qf = core.query_features(q, hidden, pos)
    kf, fv = core.memory_items({"k": k, "v": v, **core.token_inputs(k, v, hidden, pos)})
    lin = qf.reshape(b, hm, h // hm, t, -1) @ kf[:, :, None].transpose(-1, -2)  # [B, Hm, Gm, T, T]
    far = repeat_kv((evicted & ~cached).to(q.dtype), hm // hk)[:, :, None]
    if core.log_decay() is not None:
        far = far * torch.exp(core.log_decay()[:, None, None] * (i - j - w).clamp_min(0))[None, :, None]
    a = lin * far
    m, nf = (a @ fv[:, :, None]).reshape(b, h, t, -1), a.sum(-1).reshape(b, h, t, 1)
    gh = g[None, :, None, None]
    return (num + gh * m) / (den + gh * nf)


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize(("window", "sinks", "cache", "block"), [(4, 1, 3, 3), (3, 0, 2, 64), (5, 2, 1, 1)])
def test_prefill_equals_the_dense_rule(memory, window, sinks, cache, block):
    core, site = _core(memory, window, sinks, cache, block)
    q, k, v, h = qkv_inputs(site, 2, 29, D_MODEL, seed=window + cache)
    with torch.no_grad():
        torch.testing.assert_close(core(q, k, v, hidden=h), dense_rule(core, q, k, v, h), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("memory", MEMORIES)
@hypothesis_settings(10)
@given(window=st.integers(1, 6), sinks=st.integers(0, 2), cache=st.integers(1, 4), length=st.integers(2, 26),
       prefill=st.integers(0, 12), step=st.integers(1, 5), seed=st.integers(0, 5))
def test_decoding_equals_one_prefill(memory, window, sinks, cache, length, prefill, step, seed):
    core, site = _core(memory, window, sinks, cache, block=4, seed=seed)
    q, k, v, h = qkv_inputs(site, 2, length, D_MODEL, seed=seed)
    with torch.no_grad():
        full = core(q, k, v, hidden=h)
        torch.testing.assert_close(decode(core, q, k, v, h, min(prefill, length - 1), step), full,
                                   rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("memory", ["elita+decay", "fastweight"])
def test_zero_mix_is_the_cached_window(memory):
    core, site = _core(memory, 4, 1, 3)
    with torch.no_grad():
        core.mix_logit.fill_(-1e4)  # softplus underflows to exactly 0
    _, weights = attention_site(4, 2, 8, d_model=D_MODEL, qkv_bias=True, dtype=torch.float64)
    window = build("window", site, weights, window=4, sinks=1, cache=3)
    q, k, v, h = qkv_inputs(site, 2, 31, D_MODEL, seed=5)
    torch.testing.assert_close(core(q, k, v, hidden=h), window(q, k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("memory", MEMORIES)
def test_a_cache_of_every_token_is_the_host_attention(memory):
    """Every evicted token cached: the memory holds nothing, whatever the mix."""
    core, site = _core(memory, 3, 1, 40)
    q, k, v, h = qkv_inputs(site, 2, 30, D_MODEL, seed=3)
    ref = SdpaAttention.from_site(site, SdpaConfig(), {})
    torch.testing.assert_close(core(q, k, v, hidden=h), ref(q, k, v), rtol=1e-9, atol=1e-9)


def test_the_cache_changes_the_far_part():
    """The cached tokens leave the memory (else the subtraction above proved nothing)."""
    plain, site = _core("elita+decay", 3, 1, 0)
    cached, _ = _core("elita+decay", 3, 1, 2)
    q, k, v, h = qkv_inputs(site, 1, 20, D_MODEL, seed=2)
    with torch.no_grad():
        a, b = plain(q, k, v, hidden=h), cached(q, k, v, hidden=h)
    torch.testing.assert_close(a[:, :, :4], b[:, :, :4], rtol=1e-12, atol=1e-12)  # nothing evicted before 4
    assert (a[:, :, 4:] - b[:, :, 4:]).abs().max() > 1e-3


def test_gradients_equal_the_dense_rule():
    core, site = _core("elita+decay", 4, 1, 3, block=5)
    q, k, v, h = qkv_inputs(site, 1, 23, D_MODEL, seed=8)
    grads = []
    for fn in (lambda *x: core(*x[:3], hidden=x[3]), lambda *x: dense_rule(core, *x)):
        core.zero_grad()
        x = [t.clone().requires_grad_() for t in (q, k, v, h)]
        fn(*x).square().sum().backward()
        grads.append([t.grad for t in x] + [p.grad.clone() for p in core.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 4
    for got, want in zip(*grads):  # rtol: the mix g is computed in float32 (HybridAttention.mix)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_padding_leaves_real_positions_as_alone():
    core, site = _core("fastweight+decay", 4, 1, 2)
    q, k, v, h = qkv_inputs(site, 2, 19, D_MODEL)
    with torch.no_grad():
        padded = core(q, k, v, padding_bias([19, 11], 19), hidden=h)
        alone = core(q[1:, :, :11], k[1:, :, :11], v[1:, :, :11], hidden=h[1:, :11])
        full = core(q[:1], k[:1], v[:1], hidden=h[:1])
    torch.testing.assert_close(padded[1:, :, :11], alone, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(padded[:1], full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("memory", ["elita+decay", "fastweight"])
@pytest.mark.parametrize("length", [1, 5, 23])
def test_state_is_bounded_and_counted(memory, length):
    core, site = _core(memory, 5, 2, 3, dtype=torch.float32)
    q, k, v, h = qkv_inputs(site, 1, length, D_MODEL, dtype=torch.float32)
    state: dict = {}
    with torch.no_grad():
        core(q, k, v, hidden=h, state=state)
    held = sum(x.numel() * x.element_size() for x in state.values() if isinstance(x, torch.Tensor))
    assert held == core.state_bytes(length)
    assert state["cache_k"].shape[2] == 3 and state["k"].shape[2] == min(length, 5 - 1 + 2)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="cache must be >= 0"):
        ElitaConfig(cache=-1)
    with pytest.raises(ConfigError, match="needs local_window > 0"):
        ElitaConfig(local_window=0, cache=2)
    with pytest.raises(ConfigError, match="needs update='sum'"):
        FastWeightConfig(cache=2)
    assert FastWeightConfig(cache=2, update="sum").cache == 2
