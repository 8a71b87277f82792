"""Worker attention and the causal depthwise conv (+ gather): references, op backward, Triton kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from swapformer.kernels.worker import (
    blocked,
    causal_dwconv,
    causal_dwconv_gather,
    naive_causal_dwconv,
    naive_worker_attention,
    worker_attention,
)
from swapformer.kernels.worker.op import causal_dwconv_op, worker_attention_op

from .helpers import PROPERTY, PROPERTY_HEAVY, compare_all, cotangents_like, fwd_bwd


def worker_positions(T: int, interval: int) -> torch.Tensor:
    """``{t : t mod k = k-1} ∪ {T-1}`` (``seeds.md`` §1.1)."""
    idx = set(range(interval - 1, T, interval)) | {T - 1}
    return torch.tensor(sorted(idx), dtype=torch.int64)


def make_attn(B, T, H, Hkv, D, interval, dtype=torch.float32):
    idx = worker_positions(T, interval)
    q_w = torch.randn(B, len(idx), H, D, dtype=dtype)
    return q_w, torch.randn(B, T, Hkv, D, dtype=dtype), torch.randn(B, T, Hkv, D, dtype=dtype), idx


def attn_ref(q_w, k, v, idx):
    return (naive_worker_attention(q_w, k, v, idx, q_w.shape[-1] ** -0.5),)


def attn_api(**kw):
    return lambda q_w, k, v, idx: (worker_attention(q_w, k, v, idx, scale=q_w.shape[-1] ** -0.5, **kw),)


def make_conv(B, T, d, K, dtype=torch.float32):
    return torch.randn(B, T, d, dtype=dtype), torch.randn(d, K, dtype=dtype), torch.randn(d, dtype=dtype)


def conv_ref(idx):
    def run(x, w, b):
        u = naive_causal_dwconv(x, w, b)
        return u, u[:, idx]

    return run


def conv_api(idx, **kw):
    return lambda x, w, b: causal_dwconv_gather(x, w, b, idx, **kw)


attn_shapes = st.tuples(
    st.integers(1, 2), st.integers(1, 30), st.sampled_from([(1, 1), (2, 1), (4, 2)]), st.integers(1, 6)
)


@PROPERTY
@given(shape=attn_shapes)
def test_interval_one_is_causal_attention(shape):
    B, T, (H, Hkv), _ = shape
    q, k, v, idx = make_attn(B, T, H, Hkv, 4, 1, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(worker_attention(q, k, v, idx, scale=0.5), ref)


def reference_lse(q_w, k, idx, scale):
    g = q_w.shape[2] // k.shape[2]
    logits = torch.einsum("bwhd,bjhd->bhwj", q_w, k.repeat_interleave(g, 2)) * scale
    hidden = torch.arange(k.shape[1])[None, :] > idx[:, None]
    return logits.masked_fill(hidden, float("-inf")).logsumexp(-1)


@PROPERTY
@given(shape=attn_shapes, block_floats=st.sampled_from([1, 40, 2**23]), block=st.sampled_from([1, 3, 256]))
def test_blocked_forms_match_the_reference(shape, block_floats, block):
    """The CPU paths (op forward with its lse; inference through SDPA) at any block size."""
    B, T, (H, Hkv), interval = shape
    q_w, k, v, idx = make_attn(B, T, H, Hkv, 4, interval, dtype=torch.float64)
    ref = naive_worker_attention(q_w, k, v, idx, 0.5)
    saved, blocked.BLOCK_FLOATS = blocked.BLOCK_FLOATS, block_floats
    try:
        o, lse = blocked.blocked_worker_attention_lse(q_w, k, v, idx, 0.5)
    finally:
        blocked.BLOCK_FLOATS = saved
    torch.testing.assert_close(o, ref)
    torch.testing.assert_close(lse, reference_lse(q_w, k, idx, 0.5).float())
    torch.testing.assert_close(blocked.blocked_worker_attention(q_w, k, v, idx, 0.5, block=block), ref)


def test_inference_takes_the_sdpa_blocks_and_training_the_op(monkeypatch):
    q_w, k, v, idx = make_attn(1, 12, 2, 1, 4, 4, dtype=torch.float64)
    calls = []
    real = blocked.blocked_worker_attention
    monkeypatch.setattr("swapformer.kernels.worker.blocked_worker_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        worker_attention(q_w, k, v, idx, scale=0.5, backend="naive")
    worker_attention(q_w.requires_grad_(), k, v, idx, scale=0.5, backend="naive").sum().backward()
    assert calls == [1] and q_w.grad is not None


@PROPERTY_HEAVY
@given(shape=attn_shapes)
def test_attention_op_backward_matches_autograd(shape):
    B, T, (H, Hkv), interval = shape
    inputs = make_attn(B, T, H, Hkv, 4, interval, dtype=torch.float64)
    cot = cotangents_like(attn_ref(*inputs))
    ref = fwd_bwd(attn_ref, inputs, cot)
    out = fwd_bwd(attn_api(backend="naive"), inputs, cot)
    compare_all(("o", "dq", "dk", "dv", "didx"), ref[0] + ref[1], out[0] + out[1], ratio=1e-9)


@PROPERTY_HEAVY
@given(B=st.integers(1, 2), T=st.integers(1, 20), d=st.integers(1, 6), K=st.integers(1, 4))
def test_conv_matches_conv1d(B, T, d, K):
    x, w, b = make_conv(B, T, d, K, dtype=torch.float64)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), w[:, None, :], b, groups=d).transpose(1, 2)
    torch.testing.assert_close(causal_dwconv(x, w, b), ref)
    idx = worker_positions(T, 3)
    inputs = (x, w, b)
    cot = cotangents_like(conv_ref(idx)(*inputs))
    ref = fwd_bwd(conv_ref(idx), inputs, cot)
    out = fwd_bwd(conv_api(idx, backend="naive"), inputs, cot)
    compare_all(("u", "uw", "dx", "dw", "db"), ref[0] + ref[1], out[0] + out[1], ratio=1e-9)


def test_conv_without_bias():
    x, w, _ = make_conv(2, 9, 3, 3)
    torch.testing.assert_close(causal_dwconv(x, w, None), naive_causal_dwconv(x, w, None))


def test_opcheck():
    q, k, v, idx = make_attn(2, 9, 2, 1, 4, 4)
    torch.library.opcheck(worker_attention_op, (q.requires_grad_(), k.requires_grad_(), v, idx, 0.5, "naive"))
    x, w, b = (t.requires_grad_() for t in make_conv(2, 9, 3, 3))
    torch.library.opcheck(causal_dwconv_op, (x, w, b, idx, "naive"))
    torch.library.opcheck(causal_dwconv_op, (x, w, None, None, "naive"))


@pytest.mark.interpret
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((1, 1, 1, 1, 16, 4), id="B1-T1-H1-D16-k4"),
        pytest.param((2, 37, 4, 2, 16, 4), id="B2-T37-H4-Hkv2-D16-k4"),
        pytest.param((1, 45, 2, 1, 32, 1), id="B1-T45-H2-Hkv1-D32-k1"),
    ],
)
def test_triton_attention_matches_reference(shape, nan_empty):
    inputs = make_attn(*shape)
    cot = cotangents_like(attn_ref(*inputs))
    ref = fwd_bwd(attn_ref, inputs, cot)
    out = fwd_bwd(attn_api(backend="triton"), inputs, cot)
    compare_all(("o", "dq", "dk", "dv", "didx"), ref[0] + ref[1], out[0] + out[1], ratio=1e-5, atol=1e-6)


@pytest.mark.interpret
@pytest.mark.parametrize(
    "shape", [pytest.param((1, 1, 3, 3), id="B1-T1-d3-K3"), pytest.param((2, 37, 40, 3), id="B2-T37-d40-K3")]
)
def test_triton_conv_matches_reference(shape, nan_empty):
    B, T, d, K = shape
    inputs = make_conv(B, T, d, K)
    idx = worker_positions(T, 4)
    cot = cotangents_like(conv_ref(idx)(*inputs))
    ref = fwd_bwd(conv_ref(idx), inputs, cot)
    out = fwd_bwd(conv_api(idx, backend="triton"), inputs, cot)
    compare_all(("u", "uw", "dx", "dw", "db"), ref[0] + ref[1], out[0] + out[1], ratio=1e-5, atol=1e-6)


@pytest.mark.interpret
def test_triton_opcheck():
    q, k, v, idx = make_attn(1, 6, 2, 1, 16, 4)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(worker_attention_op, (q, k, v, idx, 0.25, "triton"), test_utils=utils)
    torch.library.opcheck(causal_dwconv_op, (*make_conv(1, 6, 4, 3), idx, "triton"), test_utils=utils)
