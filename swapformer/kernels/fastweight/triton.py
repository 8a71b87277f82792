"""Triton kernels for the T2FW decay rule (derivation in ``README.md``).

Two forward kernels, one program per (value block, batch·head), state kept in registers as
``Sᵀ [BK, BV]`` in float32:

- ``fastweight_fwd_chunk_kernel``: 16-token blocks. Inter-block through the state (two ``tl.dot``),
  intra-block with exact pairwise decays ``exp(b_i - b_j)``, ``exp(a_i - a_j)`` (``j ≤ i``, exponents ≤ 0)
  from log-space cumulative gates, so nothing overflows however small the gates are.
- ``fastweight_fwd_recurrent_kernel``: one token at a time, for decoding.

The backward pass (``op.py``) calls the same launcher three times on transposed / time-reversed
problems, so there is no separate backward kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swapformer.kernels.triton_utils import autotune, pow2
from swapformer.kernels.utils import LOG_GATE_MIN

_WARPS = [triton.Config({}, num_warps=w) for w in (4, 8, 2)]


@autotune(_WARPS, key=["K", "V", "BT"])
@triton.jit
def fastweight_fwd_chunk_kernel(
    q, k, v, f, fh, h0, o, ht, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, LOG_MIN: tl.constexpr,
):  # fmt: skip
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    ok, ov, ot = tl.arange(0, BK), i_v * BV + tl.arange(0, BV), tl.arange(0, BT)
    mk, mv = ok < K, ov < V
    mkv = mk[:, None] & mv[None, :]
    # Sᵀ[k, v]; the state tensors are [B, H, V, K]
    p_s = i_bh.to(tl.int64) * V * K + ov[None, :] * K + ok[:, None]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + p_s, mask=mkv, other=0.0)
    base_k = i_b.to(tl.int64) * T * H * K + i_h * K
    base_v = i_b.to(tl.int64) * T * H * V + i_h * V
    for t0 in range(0, T, BT):
        rows = t0 + ot
        mr = rows < T
        p_k = base_k + rows[:, None] * (H * K) + ok[None, :]
        p_v = base_v + rows[:, None] * (H * V) + ov[None, :]
        m_k, m_v = mr[:, None] & mk[None, :], mr[:, None] & mv[None, :]
        bq = tl.load(q + p_k, mask=m_k, other=0.0).to(tl.float32)
        bk = tl.load(k + p_k, mask=m_k, other=0.0).to(tl.float32)
        bv = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
        # padded rows get unit gates (log 0), so the last row's cumulative gate is the block's
        lfh = tl.maximum(tl.log(tl.load(fh + p_k, mask=m_k, other=1.0).to(tl.float32)), LOG_MIN)
        lf = tl.maximum(tl.log(tl.load(f + p_v, mask=m_v, other=1.0).to(tl.float32)), LOG_MIN)
        b = tl.cumsum(lfh, 0)  # [BT, BK]
        a = tl.cumsum(lf, 0)  # [BT, BV]
        bo = tl.exp(a) * tl.dot(bq * tl.exp(b), S, input_precision="ieee")
        for j in range(BT):
            sel = (ot == j)[:, None]
            kj = tl.sum(tl.where(sel, bk, 0.0), 0)
            bj = tl.sum(tl.where(sel, b, 0.0), 0)
            vj = tl.sum(tl.where(sel, bv, 0.0), 0)
            aj = tl.sum(tl.where(sel, a, 0.0), 0)
            causal = (ot >= j)[:, None]
            # the exponent is masked before exp so that j > i never evaluates exp(+large)
            s = tl.sum(bq * kj[None, :] * tl.exp(tl.where(causal, b - bj[None, :], 0.0)), 1)
            w = tl.exp(tl.where(causal, a - aj[None, :], 0.0))
            bo += tl.where(causal, s[:, None] * vj[None, :] * w, 0.0)
        tl.store(o + p_v, bo.to(o.dtype.element_ty), mask=m_v)
        b_last = tl.sum(tl.where((ot == BT - 1)[:, None], b, 0.0), 0)
        a_last = tl.sum(tl.where((ot == BT - 1)[:, None], a, 0.0), 0)
        kd = bk * tl.exp(b_last[None, :] - b)
        vd = bv * tl.exp(a_last[None, :] - a)
        S = S * tl.exp(b_last)[:, None] * tl.exp(a_last)[None, :]
        S += tl.dot(tl.trans(kd), vd, input_precision="ieee")
    tl.store(ht + p_s, S, mask=mkv)


@autotune(_WARPS, key=["K", "V"])
@triton.jit
def fastweight_fwd_recurrent_kernel(
    q, k, v, f, fh, h0, o, ht, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr,
):  # fmt: skip
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    ok, ov = tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    mkv = mk[:, None] & mv[None, :]
    p_s = i_bh.to(tl.int64) * V * K + ov[None, :] * K + ok[:, None]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + p_s, mask=mkv, other=0.0)
    p_k = i_b.to(tl.int64) * T * H * K + i_h * K + ok
    p_v = i_b.to(tl.int64) * T * H * V + i_h * V + ov
    for _ in range(T):
        bq = tl.load(q + p_k, mask=mk, other=0.0).to(tl.float32)
        bk = tl.load(k + p_k, mask=mk, other=0.0).to(tl.float32)
        bfh = tl.load(fh + p_k, mask=mk, other=1.0).to(tl.float32)
        bv = tl.load(v + p_v, mask=mv, other=0.0).to(tl.float32)
        bf = tl.load(f + p_v, mask=mv, other=1.0).to(tl.float32)
        S = S * bfh[:, None] * bf[None, :] + bk[:, None] * bv[None, :]
        tl.store(o + p_v, tl.sum(S * bq[:, None], 0).to(o.dtype.element_ty), mask=mv)
        p_k += H * K
        p_v += H * V
    tl.store(ht + p_s, S, mask=mkv)


def fastweight_decay_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    f: torch.Tensor,
    fhat: torch.Tensor,
    h0: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    recurrent: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: ``(o [B, T, H, V] in out_dtype, S_T [B, H, V, K] float32)``.

    ``q, k, fhat`` are ``[B, T, H, K]``, ``v, f`` are ``[B, T, H, V]``, ``h0`` is ``[B, H, V, K]`` or None.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, f, fhat = (x.contiguous() for x in (q, k, v, f, fhat))
    o = torch.empty(B, T, H, V, dtype=out_dtype, device=q.device)
    ht = torch.empty(B, H, V, K, dtype=torch.float32, device=q.device)
    use_h0 = h0 is not None
    h0 = h0.to(torch.float32).contiguous() if use_h0 else ht
    BK = pow2(K)
    # the register state is BK×BV floats: at most 4K per program, which also splits V into more
    # programs (the grid is only V/BV × B·H, and each program walks the whole sequence)
    BV = min(pow2(V), max(16, 4096 // BK))
    grid = (triton.cdiv(V, BV), B * H)
    args = (q, k, v, f, fhat, h0, o, ht, T)
    if recurrent:
        fastweight_fwd_recurrent_kernel[grid](*args, H=H, K=K, V=V, BK=BK, BV=BV, USE_H0=use_h0)
    else:
        fastweight_fwd_chunk_kernel[grid](
            *args, H=H, K=K, V=V, BT=16, BK=BK, BV=BV, USE_H0=use_h0, LOG_MIN=LOG_GATE_MIN
        )
    return o, ht
