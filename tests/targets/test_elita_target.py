"""``"elita"``: cumsum ≡ explicit softmax (seeds 2.9), the constant-query start, the FFN mapping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from target_helpers import (
    attention_site,
    build,
    ffn_site,
    hypothesis_settings,
    qkv_inputs,
    randomize,
)

from swapformer.targets.elita import ElitaAttention, ElitaConfig, ElitaFFN

D_MODEL = 24


def _softmax_reference(core: ElitaAttention, v: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Row i: softmax over slots j ≤ i (logit clip κ_j + clip ρ_i, value v_j) plus a self slot."""
    clip = core.config.clip
    kappa, delta, rho = (x.clamp(-clip, clip) for x in core.logits(hidden))  # [B, T, H]
    t = v.shape[-2]
    vr = v.repeat_interleave(core.num_heads // core.num_kv_heads, 1)  # [B, H, T, D]
    past = kappa.transpose(1, 2)[:, :, None, :] + rho.transpose(1, 2)[:, :, :, None]  # [B, H, i, j]
    past = past.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    logits = torch.cat([past, delta.transpose(1, 2)[..., None]], -1)
    p = logits.softmax(-1)
    return p[..., :t] @ vr + p[..., t:] * vr


@hypothesis_settings(10)
@given(length=st.integers(1, 16), start=st.integers(0, 50), seed=st.integers(0, 2**16))
def test_cumsum_equals_explicit_softmax(length, start, seed):
    site, weights = attention_site(d_model=D_MODEL)
    core = randomize(build("elita", site, weights, local_window=0), seed=seed, std=0.4)
    q, k, v, h = qkv_inputs(site, 2, length, D_MODEL, seed=seed)
    out = core(q, k, v, hidden=h)
    torch.testing.assert_close(out, _softmax_reference(core, v, h), rtol=1e-6, atol=1e-6)


def test_start_is_constant_query_softmax_attention():
    """Self slot off and c = 0: softmax attention whose every query is q̄ = b_q (seeds 2.9)."""
    site, weights = attention_site(d_model=D_MODEL, qkv_bias=True)
    core = build("elita", site, weights, local_window=0)
    q, k, v, h = qkv_inputs(site, 2, 12, D_MODEL, seed=2)
    out = core(q, k, v, hidden=h)
    keys = F.linear(h, weights["layer.k_proj.weight"], weights["layer.k_proj.bias"])
    keys = keys.view(2, 12, site.num_kv_heads, site.head_dim).transpose(1, 2)
    q_bar = weights["layer.q_proj.bias"].view(1, site.num_heads, 1, site.head_dim).expand(2, -1, 12, -1)
    ref = F.scaled_dot_product_attention(q_bar, keys, v, is_causal=True, scale=site.scale, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_init_from_hidden_uses_the_mean_query():
    site, weights = attention_site(d_model=D_MODEL, qkv_bias=True)
    core = build("elita", site, weights, local_window=0)
    sample = torch.randn(3, 40, D_MODEL, dtype=torch.float64) + 0.5
    core.init_from_hidden(sample)
    q_mean = F.linear(sample, weights["layer.q_proj.weight"], weights["layer.q_proj.bias"]).mean((0, 1))
    wk = weights["layer.k_proj.weight"].view(site.num_kv_heads, site.head_dim, D_MODEL)
    wk = wk.repeat_interleave(site.num_heads // site.num_kv_heads, 0)
    expect = site.scale * torch.einsum("hd,hdm->hm", q_mean.view(site.num_heads, -1), wk)
    torch.testing.assert_close(core.k1.detach(), expect)


def test_positions_are_prefix_consistent():
    core = ElitaAttention(2, 2, 8, 4, ElitaConfig(position_width=3))
    with torch.no_grad():
        core.amp.normal_()
    p_long = core._positions(20, 0, torch.device("cpu"))[0]
    p_short = core._positions(5, 0, torch.device("cpu"))[0]
    p_tail = core._positions(5, 15, torch.device("cpu"))[0]
    torch.testing.assert_close(p_long[:5], p_short)
    torch.testing.assert_close(p_long[15:], p_tail)


def test_ffn_exact_from_swish_mlp():
    site, weights = ffn_site(activation="silu")
    core = build("elita", site, weights, kind="ffn")
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    host = F.linear(F.silu(F.linear(x, weights["mlp.up.weight"], weights["mlp.up.bias"])),
                    weights["mlp.down.weight"], weights["mlp.down.bias"])
    torch.testing.assert_close(core(x), host, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("activation", "tol"), [("gelu", 0.1), ("relu", 0.15)])
def test_ffn_approximate_for_other_activations(activation, tol):
    site, weights = ffn_site(activation=activation)
    core = build("elita", site, weights, kind="ffn")
    x = torch.randn(64, 12, dtype=torch.float64)
    act = {"gelu": F.gelu, "relu": F.relu}[activation]
    host = F.linear(act(F.linear(x, weights["mlp.up.weight"], weights["mlp.up.bias"])),
                    weights["mlp.down.weight"], weights["mlp.down.bias"])
    err = (core(x) - host).abs().max() / host.abs().max()
    assert err < tol


def test_ffn_gated_host_builds_and_trains():
    site, weights = ffn_site(activation="silu", gated=True)
    core = build("elita", site, weights, kind="ffn").train()
    x = torch.randn(4, 12, dtype=torch.float64)
    core(x).square().sum().backward()
    assert all(p.grad is not None for p in core.parameters())
    # the constant slot's partners start dead-but-trainable: W₃[:, 1:] is not zero
    assert core.w3[:, 1:].abs().sum() > 0


def test_ffn_explicit_sizes():
    core = ElitaFFN(16, 16, linear_factor=8)
    assert core(torch.randn(2, 3, 16)).shape == (2, 3, 16)
    assert core.parameter_count() == 16 * 16 + 16 + 16 * 8 + 8 + 16 * 8 * 16 + 16
