"""``"worker"``: worker sets (seeds 1.1), the function-preserving start at k = 1 (seeds 1.8), the FFN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from target_helpers import (
    assert_same_decode,
    attention_site,
    build,
    ffn_site,
    padding_bias,
    qkv_inputs,
    randomize,
)

import swapformer
from swapformer.targets.reference import masked_sdpa
from swapformer.targets.sdpa import SdpaAttention
from swapformer.targets.worker import WorkerAttention, WorkerConfig, WorkerFFN, worker_positions

D_MODEL = 24


@pytest.mark.parametrize(
    ("length", "interval", "expect"),
    [(10, 4, [3, 7, 9]), (2, 4, [1]), (8, 4, [3, 7]), (5, 1, [0, 1, 2, 3, 4])],
)
def test_worker_positions(length, interval, expect):
    assert worker_positions(0, length, interval, torch.device("cpu")).tolist() == expect


def test_interval_one_start_equals_sdpa():
    site, weights = attention_site(d_model=D_MODEL)
    core = build("worker", site, weights, interval=1)
    q, k, v, h = qkv_inputs(site, 2, 17, D_MODEL, seed=1)
    ref = SdpaAttention(site.num_heads, site.num_kv_heads, site.scale, causal=True)(q, k, v)
    torch.testing.assert_close(core(q, k, v, hidden=h), ref, rtol=1e-12, atol=1e-12)


def _conv_keys(core, k, v):
    """Reference conv over ``[k|v]`` with the core's explicit taps: ``k', v'`` ``[B, Hkv, T, D]``."""
    b, hkv, t, d = k.shape
    taps, beta = core.conv_weight.detach(), core.conv_bias.detach()
    raw = torch.cat([k.transpose(1, 2).flatten(2), v.transpose(1, 2).flatten(2)], -1)  # [B, T, C]
    padded = F.pad(raw, (0, 0, taps.shape[1] - 1, 0))
    mixed = beta + sum(padded[:, i : i + t] * taps[:, i] for i in range(taps.shape[1]))
    k2, v2 = mixed.split(raw.shape[-1] // 2, -1)
    return k2.view(b, t, hkv, d).transpose(1, 2), v2.view(b, t, hkv, d).transpose(1, 2)


def _visible(t: int, window: int, sinks: int) -> torch.Tensor:
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    return (j <= i) & ((i - j < window) | (j < sinks))


@pytest.mark.parametrize("local_window", [0, 10])
def test_workers_use_conv_keys_and_non_workers_their_window(local_window):
    """Seed (``local_window = 0``): non-workers output 0. A window covering the input: the causal
    softmax over the conv'd keys, ungated. Workers: the same at both settings, gated."""
    site, weights = attention_site(d_model=D_MODEL)
    core = randomize(build("worker", site, weights, interval=4, local_window=local_window))
    q, k, v, h = qkv_inputs(site, 1, 10, D_MODEL, seed=2)
    out = core(q, k, v, hidden=h)
    workers = torch.tensor([3, 7, 9])
    others = torch.tensor([i for i in range(10) if i not in workers])
    k2, v2 = _conv_keys(core, k, v)
    dense = F.scaled_dot_product_attention(q, k2, v2, is_causal=True, scale=site.scale, enable_gqa=True)
    gate = 2 * torch.sigmoid(core.gate(h)).view(1, 10, site.num_heads, -1).transpose(1, 2)
    torch.testing.assert_close(out[:, :, workers], (dense * gate)[:, :, workers], rtol=1e-10, atol=1e-10)
    if local_window == 0:
        assert out[:, :, others].abs().max() == 0
    else:
        torch.testing.assert_close(out[:, :, others], dense[:, :, others], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("length", "interval", "window", "sinks"),
                         [(13, 4, 3, 2), (13, 3, 1, 0), (150, 4, 5, 1), (150, 2, 70, 4), (9, 5, 4, 20)])
def test_non_workers_see_their_window_and_sinks(length, interval, window, sinks):
    """Non-worker ``t`` over ``{j ≤ t : t − j < window or j < sinks}``, across query blocks."""
    site, weights = attention_site(d_model=D_MODEL)
    core = randomize(build("worker", site, weights, interval=interval, local_window=window, sinks=sinks))
    q, k, v, h = qkv_inputs(site, 2, length, D_MODEL, seed=3)
    out = core(q, k, v, hidden=h)
    k2, v2 = _conv_keys(core, k, v)
    want = masked_sdpa(q, k2, v2, _visible(length, window, sinks), site.scale)
    pos = torch.arange(length)
    others = (pos % interval != interval - 1) & (pos != length - 1)
    torch.testing.assert_close(out[:, :, others], want[:, :, others], rtol=1e-10, atol=1e-10)


def test_local_window_zero_is_the_seed_and_leaves_workers_alone():
    """The window changes the non-worker rows only: worker rows are bit-identical with and without it,
    and without it the non-worker rows are exactly 0 (the seed)."""
    site, weights = attention_site(d_model=D_MODEL)
    seed = randomize(build("worker", site, weights, interval=3, local_window=0))
    local = build("worker", site, weights, interval=3, local_window=4, sinks=1)
    local.load_state_dict(seed.state_dict())
    q, k, v, h = qkv_inputs(site, 2, 40, D_MODEL, seed=4)
    a, b = seed(q, k, v, hidden=h), local(q, k, v, hidden=h)
    workers = worker_positions(0, 40, 3, torch.device("cpu"))
    others = torch.ones(40, dtype=torch.bool)
    others[workers] = False
    assert torch.equal(a[:, :, workers], b[:, :, workers])
    assert a[:, :, others].abs().max() == 0 and b[:, :, others].abs().min() > 0


@pytest.mark.parametrize("interval", [2, 3, 4, 7])
def test_start_with_a_window_covering_the_input_is_host_attention(interval):
    """At the start (identity taps, zero gate) every row is the host's causal attention once the
    window covers the input, for every interval (the seed's start preserves the host at k = 1 only)."""
    site, weights = attention_site(d_model=D_MODEL)
    core = build("worker", site, weights, interval=interval, local_window=17)
    q, k, v, h = qkv_inputs(site, 2, 17, D_MODEL, seed=5)
    ref = SdpaAttention(site.num_heads, site.num_kv_heads, site.scale, causal=True)(q, k, v)
    torch.testing.assert_close(core(q, k, v, hidden=h), ref, rtol=1e-12, atol=1e-12)


def test_right_padding_gives_each_sequence_what_it_gives_alone():
    site, weights = attention_site(d_model=D_MODEL)
    core = randomize(build("worker", site, weights, interval=3, local_window=4, sinks=1))
    q, k, v, h = qkv_inputs(site, 2, 23, D_MODEL, seed=6)
    out = core(q, k, v, padding_bias([23, 15], 23), hidden=h)
    alone = core(q[1:, :, :15], k[1:, :, :15], v[1:, :, :15], hidden=h[1:, :15])
    torch.testing.assert_close(out[1:, :, :15], alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:1], core(q[:1], k[:1], v[:1], hidden=h[:1]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("local_window", [0, 4])
def test_state_is_the_seeds_full_cache(local_window):
    """The window reads the workers' cache: the state is the same, its bytes ``state_bytes``."""
    site, weights = attention_site(d_model=D_MODEL, dtype=torch.float32)
    core = randomize(build("worker", site, weights, interval=3, local_window=local_window, sinks=1))
    q, k, v, h = qkv_inputs(site, 1, 19, D_MODEL, seed=7, dtype=torch.float32)
    state: dict = {}
    with torch.no_grad():
        core(q[:, :, :11], k[:, :, :11], v[:, :, :11], hidden=h[:, :11], state=state)
        core(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], hidden=h[:, 11:], state=state)
    tensors = [t for t in state.values() if isinstance(t, torch.Tensor)]
    assert sum(t.numel() * t.element_size() for t in tensors) == core.state_bytes(19)
    assert state["k"].shape[1] == 19 and state["pos"] == 19


@pytest.mark.parametrize("options", [{"local_window": -1}, {"sinks": -1}])
def test_refuses_negative_window_options(options):
    with pytest.raises(swapformer.ConfigError):
        WorkerConfig(**options)


@pytest.mark.parametrize("gated", [False, True])
def test_ffn_interval_one_is_the_host_ffn(gated):
    site, weights = ffn_site(activation="gelu", gated=gated)
    core = build("worker", site, weights, kind="ffn", interval=1)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    up = F.linear(x, weights["mlp.up.weight"], weights["mlp.up.bias"])
    if gated:
        hidden = F.gelu(F.linear(x, weights["mlp.gate.weight"], weights["mlp.gate.bias"])) * up
    else:
        hidden = F.gelu(up)
    host = F.linear(hidden, weights["mlp.down.weight"], weights["mlp.down.bias"])
    torch.testing.assert_close(core(x), host)
    assert core.new_parameters() == []


def test_ffn_updates_worker_rows_only_and_tracks_position_in_state():
    site, weights = ffn_site(activation="relu")
    core = build("worker", site, weights, kind="ffn", interval=4)
    x = torch.randn(1, 10, 12, dtype=torch.float64)
    y = core(x)
    rows = y.abs().sum(-1)[0] > 0
    assert rows.nonzero().flatten().tolist() == [3, 7, 9]
    state: dict = {}
    steps = torch.cat([core(x[:, i : i + 1], state=state) for i in range(10)], 1)
    # every step's token is a transient worker; residue rows agree with the full call
    torch.testing.assert_close(steps[:, [3, 7, 9]], y[:, [3, 7, 9]])
    assert state["pos"] == 10


def test_explicit_sizes_constructors():
    attn = WorkerAttention(9, 3, 64, d_model=576, config=WorkerConfig(interval=4))
    assert attn.conv_weight.shape == (2 * 3 * 64, 3)
    assert attn.flops_per_token(8192) < 4 * 9 * 64 * 8192
    seed = WorkerAttention(9, 3, 64, d_model=576, config=WorkerConfig(interval=4, local_window=0))
    # the window adds 3/4 of the rows × (64 + 4) keys
    assert attn.flops_per_token(8192) - seed.flops_per_token(8192) == 4 * 9 * 64 * 68 * 3 // 4
    ffn = WorkerFFN(16, 32, "silu", gated=True)
    assert ffn(torch.randn(2, 5, 16)).shape == (2, 5, 16)


@pytest.mark.parametrize(("heads", "interval", "local_window"), [((4, 2, 8), 4, 3), ((6, 3, 4), 3, 0),
                                                                  ((3, 1, 8), 2, 5), ((2, 2, 6), 1, 0)])
def test_one_repeat_fast_path_equals_the_masked_sdpa(heads, interval, local_window):
    """A call ending with one repeat (every decoding step) attends without copying the cache; the
    masked SDPA over the concatenated keys is the reference: outputs and state after every call."""
    num_heads, num_kv_heads, head_dim = heads
    site, weights = attention_site(num_heads, num_kv_heads, head_dim, d_model=D_MODEL, qkv_bias=True)
    core = randomize(build("worker", site, weights, interval=interval, local_window=local_window))
    q, k, v, h = qkv_inputs(site, 2, 30, D_MODEL, seed=3)
    bounds = [0, 6, 7, 8, 11, 12, 13, 14, 15]  # calls of 6, 1, 1, 3, 1, ... stored tokens
    results = []
    for fast in (True, False):
        core.one_transient_fast = fast
        state: dict = {}
        outs, states = [], []
        for i, (a, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            r = slice(15 + i, 16 + i)  # the repeat's own row (another residual stream in a model)
            call = [torch.cat([x[:, :, a:e], x[:, :, r]], 2) for x in (q, k, v)]
            outs.append(core(*call, hidden=torch.cat([h[:, a:e], h[:, r]], 1), state=state, transients=1))
            states.append(dict(state))
        results.append((outs, states))
    (fast_outs, fast_states), (slow_outs, slow_states) = results
    assert_same_decode(fast_outs, fast_states, slow_outs, slow_states)
