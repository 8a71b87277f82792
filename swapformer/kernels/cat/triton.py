"""Fused flash-style Triton kernels for CAT attention (derivation in ``README.md``).

Forward: one program per (block of BM queries, batch·head). Online softmax (base 2) over three key
sources in turn: the sink, the compressed slots ``kc[0 .. c-1]`` the block can see, and the token keys
of the block's own chunks ``[⌊m0/C⌋·C, m0 + BM)``. Only those ranges are visited, so the work is
O(T·(T/C + C)) instead of O(T²).

Backward: ``cat_bwd_dq_kernel`` recomputes the probabilities from the saved log-sum-exp (one program
per query block, sink contribution to dq included); ``cat_bwd_dkv_kernel`` runs one program per block of
keys (token keys or compressed slots, selected by ``IS_COMP``) over the GQA group's query heads and the
queries that can see that block. Sink gradients are two small reductions in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swapformer.kernels.triton_utils import autotune, dot_precision, online_softmax_step, pow2

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# kernels may only read globals that are constexpr objects
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)

_FWD_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in ((16, 16, 4, 1), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 128, 8, 2))
]
_BWD_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in ((16, 16, 4, 1), (64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2))
]


@triton.jit
def _kv_block(ptr, b, rows, n_rows, i_kv, HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """Rows ``rows`` of a ``[B, L, HKV, D]`` tensor for kv head ``i_kv`` (zero outside ``[0, n_rows)``)."""
    od = tl.arange(0, BD)
    p = ((b.to(tl.int64) * n_rows + rows[:, None]) * HKV + i_kv) * D + od[None, :]
    return tl.load(ptr + p, mask=(rows[:, None] < n_rows) & (od[None, :] < D), other=0.0)


@autotune(_FWD_CONFIGS, key=["D", "H", "HKV", "CHUNK"])
@triton.jit
def cat_fwd_kernel(
    q, k, v, kc, vc, sk, sv, o, lse, T, N, qk_scale,
    CHUNK: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, HAS_SINK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_kv = i_h // (H // HKV)
    m0 = i_m * BM
    rows = m0 + tl.arange(0, BM)
    od = tl.arange(0, BD)
    p_q = ((i_b.to(tl.int64) * T + rows[:, None]) * H + i_h) * D + od[None, :]
    m_q = (rows[:, None] < T) & (od[None, :] < D)
    bq = tl.load(q + p_q, mask=m_q, other=0.0)
    # finite start so that a fully masked block gives alpha = 1, p = 0 instead of nan
    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    if HAS_SINK:
        bsk = tl.load(sk + i_kv * D + od, mask=od < D, other=0.0).to(tl.float32)
        bsv = tl.load(sv + i_kv * D + od, mask=od < D, other=0.0).to(tl.float32)
        m_i = tl.sum(bq.to(tl.float32) * bsk[None, :], 1) * qk_scale
        l_i += 1.0
        acc += bsv[None, :]
    row_chunk = rows // CHUNK
    last = tl.minimum(m0 + BM, T) - 1
    for n0 in range(0, tl.minimum(N, last // CHUNK), BN):
        slots = n0 + tl.arange(0, BN)
        bk = _kv_block(kc, i_b, slots, N, i_kv, HKV, D, BD)
        bv = _kv_block(vc, i_b, slots, N, i_kv, HKV, D, BD)
        s = tl.dot(bq, tl.trans(bk), input_precision=PREC) * qk_scale
        s = tl.where(slots[None, :] < row_chunk[:, None], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, bv, m_i, l_i, acc, PREC)
    for n0 in range((m0 // CHUNK) * CHUNK, last + 1, BN):
        cols = n0 + tl.arange(0, BN)
        bk = _kv_block(k, i_b, cols, T, i_kv, HKV, D, BD)
        bv = _kv_block(v, i_b, cols, T, i_kv, HKV, D, BD)
        s = tl.dot(bq, tl.trans(bk), input_precision=PREC) * qk_scale
        vis = (cols[None, :] <= rows[:, None]) & ((cols // CHUNK)[None, :] == row_chunk[:, None])
        s = tl.where(vis, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, bv, m_i, l_i, acc, PREC)
    # padded rows (never stored) see no key at all; keep them finite
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(o + p_q, (acc / l_safe[:, None]).to(o.dtype.element_ty), mask=m_q)
    p_l = i_bh.to(tl.int64) * T + rows
    tl.store(lse + p_l, (m_i + tl.log2(l_safe)) * _LN2, mask=rows < T)


@autotune(_BWD_CONFIGS, key=["D", "H", "HKV", "CHUNK"])
@triton.jit
def cat_bwd_dq_kernel(
    q, k, v, kc, vc, sk, sv, do, lse, delta, dq, T, N, qk_scale, scale,
    CHUNK: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, HAS_SINK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_kv = i_h // (H // HKV)
    m0 = i_m * BM
    rows = m0 + tl.arange(0, BM)
    od = tl.arange(0, BD)
    p_q = ((i_b.to(tl.int64) * T + rows[:, None]) * H + i_h) * D + od[None, :]
    m_q = (rows[:, None] < T) & (od[None, :] < D)
    bq = tl.load(q + p_q, mask=m_q, other=0.0)
    bdo = tl.load(do + p_q, mask=m_q, other=0.0)
    p_l = i_bh.to(tl.int64) * T + rows
    blse = tl.load(lse + p_l, mask=rows < T, other=0.0) * _LOG2E
    bdelta = tl.load(delta + p_l, mask=rows < T, other=0.0)
    bdq = tl.zeros([BM, BD], dtype=tl.float32)
    if HAS_SINK:
        bsk = tl.load(sk + i_kv * D + od, mask=od < D, other=0.0).to(tl.float32)
        bsv = tl.load(sv + i_kv * D + od, mask=od < D, other=0.0).to(tl.float32)
        p0 = tl.exp2(tl.sum(bq.to(tl.float32) * bsk[None, :], 1) * qk_scale - blse)
        ds0 = p0 * (tl.sum(bdo.to(tl.float32) * bsv[None, :], 1) - bdelta)
        bdq += ds0[:, None] * bsk[None, :]
    row_chunk = rows // CHUNK
    last = tl.minimum(m0 + BM, T) - 1
    for n0 in range(0, tl.minimum(N, last // CHUNK), BN):
        slots = n0 + tl.arange(0, BN)
        bk = _kv_block(kc, i_b, slots, N, i_kv, HKV, D, BD)
        bv = _kv_block(vc, i_b, slots, N, i_kv, HKV, D, BD)
        vis = slots[None, :] < row_chunk[:, None]
        bdq += _dq_step(bq, bdo, bk, bv, blse, bdelta, vis, qk_scale, PREC)
    for n0 in range((m0 // CHUNK) * CHUNK, last + 1, BN):
        cols = n0 + tl.arange(0, BN)
        bk = _kv_block(k, i_b, cols, T, i_kv, HKV, D, BD)
        bv = _kv_block(v, i_b, cols, T, i_kv, HKV, D, BD)
        vis = (cols[None, :] <= rows[:, None]) & ((cols // CHUNK)[None, :] == row_chunk[:, None])
        bdq += _dq_step(bq, bdo, bk, bv, blse, bdelta, vis, qk_scale, PREC)
    tl.store(dq + p_q, (bdq * scale).to(dq.dtype.element_ty), mask=m_q)


@triton.jit
def _dq_step(bq, bdo, bk, bv, blse, bdelta, vis, qk_scale, PREC: tl.constexpr):
    s = tl.dot(bq, tl.trans(bk), input_precision=PREC) * qk_scale
    p = tl.where(vis, tl.exp2(s - blse[:, None]), 0.0)
    dp = tl.dot(bdo, tl.trans(bv), input_precision=PREC)
    ds = p * (dp - bdelta[:, None])
    return tl.dot(ds.to(bk.dtype), bk, input_precision=PREC)


@autotune(_BWD_CONFIGS, key=["D", "H", "HKV", "CHUNK", "IS_COMP"])
@triton.jit
def cat_bwd_dkv_kernel(
    q, k, v, do, lse, delta, dk, dv, T, L, qk_scale, scale,
    CHUNK: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, IS_COMP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """dk, dv of ``L`` keys: token keys (``L = T``) or compressed slots (``L = N``, ``IS_COMP``)."""
    i_n, i_bkv = tl.program_id(0), tl.program_id(1)
    i_b, i_kv = i_bkv // HKV, i_bkv % HKV
    n0 = i_n * BN
    cols = n0 + tl.arange(0, BN)
    od = tl.arange(0, BD)
    bk = _kv_block(k, i_b, cols, L, i_kv, HKV, D, BD)
    bv = _kv_block(v, i_b, cols, L, i_kv, HKV, D, BD)
    bdk = tl.zeros([BN, BD], dtype=tl.float32)
    bdv = tl.zeros([BN, BD], dtype=tl.float32)
    if IS_COMP:
        # slot s is seen by every query of a later chunk: t ≥ (s + 1)·C
        lo, hi = (n0 + 1) * CHUNK, T
    else:
        # token j is seen by queries j .. end of its chunk
        lo, hi = n0, tl.minimum(T, ((tl.minimum(n0 + BN, L) - 1) // CHUNK + 1) * CHUNK)
    for g in range(H // HKV):
        i_h = i_kv * (H // HKV) + g
        for m0 in range(lo, hi, BM):
            rows = m0 + tl.arange(0, BM)
            p_q = ((i_b.to(tl.int64) * T + rows[:, None]) * H + i_h) * D + od[None, :]
            m_q = (rows[:, None] < T) & (od[None, :] < D)
            bq = tl.load(q + p_q, mask=m_q, other=0.0)
            bdo = tl.load(do + p_q, mask=m_q, other=0.0)
            p_l = (i_b.to(tl.int64) * H + i_h) * T + rows
            blse = tl.load(lse + p_l, mask=rows < T, other=0.0) * _LOG2E
            bdelta = tl.load(delta + p_l, mask=rows < T, other=0.0)
            if IS_COMP:
                vis = cols[None, :] < (rows // CHUNK)[:, None]
            else:
                vis = (cols[None, :] <= rows[:, None]) & ((cols // CHUNK)[None, :] == (rows // CHUNK)[:, None])
            vis = vis & (rows[:, None] < T) & (cols[None, :] < L)
            s = tl.dot(bq, tl.trans(bk), input_precision=PREC) * qk_scale
            p = tl.where(vis, tl.exp2(s - blse[:, None]), 0.0)
            bdv += tl.dot(tl.trans(p.to(bdo.dtype)), bdo, input_precision=PREC)
            dp = tl.dot(bdo, tl.trans(bv), input_precision=PREC)
            ds = p * (dp - bdelta[:, None])
            bdk += tl.dot(tl.trans(ds.to(bq.dtype)), bq, input_precision=PREC)
    p_k = ((i_b.to(tl.int64) * L + cols[:, None]) * HKV + i_kv) * D + od[None, :]
    m_k = (cols[:, None] < L) & (od[None, :] < D)
    tl.store(dk + p_k, (bdk * scale).to(dk.dtype.element_ty), mask=m_k)
    tl.store(dv + p_k, bdv.to(dv.dtype.element_ty), mask=m_k)


def _contig(dtype, *xs):
    # tl.dot needs both operands in one dtype; everything follows q
    return [None if x is None else x.to(dtype).contiguous() for x in xs]


def cat_fwd(q, k, v, kc, vc, sink_k, sink_v, chunk_size, scale):
    """Forward: ``(o [B, T, H, D], lse [B, H, T] fp32, natural log)``."""
    B, T, H, D = q.shape
    HKV, N = k.shape[2], kc.shape[1]
    q, k, v, kc, vc, sink_k, sink_v = _contig(q.dtype, q, k, v, kc, vc, sink_k, sink_v)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    if T == 0:
        return o, lse
    has_sink = sink_k is not None
    grid = lambda meta: (triton.cdiv(T, meta["BM"]), B * H)
    cat_fwd_kernel[grid](
        q, k, v, kc, vc, sink_k if has_sink else q, sink_v if has_sink else q, o, lse, T, N,
        scale * LOG2E, CHUNK=chunk_size, H=H, HKV=HKV, D=D, BD=pow2(D), HAS_SINK=has_sink, PREC=dot_precision(q),
    )  # fmt: skip
    return o, lse


def cat_bwd(do, q, k, v, kc, vc, sink_k, sink_v, o, lse, chunk_size, scale):
    """Backward: ``(dq, dk, dv, dkc, dvc, dsink_k, dsink_v)`` (sink grads zeros without a sink)."""
    B, T, H, D = q.shape
    HKV, N = k.shape[2], kc.shape[1]
    dtypes = [None if x is None else x.dtype for x in (k, v, kc, vc, sink_k, sink_v)]
    q, k, v, kc, vc, sink_k, sink_v, do = _contig(q.dtype, q, k, v, kc, vc, sink_k, sink_v, do)
    delta = torch.einsum("bthd,bthd->bht", do.float(), o.float()).contiguous()
    has_sink = sink_k is not None
    dq = torch.empty_like(q)
    if T == 0:
        zeros = q.new_zeros(HKV, D)
        return (dq, *(torch.zeros_like(x) for x in (k, v, kc, vc)), zeros, zeros.clone())
    meta = dict(CHUNK=chunk_size, H=H, HKV=HKV, D=D, BD=pow2(D), PREC=dot_precision(q))
    cat_bwd_dq_kernel[lambda m: (triton.cdiv(T, m["BM"]), B * H)](
        q, k, v, kc, vc, sink_k if has_sink else q, sink_v if has_sink else q, do, lse, delta, dq,
        T, N, scale * LOG2E, scale, HAS_SINK=has_sink, **meta,
    )  # fmt: skip
    dk, dv, dkc, dvc = (torch.empty_like(x) for x in (k, v, kc, vc))
    for kk, vv, dkk, dvv, L, comp in ((k, v, dk, dv, T, False), (kc, vc, dkc, dvc, N, True)):
        if L > 0:
            cat_bwd_dkv_kernel[lambda m, L=L: (triton.cdiv(L, m["BN"]), B * HKV)](
                q, kk, vv, do, lse, delta, dkk, dvv, T, L, scale * LOG2E, scale, IS_COMP=comp, **meta
            )
    dk, dv, dkc, dvc = (g.to(dt) for g, dt in zip((dk, dv, dkc, dvc), dtypes))
    if not has_sink:
        zeros = q.new_zeros(HKV, D)
        return dq, dk, dv, dkc, dvc, zeros, zeros.clone()
    dsk, dsv = _sink_grads(q, do, lse, delta, sink_k, sink_v, scale)
    return dq, dk, dv, dkc, dvc, dsk.to(dtypes[4]), dsv.to(dtypes[5])


def _sink_grads(q, do, lse, delta, sink_k, sink_v, scale):
    """``p0 = exp(scale·q·sk − lse)``; ``dsk = scale Σ p0 (do·sv − Δ) q``, ``dsv = Σ p0 do`` (GQA-grouped)."""
    B, T, H, D = q.shape
    HKV = sink_k.shape[0]
    sk = sink_k.float().repeat_interleave(H // HKV, 0)  # [H, D]
    sv = sink_v.float().repeat_interleave(H // HKV, 0)
    p0 = torch.exp(torch.einsum("bthd,hd->bht", q.float(), sk) * scale - lse)
    ds0 = p0 * (torch.einsum("bthd,hd->bht", do.float(), sv) - delta)
    dsk = torch.einsum("bht,bthd->hd", ds0, q.float()) * scale
    dsv = torch.einsum("bht,bthd->hd", p0, do.float())
    group = lambda x: x.view(HKV, H // HKV, D).sum(1)
    return group(dsk).to(sink_k.dtype), group(dsv).to(sink_v.dtype)
