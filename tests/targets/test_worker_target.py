"""``"worker"``: worker sets (seeds 1.1), the function-preserving start at k = 1 (seeds 1.8), the FFN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from target_helpers import attention_site, build, ffn_site, qkv_inputs, randomize

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


def test_non_workers_output_zero_and_workers_use_conv_keys():
    site, weights = attention_site(d_model=D_MODEL)
    core = randomize(build("worker", site, weights, interval=4))
    q, k, v, h = qkv_inputs(site, 1, 10, D_MODEL, seed=2)
    out = core(q, k, v, hidden=h)
    workers = torch.tensor([3, 7, 9])
    others = torch.tensor([i for i in range(10) if i not in workers])
    assert out[:, :, others].abs().max() == 0
    # reference: conv over [k|v] (explicit taps), dense causal softmax at the worker rows, gate
    taps, beta = core.conv_weight.detach(), core.conv_bias.detach()
    raw = torch.cat([k.transpose(1, 2).flatten(2), v.transpose(1, 2).flatten(2)], -1)  # [B, T, C]
    padded = F.pad(raw, (0, 0, 2, 0))
    mixed = beta + sum(padded[:, i : i + 10] * taps[:, i] for i in range(3))
    k2, v2 = mixed.split(raw.shape[-1] // 2, -1)
    k2 = k2.view(1, 10, site.num_kv_heads, -1).transpose(1, 2)
    v2 = v2.view(1, 10, site.num_kv_heads, -1).transpose(1, 2)
    dense = F.scaled_dot_product_attention(q, k2, v2, is_causal=True, scale=site.scale, enable_gqa=True)
    gate = 2 * torch.sigmoid(core.gate(h)).view(1, 10, site.num_heads, -1).transpose(1, 2)
    torch.testing.assert_close(out[:, :, workers], (dense * gate)[:, :, workers], rtol=1e-10, atol=1e-10)


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
    ffn = WorkerFFN(16, 32, "silu", gated=True)
    assert ffn(torch.randn(2, 5, 16)).shape == (2, 5, 16)
