"""``"fastweight"``: degenerate identities (seeds 4.7), the gated recurrence, padding, gates init."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from target_helpers import attention_site, build, hypothesis_settings, qkv_inputs, randomize

from swapformer.errors import ConfigError
from swapformer.targets.fastweight import FastWeightAttention, FastWeightConfig

D_MODEL = 24


def _open_gates(core: FastWeightAttention) -> None:
    """f = f̂ = 1 exactly in float64 (σ(50) rounds to 1)."""
    with torch.no_grad():
        for gate in (core.value_gate, core.key_gate):
            gate.weight.zero_()
            gate.bias.fill_(50.0)


@hypothesis_settings(10)
@given(length=st.integers(1, 20), chunk=st.sampled_from([1, 4, 16]), seed=st.integers(0, 2**16))
def test_open_gates_identity_map_is_unnormalised_linear_attention(length, chunk, seed):
    site, weights = attention_site(d_model=D_MODEL)
    core = build("fastweight", site, weights, local_window=0, feature_map="identity", chunk_size=chunk)
    _open_gates(core)
    q, k, v, h = qkv_inputs(site, 2, length, D_MODEL, seed=seed)
    out = core(q, k, v, hidden=h)
    groups = site.num_heads // site.num_kv_heads
    kr, vr = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ kr.transpose(-1, -2)) * site.scale
    scores = scores * torch.ones(length, length, dtype=q.dtype).tril()
    torch.testing.assert_close(out, scores @ vr, rtol=1e-10, atol=1e-10)


def _reference(core: FastWeightAttention, q, k, v, hidden):
    """The decay rule as a Python loop over time (float64), with the core's own feature map/gates."""
    groups = core.num_heads // core.num_kv_heads
    qf = core._features(q.transpose(1, 2))
    kf = core._features(k.repeat_interleave(groups, 1).transpose(1, 2))
    vv = v.repeat_interleave(groups, 1).transpose(1, 2)
    f, fhat = core._gates(hidden)
    b, t, h, _ = vv.shape
    s = torch.zeros(b, h, vv.shape[-1], kf.shape[-1], dtype=q.dtype)
    z = torch.zeros(b, h, kf.shape[-1], dtype=q.dtype)
    outs = []
    for i in range(t):
        s = s * (f[:, i, :, :, None] * fhat[:, i, :, None, :]) + vv[:, i, :, :, None] * kf[:, i, :, None, :]
        z = z * fhat[:, i] + kf[:, i]
        o = torch.einsum("bhvk,bhk->bhv", s, qf[:, i])
        if core.config.normalize:
            o = o / torch.einsum("bhk,bhk->bh", z, qf[:, i]).clamp_min(core.config.eps)[..., None]
        outs.append(o)
    return torch.stack(outs, 2)


@pytest.mark.parametrize(
    "options",
    [{"feature_map": "identity"}, {"feature_map": "relu", "normalize": False}, {},
     {"feature_map": "hedgehog", "hedgehog_dim": 6, "normalize": True, "chunk_size": 8}],
    ids=["identity", "relu", "default-elu1-norm", "hedgehog-norm"],
)
def test_matches_python_recurrence(options):
    site, weights = attention_site(d_model=D_MODEL)
    core = randomize(build("fastweight", site, weights, local_window=0, **options), std=0.2)
    q, k, v, h = qkv_inputs(site, 2, 19, D_MODEL, seed=5)
    torch.testing.assert_close(core(q, k, v, hidden=h), _reference(core, q, k, v, h), rtol=1e-9, atol=1e-9)


def test_left_padding_is_skipped_exactly():
    site, weights = attention_site(d_model=D_MODEL)
    core = randomize(build("fastweight", site, weights, local_window=0, feature_map="elu1", normalize=True))
    pad, n = 4, 9
    q, k, v, h = qkv_inputs(site, 1, pad + n, D_MODEL, seed=6)
    keep = torch.arange(pad + n) >= pad
    bias = torch.zeros(1, 1, pad + n, pad + n, dtype=q.dtype)
    bias = bias.masked_fill(~(torch.ones(pad + n, pad + n).tril().bool() & keep[None, :]), -math.inf)
    padded = core(q, k, v, bias, hidden=h)
    alone = core(q[:, :, pad:], k[:, :, pad:], v[:, :, pad:], hidden=h[:, pad:])
    torch.testing.assert_close(padded[:, :, pad:], alone, rtol=1e-10, atol=1e-10)


