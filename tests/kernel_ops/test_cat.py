"""CAT attention: reference vs dense masked softmax and FlexAttention, Triton flash kernels, GQA, sink."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from swapformer.kernels.cat import (
    cat_attention,
    cat_attention_flex,
    cat_visible_mask,
    flex_available,
    naive_cat_attention,
)
from swapformer.kernels.cat.op import cat_attention_op
from swapformer.kernels.testing import assert_close

from .helpers import PROPERTY_HEAVY, compare_all, cotangents_like, fwd_bwd

NAMES = ("o", "dq", "dk", "dv", "dkc", "dvc", "dsink_k", "dsink_v")


def make_inputs(B, T, H, Hkv, D, C, sink, dtype=torch.float32):
    N = -(-T // C)
    q = torch.randn(B, T, H, D, dtype=dtype)
    k, v = torch.randn(B, T, Hkv, D, dtype=dtype), torch.randn(B, T, Hkv, D, dtype=dtype)
    kc, vc = torch.randn(B, N, Hkv, D, dtype=dtype), torch.randn(B, N, Hkv, D, dtype=dtype)
    sk = torch.randn(Hkv, D, dtype=dtype) if sink else None
    sv = torch.randn(Hkv, D, dtype=dtype) if sink else None
    return q, k, v, kc, vc, sk, sv


def reference(C):
    return lambda q, k, v, kc, vc, sk, sv: (naive_cat_attention(q, k, v, kc, vc, C, q.shape[-1] ** -0.5, sk, sv),)


def via_api(C, **kw):
    def run(q, k, v, kc, vc, sk, sv):
        return (cat_attention(q, k, v, kc, vc, chunk_size=C, scale=q.shape[-1] ** -0.5, sink_k=sk, sink_v=sv, **kw),)

    return run


def dense(q, k, v, kc, vc, sk, sv, C):
    """Independent check: one masked softmax over ``[sink | kc | k]`` for the whole sequence."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    keys, vals = torch.cat([kc, k], 1), torch.cat([vc, v], 1)
    mask = cat_visible_mask(T, C)
    if sk is not None:
        keys = torch.cat([sk.expand(B, 1, *sk.shape), keys], 1)
        vals = torch.cat([sv.expand(B, 1, *sv.shape), vals], 1)
        mask = torch.cat([torch.ones(T, 1, dtype=torch.bool), mask], 1)
    keys, vals = keys.repeat_interleave(G, 2), vals.repeat_interleave(G, 2)
    logits = torch.einsum("bthd,bshd->bhts", q, keys) * D**-0.5
    p = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhts,bshd->bthd", p, vals)


shapes = st.tuples(
    st.integers(1, 2), st.integers(1, 30), st.sampled_from([(1, 1), (2, 1), (4, 2)]), st.integers(1, 9),
    st.booleans(),
)


@PROPERTY_HEAVY
@given(shape=shapes)
def test_reference_matches_dense_mask(shape):
    B, T, (H, Hkv), C, sink = shape
    inputs = make_inputs(B, T, H, Hkv, 4, C, sink, dtype=torch.float64)
    torch.testing.assert_close(reference(C)(*inputs)[0], dense(*inputs, C))


