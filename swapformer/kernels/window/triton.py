"""Triton forward kernel of sliding-window attention with sinks (spec: :mod:`.naive`).

One program per (block of ``BM`` queries, batch·head), flash-style online softmax in base 2 over two
key ranges: the sink block (keys ``0 .. SINKS − 1``, visited only by query blocks that reach past the
window, each sink seen only where it has left the row's window, so nothing counts twice), then the
window keys ``[m0 − WINDOW + 1, m0 + BM)`` (rounded down to ``BN``). Work ``O(T·(WINDOW + BM + SINKS))``.
Besides ``o`` it writes each row's max ``c`` (natural log units) and ``den = Σ e^{s − c}``.

Layout ``[B, H, T, D]`` through strides (the targets' layout; the last dim must be contiguous), GQA by
``kv head = head // (H / HKV)``. Forward only: with autograd the callers run their PyTorch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swapformer.kernels.cat.triton import _LN2, LOG2E
from swapformer.kernels.triton_utils import autotune, dot_precision, online_softmax_step, pow2

_FWD_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in ((16, 16, 4, 1), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 128, 8, 2))
]


@autotune(_FWD_CONFIGS, key=["D", "DV", "H", "HKV", "WINDOW", "SINKS"])
@triton.jit
def window_fwd_kernel(
    q, k, v, o, c, den, T, qk_scale,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    WINDOW: tl.constexpr, SINKS: tl.constexpr, BS: tl.constexpr,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_kv = i_h // (H // HKV)
    m0 = i_m * BM
    rows = m0 + tl.arange(0, BM)
    rows64 = rows.to(tl.int64)  # row · stride overflows int32 past ~3.7M tokens at SmolLM2's width
    od, ov = tl.arange(0, BD), tl.arange(0, BDV)
    q_base = q + i_b.to(tl.int64) * sq_b + i_h * sq_h
    k_base = k + i_b.to(tl.int64) * sk_b + i_kv * sk_h
    v_base = v + i_b.to(tl.int64) * sv_b + i_kv * sv_h
    bq = tl.load(q_base + rows64[:, None] * sq_t + od[None, :], mask=(rows[:, None] < T) & (od[None, :] < D), other=0.0)
    # finite start: a row whose first block is all hidden keeps alpha = 1 and p = 0 (no nan)
    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    if SINKS > 0:
        if m0 + BM - 1 >= WINDOW:  # some row of the block has sinks outside its window
            cols = tl.arange(0, BS)
            bk = tl.load(k_base + cols[:, None] * sk_t + od[None, :], mask=(cols[:, None] < SINKS) & (od[None, :] < D), other=0.0)
            bv = tl.load(v_base + cols[:, None] * sv_t + ov[None, :], mask=(cols[:, None] < SINKS) & (ov[None, :] < DV), other=0.0)
            s = tl.dot(bq, tl.trans(bk), input_precision=PREC) * qk_scale
            seen = (cols[None, :] < SINKS) & (rows[:, None] - cols[None, :] >= WINDOW)
            m_i, l_i, acc = online_softmax_step(tl.where(seen, s, float("-inf")), bv, m_i, l_i, acc, PREC)
    lo = tl.maximum(m0 - WINDOW + 1, 0) // BN * BN
    hi = tl.minimum(m0 + BM, T)
    for n0 in range(lo, hi, BN):
        cols = n0 + tl.arange(0, BN)
        cols64 = cols.to(tl.int64)
        bk = tl.load(k_base + cols64[:, None] * sk_t + od[None, :], mask=(cols[:, None] < T) & (od[None, :] < D), other=0.0)
        bv = tl.load(v_base + cols64[:, None] * sv_t + ov[None, :], mask=(cols[:, None] < T) & (ov[None, :] < DV), other=0.0)
        s = tl.dot(bq, tl.trans(bk), input_precision=PREC) * qk_scale
        seen = (cols[None, :] <= rows[:, None]) & (rows[:, None] - cols[None, :] < WINDOW)
        m_i, l_i, acc = online_softmax_step(tl.where(seen, s, float("-inf")), bv, m_i, l_i, acc, PREC)
    p_row = i_bh.to(tl.int64) * T + rows
    p_o = p_row[:, None] * DV + ov[None, :]
    tl.store(o + p_o, (acc / l_i[:, None]).to(o.dtype.element_ty), mask=(rows[:, None] < T) & (ov[None, :] < DV))
    tl.store(c + p_row, m_i * _LN2, mask=rows < T)
    tl.store(den + p_row, l_i, mask=rows < T)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def window_fwd(q, k, v, window: int, sinks: int, scale: float):
    """``(o [B, H, T, Dv] contiguous, c [B, H, T] fp32, den [B, H, T] fp32)``; k, v cast to q's dtype."""
    B, H, T, D = q.shape
    HKV, DV = k.shape[1], v.shape[-1]
    q = _last_dim_contiguous(q)
    k, v = (_last_dim_contiguous(x.to(q.dtype)) for x in (k, v))
    o = q.new_empty(B, H, T, DV)
    c = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    den = torch.empty_like(c)
    if T == 0:
        return o, c, den
    sinks = min(sinks, T)
    grid = lambda meta: (triton.cdiv(T, meta["BM"]), B * H)
    window_fwd_kernel[grid](
        q, k, v, o, c, den, T, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        WINDOW=window, SINKS=sinks, BS=pow2(sinks), H=H, HKV=HKV, D=D, DV=DV, BD=pow2(D), BDV=pow2(DV),
        PREC=dot_precision(q),
    )  # fmt: skip
    return o, c, den
