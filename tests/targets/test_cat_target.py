"""``"cat"``: dense limit (seeds 3.9), mean-pooling start, adaptive chunk sizes, the seed layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from target_helpers import attention_site, build, decode, hypothesis_settings, qkv_inputs, randomize

from swapformer.errors import ConfigError
from swapformer.targets.cat import CatAttention, CatConfig, CatLayer, _rope

D_MODEL = 24


def _dense_with_sink(q, k, v, sink_k, sink_v, scale):
    b, hkv, t, d = k.shape
    keys = torch.cat([sink_k[None, :, None].expand(b, -1, 1, -1), k], 2)
    vals = torch.cat([sink_v[None, :, None].expand(b, -1, 1, -1), v], 2)
    keep = torch.cat([torch.ones(t, 1, dtype=torch.bool), torch.ones(t, t, dtype=torch.bool).tril()], 1)
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=keep, scale=scale, enable_gqa=True)


@hypothesis_settings(8)
@given(length=st.integers(1, 12), extra=st.integers(0, 8), seed=st.integers(0, 2**16))
def test_one_chunk_is_dense_attention_plus_sink(length, extra, seed):
    site, weights = attention_site(d_model=D_MODEL)
    core = randomize(build("cat", site, weights, local_window=0, chunk_size=length + extra, sink=True), seed=seed)
    q, k, v, h = qkv_inputs(site, 2, length, D_MODEL, seed=seed)
    ref = _dense_with_sink(q, k, v, core.sink_k.detach(), core.sink_v.detach(), site.scale)
    torch.testing.assert_close(core(q, k, v, hidden=h), ref, rtol=1e-10, atol=1e-10)


def _mean_pool_reference(q, k, v, chunk, scale):
    """Query t sees the chunk-mean keys/values of earlier chunks and its own chunk causally."""
    b, h, t, d = q.shape
    groups = h // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = torch.empty_like(q)
    for i in range(t):
        c = i // chunk
        keys = [k[:, :, j * chunk : (j + 1) * chunk].mean(2, keepdim=True) for j in range(c)]
        vals = [v[:, :, j * chunk : (j + 1) * chunk].mean(2, keepdim=True) for j in range(c)]
        keys.append(k[:, :, c * chunk : i + 1])
        vals.append(v[:, :, c * chunk : i + 1])
        p = (q[:, :, i : i + 1] @ torch.cat(keys, 2).transpose(-1, -2) * scale).softmax(-1)
        out[:, :, i : i + 1] = p @ torch.cat(vals, 2)
    return out


@pytest.mark.parametrize(("length", "chunk"), [(16, 4), (19, 4), (7, 8), (13, 1), (21, 5)])
def test_retrofit_start_is_mean_pooling(length, chunk):
    site, weights = attention_site(d_model=D_MODEL)
    core = build("cat", site, weights, local_window=0, chunk_size=chunk)
    q, k, v, h = qkv_inputs(site, 2, length, D_MODEL, seed=length)
    ref = _mean_pool_reference(q, k, v, chunk, site.scale)
    torch.testing.assert_close(core(q, k, v, hidden=h), ref, rtol=1e-10, atol=1e-10)


def test_adaptive_chunk_size_per_call():
    site, weights = attention_site(d_model=D_MODEL)
    core = build("cat", site, weights, local_window=0, chunk_size=4, max_chunk_size=8)
    q, k, v, h = qkv_inputs(site, 1, 18, D_MODEL, seed=3)
    for chunk in (1, 2, 4, 8):
        core.set_chunk_size(chunk)
        ref = _mean_pool_reference(q, k, v, chunk, site.scale)
        torch.testing.assert_close(core(q, k, v, hidden=h), ref, rtol=1e-10, atol=1e-10)
    for bad in (3, 16):
        with pytest.raises(ConfigError):
            core.set_chunk_size(bad)


@pytest.mark.parametrize(("chunk", "max_chunk"), [(1, 0), (3, 0), (4, 8), (2, 8)])
def test_layer_decode_matches_parallel(chunk, max_chunk):
    config = CatConfig(mode="layer", chunk_size=chunk, max_chunk_size=max_chunk, head_dim=8, qk_norm=True)
    layer = randomize(CatLayer(D_MODEL, 4, 8, config).double(), std=0.05)
    site, _ = attention_site(d_model=D_MODEL)
    q, k, v, h = qkv_inputs(site, 2, 14, D_MODEL, seed=chunk)
    if max_chunk:
        layer.set_chunk_size(max_chunk)
    full = layer(q, k, v, hidden=h)
    assert full.shape == (2, 4, 14, 8)
    torch.testing.assert_close(decode(layer, q, k, v, h, prefill=5), full, rtol=1e-10, atol=1e-10)


def test_layer_widened_from_site_reproduces_the_host_in_the_first_chunk():
    """Seeds 3.6: with W_E = [I|0] and the host heads embedded, chunk 0 (minus its last token) is the
    host's RoPE attention plus the dummy as a sink."""
    site, weights = attention_site(d_model=D_MODEL)
    chunk = 8
    layer = build("cat", site, weights, mode="layer", chunk_size=chunk)
    x = torch.randn(2, chunk, D_MODEL, dtype=torch.float64)
    out = layer(None, None, None, hidden=x)  # the layer reads hidden only
    heads = lambda w, n: F.linear(x, w).view(2, chunk, n, site.head_dim)
    pos = torch.arange(chunk) + 1
    q = _rope(heads(weights["layer.q_proj.weight"], site.num_heads), pos, 10000.0).transpose(1, 2)
    k = _rope(heads(weights["layer.k_proj.weight"], site.num_kv_heads), pos, 10000.0).transpose(1, 2)
    v = heads(weights["layer.v_proj.weight"], site.num_kv_heads).transpose(1, 2)
    _, ks, vs = layer._heads(layer._dummy(chunk)[None, None], None)
    groups = site.num_heads // site.num_kv_heads
    sink_k, sink_v = ks[0, 0, : site.num_heads : groups], vs[0, 0, : site.num_heads : groups]
    ref = _dense_with_sink(q, k, v, sink_k, sink_v, site.scale)
    torch.testing.assert_close(out[:, :, : chunk - 1], ref[:, :, : chunk - 1], rtol=1e-10, atol=1e-10)


def test_layer_rejects_a_fixed_size_change_and_counts():
    layer = CatLayer(576, 9, 64, CatConfig(mode="layer", chunk_size=16))
    with pytest.raises(ConfigError):
        layer.set_chunk_size(8)
    assert layer.num_heads == 18
    assert layer.flops_per_token(8192) > layer.flops_per_token(512)
    retro = CatAttention(9, 3, 64, config=CatConfig(chunk_size=16, local_window=0))
    assert retro.state_bytes(8192) < 2 * 3 * 64 * 4 * 8192 / 10