def test_uniform_gate_init_spreads_gates():
    core = FastWeightAttention(4, 2, 8, 8, d_model=16, config=FastWeightConfig(local_window=0))
    assert torch.all(core.value_gate.weight == 0) and torch.all(core.key_gate.weight == 0)
    gates = torch.sigmoid(core.value_gate.bias.view(4, 8))
    assert gates.min() >= 1 / 8 - 1e-6 and gates.max() <= 1 - 1 / 8 + 1e-6
    assert gates.std(dim=1).min() > 0.03  # u ~ U[1/n, 1 - 1/n] per head, not a constant


def test_explicit_sizes_constructor_and_stats():
    core = FastWeightAttention(9, 3, 64, 64, d_model=576,
                               config=FastWeightConfig(feature_map="hedgehog", normalize=False,
                                                        local_window=0))
    assert core.key_dim == 128
    assert core.state_bytes(8192) == core.state_bytes(16) == 9 * 64 * 128 * 4
    assert core.flops_per_token(512) == core.flops_per_token(8192)


def test_default_is_normalised_elu1_and_identity_turns_the_normaliser_off():
    assert (FastWeightConfig().feature_map, FastWeightConfig().local_window) == ("hedgehog", 64)
    assert (FastWeightConfig(local_window=0).feature_map, FastWeightConfig().normalize) == ("elu1", True)
    assert FastWeightConfig(feature_map="identity", local_window=0).normalize is False
    assert FastWeightConfig(feature_map="relu").normalize is True
    with pytest.raises(ConfigError, match="non-negative feature map"):
        FastWeightConfig(feature_map="identity", normalize=True, local_window=0)
    with pytest.raises(ConfigError, match="non-negative feature map"):
        FastWeightConfig(feature_map="identity", update="sum")  # the sum rule's denominator needs φ ≥ 0


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 3000])
def test_hedgehog_head_major_is_the_map_of_the_scaled_input(grad, rows):
    """``head_major`` (few rows: ``z`` and ``−z`` stacked; many: one product with ``[W, −W]``, the
    softmax in place without autograd) equals the map's own definition ``[softmax(xW), softmax(−xW)]``
    on ``scale · x``, values and gradients."""
    from swapformer.targets.fastweight import HedgehogFeatureMap

    torch.manual_seed(0)
    fmap = HedgehogFeatureMap(num_heads=3, head_dim=8, feature_dim=6).double()
    with torch.no_grad():
        fmap.weight.add_(torch.randn_like(fmap.weight))
    x = torch.randn(2, 3, rows, 8, dtype=torch.float64, requires_grad=grad)
    scale = 0.7
    want = fmap(scale * x.transpose(1, 2)).transpose(1, 2)  # [B, T, H, D] in, [B, H, T, 2F] out
    with torch.set_grad_enabled(grad):
        got = fmap.head_major(x, scale)
    torch.testing.assert_close(got, want.detach() if not grad else want, rtol=1e-12, atol=1e-12)
    assert got.shape == (2, 3, rows, 12)
    if grad:
        w = torch.randn_like(want)
        gx, gw = torch.autograd.grad((got * w).sum(), (x, fmap.weight))
        wx, ww = torch.autograd.grad((want * w).sum(), (x, fmap.weight))
        torch.testing.assert_close(gx, wx, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gw, ww, rtol=1e-10, atol=1e-12)


def test_hedgehog_tiles_are_head_major_in_the_tile_layout():
    """Query tiles ``[B, Hkv, blocks, G, block, D]`` (head ``h`` at ``(h // G, h % G)``) map to the
    rows of ``head_major`` in the same layout."""
    from swapformer.targets.fastweight import HedgehogFeatureMap

    torch.manual_seed(1)
    b, hk, g, nb, blk, d = 2, 2, 3, 4, 5, 8
    fmap = HedgehogFeatureMap(num_heads=hk * g, head_dim=d, feature_dim=6).double()
    with torch.no_grad():
        fmap.weight.add_(torch.randn_like(fmap.weight))
        x = torch.randn(b, hk * g, nb * blk, d, dtype=torch.float64)
        want = fmap.head_major(x, 0.7).view(b, hk, g, nb, blk, -1).transpose(2, 3)
        tiles = x.view(b, hk, g, nb, blk, d).transpose(2, 3).contiguous()
        torch.testing.assert_close(fmap.tiles(tiles, 0.7), want, rtol=1e-12, atol=1e-12)
