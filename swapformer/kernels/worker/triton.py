"""Triton kernels for worker attention and the causal depthwise conv (derivation in ``README.md``).

Worker attention is flash attention with a per-row causal limit ``j ≤ idx_w``: a query block only
visits keys ``[0, max idx in block]``. Backward: ``worker_bwd_dq_kernel`` per worker block and
``worker_bwd_dkv_kernel`` per key block, the latter skipping worker blocks that end before it.

The conv kernels are plain tiled stencils; the forward optionally also writes the worker rows
(``u[:, idx]``) through an inverse index map, so the gather costs no extra pass over ``u``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swapformer.kernels.cat.triton import _LN2, _LOG2E, LOG2E
from swapformer.kernels.triton_utils import autotune, dot_precision, online_softmax_step, pow2

_ATTN_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in ((16, 16, 4, 1), (64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2))
]
# the time block is fixed (not tuned): the backward's dweight partials are laid out per time block
_CONV_BT = 32
_CONV_CONFIGS = [triton.Config({"BD": bd}, num_warps=w) for bd, w in ((32, 4), (64, 4), (128, 4), (128, 8))]


@triton.jit
def _rows(ptr, b, rows, n_rows, i_h, NH: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """Pointer offsets and mask of rows ``rows`` of a ``[B, L, NH, D]`` tensor, head ``i_h``."""
    od = tl.arange(0, BD)
    p = ((b.to(tl.int64) * n_rows + rows[:, None]) * NH + i_h) * D + od[None, :]
    return p, (rows[:, None] < n_rows) & (od[None, :] < D)


@autotune(_ATTN_CONFIGS, key=["D", "H", "HKV"])
@triton.jit
def worker_fwd_kernel(
    q, k, v, idx, o, lse, T, W, qk_scale,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_kv = i_h // (H // HKV)
    rows = i_m * BM + tl.arange(0, BM)
    bidx = tl.load(idx + rows, mask=rows < W, other=-1)
    p_q, m_q = _rows(q, i_b, rows, W, i_h, H, D, BD)
    bq = tl.load(q + p_q, mask=m_q, other=0.0)
    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for n0 in range(0, tl.max(bidx, 0) + 1, BN):
        cols = n0 + tl.arange(0, BN)
        p_k, m_k = _rows(k, i_b, cols, T, i_kv, HKV, D, BD)
        bk = tl.load(k + p_k, mask=m_k, other=0.0)
        bv = tl.load(v + p_k, mask=m_k, other=0.0)
        s = tl.dot(bq, tl.trans(bk), input_precision=PREC) * qk_scale
        s = tl.where(cols[None, :] <= bidx[:, None], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, bv, m_i, l_i, acc, PREC)
    # padded rows (never stored) see no key at all; keep them finite
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(o + p_q, (acc / l_safe[:, None]).to(o.dtype.element_ty), mask=m_q)
    tl.store(lse + i_bh.to(tl.int64) * W + rows, (m_i + tl.log2(l_safe)) * _LN2, mask=rows < W)


@autotune(_ATTN_CONFIGS, key=["D", "H", "HKV"])
@triton.jit
def worker_bwd_dq_kernel(
    q, k, v, idx, do, lse, delta, dq, T, W, qk_scale, scale,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_kv = i_h // (H // HKV)
    rows = i_m * BM + tl.arange(0, BM)
    bidx = tl.load(idx + rows, mask=rows < W, other=-1)
    p_q, m_q = _rows(q, i_b, rows, W, i_h, H, D, BD)
    bq = tl.load(q + p_q, mask=m_q, other=0.0)
    bdo = tl.load(do + p_q, mask=m_q, other=0.0)
    p_l = i_bh.to(tl.int64) * W + rows
    blse = tl.load(lse + p_l, mask=rows < W, other=0.0) * _LOG2E
    bdelta = tl.load(delta + p_l, mask=rows < W, other=0.0)
    bdq = tl.zeros([BM, BD], dtype=tl.float32)
    for n0 in range(0, tl.max(bidx, 0) + 1, BN):
        cols = n0 + tl.arange(0, BN)
        p_k, m_k = _rows(k, i_b, cols, T, i_kv, HKV, D, BD)
        bk = tl.load(k + p_k, mask=m_k, other=0.0)
        bv = tl.load(v + p_k, mask=m_k, other=0.0)
        s = tl.dot(bq, tl.trans(bk), input_precision=PREC) * qk_scale
        p = tl.where(cols[None, :] <= bidx[:, None], tl.exp2(s - blse[:, None]), 0.0)
        ds = p * (tl.dot(bdo, tl.trans(bv), input_precision=PREC) - bdelta[:, None])
        bdq += tl.dot(ds.to(bk.dtype), bk, input_precision=PREC)
    tl.store(dq + p_q, (bdq * scale).to(dq.dtype.element_ty), mask=m_q)


@autotune(_ATTN_CONFIGS, key=["D", "H", "HKV"])
@triton.jit
def worker_bwd_dkv_kernel(
    q, k, v, idx, do, lse, delta, dk, dv, T, W, qk_scale, scale,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    i_n, i_bkv = tl.program_id(0), tl.program_id(1)
    i_b, i_kv = i_bkv // HKV, i_bkv % HKV
    n0 = i_n * BN
    cols = n0 + tl.arange(0, BN)
    p_k, m_k = _rows(k, i_b, cols, T, i_kv, HKV, D, BD)
    bk = tl.load(k + p_k, mask=m_k, other=0.0)
    bv = tl.load(v + p_k, mask=m_k, other=0.0)
    bdk = tl.zeros([BN, BD], dtype=tl.float32)
    bdv = tl.zeros([BN, BD], dtype=tl.float32)
    # indices increase, so workers before the first one at or after n0 never see this block
    # a tensor from the start: a loop-carried python int would change type inside the loop
    w_start = tl.zeros([], dtype=tl.int32)
    for w0 in range(0, W, BM):
        ww = w0 + tl.arange(0, BM)
        w_start += tl.sum((tl.load(idx + ww, mask=ww < W, other=T) < n0).to(tl.int32), 0)
    for g in range(H // HKV):
        i_h = i_kv * (H // HKV) + g
        for w0 in range(w_start, W, BM):
            rows = w0 + tl.arange(0, BM)
            bidx = tl.load(idx + rows, mask=rows < W, other=-1)
            p_q, m_q = _rows(q, i_b, rows, W, i_h, H, D, BD)
            bq = tl.load(q + p_q, mask=m_q, other=0.0)
            bdo = tl.load(do + p_q, mask=m_q, other=0.0)
            p_l = (i_b.to(tl.int64) * H + i_h) * W + rows
            blse = tl.load(lse + p_l, mask=rows < W, other=0.0) * _LOG2E
            bdelta = tl.load(delta + p_l, mask=rows < W, other=0.0)
            s = tl.dot(bq, tl.trans(bk), input_precision=PREC) * qk_scale
            vis = (cols[None, :] <= bidx[:, None]) & (cols[None, :] < T)
            p = tl.where(vis, tl.exp2(s - blse[:, None]), 0.0)
            bdv += tl.dot(tl.trans(p.to(bdo.dtype)), bdo, input_precision=PREC)
            ds = p * (tl.dot(bdo, tl.trans(bv), input_precision=PREC) - bdelta[:, None])
            bdk += tl.dot(tl.trans(ds.to(bq.dtype)), bq, input_precision=PREC)
    tl.store(dk + p_k, (bdk * scale).to(dk.dtype.element_ty), mask=m_k)
    tl.store(dv + p_k, bdv.to(dv.dtype.element_ty), mask=m_k)


@autotune(_CONV_CONFIGS, key=["d", "K"])
@triton.jit
def dwconv_fwd_kernel(
    x, w, bias, inv, u, uw, T, W, d: tl.constexpr, K: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr, GATHER: tl.constexpr,
):  # fmt: skip
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = i_t * BT + tl.arange(0, BT)
    od = i_d * BD + tl.arange(0, BD)
    md = od < d
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + od, mask=md, other=0.0).to(tl.float32)[None, :]
    base = i_b.to(tl.int64) * T * d
    for i in tl.static_range(K):
        src = rows - (K - 1) + i
        m = ((src >= 0) & (src < T))[:, None] & md[None, :]
        bx = tl.load(x + base + src[:, None] * d + od[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.load(w + od * K + i, mask=md, other=0.0).to(tl.float32)[None, :] * bx
    m_out = (rows < T)[:, None] & md[None, :]
    tl.store(u + base + rows[:, None] * d + od[None, :], acc.to(u.dtype.element_ty), mask=m_out)
    if GATHER:
        # inv[t] is the worker slot of position t, or -1
        slot = tl.load(inv + rows, mask=rows < T, other=-1)
        p_w = (i_b.to(tl.int64) * W + slot[:, None]) * d + od[None, :]
        tl.store(uw + p_w, acc.to(uw.dtype.element_ty), mask=m_out & (slot >= 0)[:, None])


@autotune(_CONV_CONFIGS, key=["d", "K"])
@triton.jit
def dwconv_bwd_kernel(
    du, x, w, dx, dw_part, T, NTB, d: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr
):  # fmt: skip
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = i_t * BT + tl.arange(0, BT)
    od = i_d * BD + tl.arange(0, BD)
    md = od < d
    base = i_b.to(tl.int64) * T * d
    m_rows = (rows < T)[:, None] & md[None, :]
    g = tl.load(du + base + rows[:, None] * d + od[None, :], mask=m_rows, other=0.0).to(tl.float32)
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    # per-program partial sums of dweight, reduced over (time blocks, batch) on the host
    p_part = ((i_b.to(tl.int64) * NTB + i_t) * d + od) * K
    for i in tl.static_range(K):
        wi = tl.load(w + od * K + i, mask=md, other=0.0).to(tl.float32)
        # dx_t collects g_{t+K-1-i} through tap i
        src = rows + (K - 1) - i
        m = (src < T)[:, None] & md[None, :]
        acc += wi[None, :] * tl.load(du + base + src[:, None] * d + od[None, :], mask=m, other=0.0).to(tl.float32)
        xs = rows - (K - 1) + i
        mx = ((xs >= 0) & (xs < T))[:, None] & md[None, :]
        bx = tl.load(x + base + xs[:, None] * d + od[None, :], mask=mx, other=0.0).to(tl.float32)
        tl.store(dw_part + p_part + i, tl.sum(g * bx, 0), mask=md)
    tl.store(dx + base + rows[:, None] * d + od[None, :], acc.to(dx.dtype.element_ty), mask=m_rows)


def worker_fwd(q_w, k, v, worker_idx, scale):
    """Forward: ``(o [B, W, H, D], lse [B, H, W] fp32, natural log)``."""
    B, W, H, D = q_w.shape
    T, HKV = k.shape[1], k.shape[2]
    q_w, k, v = (x.to(q_w.dtype).contiguous() for x in (q_w, k, v))
    idx = worker_idx.to(torch.int32).contiguous()
    o = torch.empty_like(q_w)
    lse = torch.empty(B, H, W, dtype=torch.float32, device=q_w.device)
    if W == 0:
        return o, lse
    grid = lambda m: (triton.cdiv(W, m["BM"]), B * H)
    worker_fwd_kernel[grid](
        q_w, k, v, idx, o, lse, T, W, scale * LOG2E, H=H, HKV=HKV, D=D, BD=pow2(D), PREC=dot_precision(q_w)
    )
    return o, lse


def worker_bwd(do, q_w, k, v, worker_idx, o, lse, scale):
    """Backward: ``(dq_w, dk, dv)``."""
    B, W, H, D = q_w.shape
    T, HKV = k.shape[1], k.shape[2]
    kv_dtype = k.dtype
    q_w, k, v, do = (x.to(q_w.dtype).contiguous() for x in (q_w, k, v, do))
    idx = worker_idx.to(torch.int32).contiguous()
    if W == 0:
        return torch.zeros_like(q_w), torch.zeros_like(k).to(kv_dtype), torch.zeros_like(v).to(kv_dtype)
    delta = torch.einsum("bwhd,bwhd->bhw", do.float(), o.float()).contiguous()
    meta = dict(H=H, HKV=HKV, D=D, BD=pow2(D), PREC=dot_precision(q_w))
    dq, dk, dv = torch.empty_like(q_w), torch.empty_like(k), torch.empty_like(v)
    worker_bwd_dq_kernel[lambda m: (triton.cdiv(W, m["BM"]), B * H)](
        q_w, k, v, idx, do, lse, delta, dq, T, W, scale * LOG2E, scale, **meta
    )
    worker_bwd_dkv_kernel[lambda m: (triton.cdiv(T, m["BN"]), B * HKV)](
        q_w, k, v, idx, do, lse, delta, dk, dv, T, W, scale * LOG2E, scale, **meta
    )
    return dq, dk.to(kv_dtype), dv.to(kv_dtype)


def _conv_grid(B: int, T: int, d: int):
    return lambda m: (triton.cdiv(T, _CONV_BT), triton.cdiv(d, m["BD"]), B)


def dwconv_fwd(x, weight, bias, worker_idx):
    """Forward: ``(u [B, T, d], u[:, worker_idx] [B, W, d])`` from one pass."""
    B, T, d = x.shape
    K = weight.shape[1]
    x, weight = x.contiguous(), weight.contiguous()
    u = torch.empty_like(x)
    if T == 0:
        return u, x.new_empty(B, 0 if worker_idx is None else worker_idx.shape[0], d)
    gather = worker_idx is not None
    W = worker_idx.shape[0] if gather else 0
    uw = x.new_empty(B, W, d)
    inv = x.new_full((T,), -1, dtype=torch.int32)
    if gather:
        inv[worker_idx] = torch.arange(W, device=x.device, dtype=torch.int32)
    has_bias = bias is not None
    dwconv_fwd_kernel[_conv_grid(B, T, d)](
        x, weight, bias.contiguous() if has_bias else weight, inv, u, uw, T, W,
        d=d, K=K, BT=_CONV_BT, HAS_BIAS=has_bias, GATHER=gather,
    )  # fmt: skip
    return u, uw


def dwconv_bwd(du, x, weight):
    """Backward of the conv without bias: ``(dx, dweight, dbias fp32)``."""
    B, T, d = x.shape
    K = weight.shape[1]
    du, x, weight = du.contiguous(), x.contiguous(), weight.contiguous()
    dx = torch.empty_like(x)
    if T == 0:
        return dx, torch.zeros_like(weight), du.float().sum((0, 1))
    ntb = triton.cdiv(T, _CONV_BT)
    part = torch.empty(B, ntb, d, K, dtype=torch.float32, device=x.device)
    dwconv_bwd_kernel[_conv_grid(B, T, d)](du, x, weight, dx, part, T, ntb, d=d, K=K, BT=_CONV_BT)
    return dx, part.sum((0, 1)).to(weight.dtype), du.float().sum((0, 1))
