"""T2FW decay rule: references agree, op backward is exact, Triton kernels match the references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from swapformer.kernels.fastweight import (
    fastweight_decay,
    fastweight_decay_recurrent,
    naive_fastweight_decay_chunked,
    naive_fastweight_decay_recurrent,
)
from swapformer.kernels.fastweight.op import fastweight_decay_op
from swapformer.kernels.testing import assert_close

from .helpers import PROPERTY, compare_all, cotangents_like, fwd_bwd

NAMES = ("o", "ht", "dq", "dk", "dv", "df", "dfhat", "dh0")


def make_inputs(B, T, H, K, V, dtype=torch.float32, h0=True, gate_scale=1.0):
    q, k = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, H, V, dtype=dtype)
    f = (gate_scale * torch.randn(B, T, H, V, dtype=dtype) + 1).sigmoid()
    fhat = (gate_scale * torch.randn(B, T, H, K, dtype=dtype) + 1).sigmoid()
    s0 = torch.randn(B, H, V, K, dtype=dtype) if h0 else None
    return q, k, v, f, fhat, s0


def reference(q, k, v, f, fhat, s0):
    return naive_fastweight_decay_recurrent(q, k, v, f, fhat, s0, True)


def via_api(fn, **kw):
    return lambda q, k, v, f, fhat, s0: fn(q, k, v, f, fhat, initial_state=s0, output_final_state=True, **kw)


shapes = st.tuples(
    st.integers(1, 2), st.integers(1, 40), st.integers(1, 2), st.integers(1, 6), st.integers(1, 6)
)


@PROPERTY
@given(shape=shapes, chunk=st.sampled_from([1, 3, 4, 8, 16]), h0=st.booleans())
def test_naive_chunked_matches_recurrent(shape, chunk, h0):
    inputs = make_inputs(*shape, dtype=torch.float64, h0=h0, gate_scale=3.0)
    o1, s1 = naive_fastweight_decay_recurrent(*inputs, True)
    o2, s2 = naive_fastweight_decay_chunked(*inputs, True, chunk_size=chunk)
    torch.testing.assert_close(o2, o1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s1, rtol=1e-10, atol=1e-10)


def test_unit_gates_reduce_to_linear_attention():
    q, k, v, f, fhat, _ = make_inputs(2, 11, 2, 4, 3, dtype=torch.float64, h0=False)
    o, _ = fastweight_decay(q, k, v, torch.ones_like(f), torch.ones_like(fhat), chunk_size=4)
    scores = torch.einsum("bihk,bjhk->bhij", q, k).tril()
    torch.testing.assert_close(o, torch.einsum("bhij,bjhv->bihv", scores, v))


@PROPERTY
@given(shape=shapes, chunk=st.sampled_from([2, 5, 16]), recurrent=st.booleans())
def test_op_backward_matches_autograd_of_reference(shape, chunk, recurrent):
    inputs = make_inputs(*shape, dtype=torch.float64)
    fn = fastweight_decay_recurrent if recurrent else fastweight_decay
    outs_ref, grads_ref = fwd_bwd(reference, inputs, cotangents_like(reference(*inputs)))
    cot = cotangents_like(outs_ref)
    outs_ref, grads_ref = fwd_bwd(reference, inputs, cot)
    outs, grads = fwd_bwd(via_api(fn, chunk_size=chunk, backend="naive"), inputs, cot)
    compare_all(NAMES, outs_ref + grads_ref, outs + grads, ratio=1e-9)


@PROPERTY
@given(shape=shapes, split=st.integers(0, 40))
def test_state_continuation(shape, split):
    q, k, v, f, fhat, s0 = make_inputs(*shape, dtype=torch.float64)
    t = min(split, q.shape[1])
    o, s = fastweight_decay(q, k, v, f, fhat, initial_state=s0, output_final_state=True, chunk_size=4)
    first = [x[:, :t] for x in (q, k, v, f, fhat)]
    second = [x[:, t:] for x in (q, k, v, f, fhat)]
    o1, s1 = fastweight_decay(*first, initial_state=s0, output_final_state=True, chunk_size=4)
    o2, s2 = fastweight_decay_recurrent(*second, initial_state=s1, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o)
    torch.testing.assert_close(s2, s)


def test_tiny_gates_stay_finite():
    q, k, v, f, fhat, s0 = make_inputs(1, 37, 2, 4, 4)
    f, fhat = f * 1e-30, fhat.clone()
    fhat[:, 5] = 0.0
    o_ref, s_ref = naive_fastweight_decay_recurrent(q, k, v, f, fhat, s0, True)
    o, s = fastweight_decay(q, k, v, f, fhat, initial_state=s0, output_final_state=True, chunk_size=16)
    assert_close("o", o_ref, o, 1e-5)
    assert_close("ht", s_ref, s, 1e-5)


def test_opcheck():
    q, k, v, f, fhat, s0 = make_inputs(2, 7, 2, 3, 4)
    leaves = [x.requires_grad_() for x in (q, k, v, f, fhat, s0)]
    torch.library.opcheck(fastweight_decay_op, (*leaves, 4, False, "naive"))
    torch.library.opcheck(fastweight_decay_op, (*leaves[:5], None, 4, True, "naive"))


def test_shape_errors():
    q, k, v, f, fhat, s0 = make_inputs(1, 4, 1, 3, 2)
    with pytest.raises(ValueError):
        fastweight_decay(q, k, v, fhat, fhat)
    with pytest.raises(ValueError):
        fastweight_decay(q, k, v, f, fhat, initial_state=s0.transpose(-1, -2))
    with pytest.raises(ValueError):
        fastweight_decay(q, k, v, f, fhat, backend="cuda")


TRITON_CASES = [
    pytest.param((1, 1, 1, 4, 4), True, id="B1-T1-H1-K4-V4-h0"),
    pytest.param((2, 19, 1, 5, 3), False, id="B2-T19-H1-K5-V3"),
    pytest.param((1, 33, 2, 16, 8), True, id="B1-T33-H2-K16-V8-h0"),
]


@pytest.mark.interpret
@pytest.mark.parametrize("shape,h0", TRITON_CASES)
@pytest.mark.parametrize("recurrent", [False, True], ids=["chunk", "recurrent"])
def test_triton_matches_reference(shape, h0, recurrent, nan_empty):
    inputs = make_inputs(*shape, h0=h0)
    fn = fastweight_decay_recurrent if recurrent else fastweight_decay
    cot = cotangents_like(reference(*inputs))
    outs_ref, grads_ref = fwd_bwd(reference, inputs, cot)
    outs, grads = fwd_bwd(via_api(fn, backend="triton"), inputs, cot)
    compare_all(NAMES, outs_ref + grads_ref, outs + grads, ratio=1e-5, atol=1e-6)


@pytest.mark.interpret
def test_triton_decode_continues_prefill():
    q, k, v, f, fhat, s0 = make_inputs(1, 21, 2, 8, 8)
    o, s = fastweight_decay(q, k, v, f, fhat, initial_state=s0, output_final_state=True, backend="naive")
    head = [x[:, :20] for x in (q, k, v, f, fhat)]
    last = [x[:, 20:] for x in (q, k, v, f, fhat)]
    _, s1 = fastweight_decay(*head, initial_state=s0, output_final_state=True, backend="triton")
    o2, s2 = fastweight_decay_recurrent(*last, initial_state=s1, output_final_state=True, backend="triton")
    assert_close("o_last", o[:, 20:], o2)
    assert_close("ht", s, s2)


@pytest.mark.interpret
def test_triton_opcheck():
    q, k, v, f, fhat, s0 = make_inputs(1, 5, 1, 4, 4)
    leaves = [x.requires_grad_() for x in (q, k, v, f, fhat, s0)]
    torch.library.opcheck(
        fastweight_decay_op, (*leaves, 64, False, "triton"), test_utils=("test_schema", "test_faketensor")
    )