def test_single_chunk_is_causal_attention():
    q, k, v, kc, vc, _, _ = make_inputs(2, 12, 4, 2, 8, 12, False, dtype=torch.float64)
    o = cat_attention(q, k, v, kc, vc, chunk_size=12, scale=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=0.3, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(o, ref)


@PROPERTY_HEAVY
@given(shape=shapes)
def test_op_backward_matches_autograd_of_reference(shape):
    B, T, (H, Hkv), C, sink = shape
    inputs = make_inputs(B, T, H, Hkv, 4, C, sink, dtype=torch.float64)
    cot = cotangents_like(reference(C)(*inputs))
    ref = fwd_bwd(reference(C), inputs, cot)
    out = fwd_bwd(via_api(C, backend="naive"), inputs, cot)
    compare_all(NAMES, ref[0] + ref[1], out[0] + out[1], ratio=1e-9)


@pytest.mark.skipif(not flex_available(), reason="FlexAttention missing from this torch build")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("sink", [False, True])
def test_flex_matches_reference(sink):
    q, k, v, kc, vc, sk, sv = make_inputs(2, 21, 4, 2, 8, 5, sink)
    try:
        o = cat_attention_flex(q, k, v, kc, vc, chunk_size=5, scale=8**-0.5, sink_k=sk, sink_v=sv)
    except (RuntimeError, NotImplementedError) as err:  # pragma: no cover - depends on the torch build
        pytest.skip(f"FlexAttention unsupported on CPU here: {err}")
    assert_close("o", naive_cat_attention(q, k, v, kc, vc, 5, 8**-0.5, sk, sv), o, 1e-5)


def test_opcheck():
    q, k, v, kc, vc, sk, sv = (x.requires_grad_() for x in make_inputs(2, 7, 2, 1, 4, 3, True))
    torch.library.opcheck(cat_attention_op, (q, k, v, kc, vc, sk, sv, 3, 0.5, "naive"))
    torch.library.opcheck(cat_attention_op, (q, k, v, kc, vc, None, None, 3, 0.5, "naive"))


def test_shape_errors():
    q, k, v, kc, vc, sk, sv = make_inputs(1, 8, 3, 2, 4, 4, True)
    with pytest.raises(ValueError, match="multiple"):
        cat_attention(q, k, v, kc, vc, chunk_size=4, scale=1.0)
    q, k, v, kc, vc, sk, sv = make_inputs(1, 8, 2, 2, 4, 4, True)
    with pytest.raises(ValueError, match="ceil"):
        cat_attention(q, k, v, kc[:, :1], vc[:, :1], chunk_size=4, scale=1.0)
    with pytest.raises(ValueError, match="together"):
        cat_attention(q, k, v, kc, vc, chunk_size=4, scale=1.0, sink_k=sk)


TRITON_CASES = [
    pytest.param((1, 1, 1, 1, 16, 4, False), id="B1-T1-H1-D16-C4"),
    pytest.param((2, 37, 4, 2, 16, 5, True), id="B2-T37-H4-Hkv2-D16-C5-sink"),
    pytest.param((1, 45, 2, 1, 32, 16, True), id="B1-T45-H2-Hkv1-D32-C16-sink"),
    pytest.param((1, 20, 2, 2, 8, 64, False), id="B1-T20-H2-D8-C64"),
]


@pytest.mark.interpret
@pytest.mark.parametrize("shape", TRITON_CASES)
def test_triton_matches_reference(shape, nan_empty):
    *dims, C, sink = shape
    inputs = make_inputs(*dims, C, sink)
    cot = cotangents_like(reference(C)(*inputs))
    ref = fwd_bwd(reference(C), inputs, cot)
    out = fwd_bwd(via_api(C, backend="triton"), inputs, cot)
    compare_all(NAMES, ref[0] + ref[1], out[0] + out[1], ratio=1e-5, atol=1e-6)


@pytest.mark.interpret
def test_triton_lse_matches_reference():
    q, k, v, kc, vc, sk, sv = make_inputs(1, 19, 2, 1, 16, 4, True)
    o, lse = cat_attention_op(q, k, v, kc, vc, sk, sv, 4, 0.25, "triton")
    o_ref, lse_ref = naive_cat_attention(q, k, v, kc, vc, 4, 0.25, sk, sv, return_lse=True)
    assert_close("o", o_ref, o)
    assert_close("lse", lse_ref, lse)


@pytest.mark.interpret
def test_triton_opcheck():
    inputs = make_inputs(1, 6, 2, 1, 16, 4, True)
    torch.library.opcheck(
        cat_attention_op, (*inputs, 4, 0.25, "triton"), test_utils=("test_schema", "test_faketensor")
    )
