"""Triton chunked-scan kernels for ELiTA attention (derivation in ``README.md``).

Every kernel runs one program per (chunk of BT tokens, batch·head) with the whole value width in one
block, so all passes are parallel over time; chunk-to-chunk carries are a tiny ``cumsum`` over chunks
done in PyTorch between launches.

Forward:  ``elita_chunk_sum_kernel`` (Σ C_j v_j, Σ C_j per chunk) → carries → ``elita_fwd_kernel``.
Backward: ``elita_bwd_sum_kernel`` (dρ, dδ and per-chunk Σ dS_i, Σ dZ_i) → reverse carries →
``elita_bwd_kernel`` (dv, dκ).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swapformer.kernels.triton_utils import autotune, pow2

# BT is not tuned: every kernel of one call must use the same chunking as the carries
_CONFIGS = [triton.Config({}, num_warps=w) for w in (4, 2, 8)]


@triton.jit
def _load_chunk(kappa, delta, rho, v, i_n, i_bh, T, clip, H: tl.constexpr, V: tl.constexpr,
                BT: tl.constexpr, BV: tl.constexpr):  # fmt: skip
    """Logits, exps and values of one chunk; padded rows get C = 0 (no contribution) and D = 1."""
    i_b, i_h = i_bh // H, i_bh % H
    rows = i_n * BT + tl.arange(0, BT)
    ov = tl.arange(0, BV)
    mr = rows < T
    p_l = i_b.to(tl.int64) * T * H + rows * H + i_h
    p_v = (i_b.to(tl.int64) * T * H + rows[:, None] * H + i_h) * V + ov[None, :]
    m_v = mr[:, None] & (ov < V)[None, :]
    kap = tl.load(kappa + p_l, mask=mr, other=0.0).to(tl.float32)
    dlt = tl.load(delta + p_l, mask=mr, other=0.0).to(tl.float32)
    rh = tl.load(rho + p_l, mask=mr, other=0.0).to(tl.float32)
    C = tl.where(mr, tl.exp(tl.minimum(tl.maximum(kap, -clip), clip)), 0.0)
    D = tl.exp(tl.minimum(tl.maximum(dlt, -clip), clip))
    Q = tl.exp(tl.minimum(tl.maximum(rh, -clip), clip))
    bv = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
    return kap, dlt, rh, C, D, Q, bv, p_l, p_v, m_v, mr


@triton.jit
def _recompute(C, D, Q, bv, Sc, Zc, i_n, i_bh, NT, H: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    """Inclusive sums S_i, Z_i from the chunk's carry, the denominator N_i and the output y_i."""
    i_b, i_h = i_bh // H, i_bh % H
    ov = tl.arange(0, BV)
    p_c = (i_b.to(tl.int64) * NT + i_n) * H + i_h
    S = tl.load(Sc + p_c * V + ov, mask=ov < V, other=0.0)[None, :] + tl.cumsum(C[:, None] * bv, 0)
    Z = tl.load(Zc + p_c) + tl.cumsum(C, 0)
    N = Q * Z + D
    y = (Q[:, None] * S + D[:, None] * bv) / N[:, None]
    return S, Z, N, y, p_c


@autotune(_CONFIGS, key=["V"])
@triton.jit
def elita_chunk_sum_kernel(kappa, v, cs, cz, T, NT, clip, H: tl.constexpr, V: tl.constexpr,
                           BT: tl.constexpr, BV: tl.constexpr):  # fmt: skip
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    _, _, _, C, _, _, bv, _, _, _, _ = _load_chunk(kappa, kappa, kappa, v, i_n, i_bh, T, clip, H, V, BT, BV)
    i_b, i_h = i_bh // H, i_bh % H
    ov = tl.arange(0, BV)
    p_c = (i_b.to(tl.int64) * NT + i_n) * H + i_h
    tl.store(cs + p_c * V + ov, tl.sum(C[:, None] * bv, 0), mask=ov < V)
    tl.store(cz + p_c, tl.sum(C, 0))


@autotune(_CONFIGS, key=["V"])
@triton.jit
def elita_fwd_kernel(kappa, delta, rho, v, Sc, Zc, y, T, NT, clip, H: tl.constexpr, V: tl.constexpr,
                     BT: tl.constexpr, BV: tl.constexpr):  # fmt: skip
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    ld = _load_chunk(kappa, delta, rho, v, i_n, i_bh, T, clip, H, V, BT, BV)
    _, _, _, C, D, Q, bv, _, p_v, m_v, _ = ld
    _, _, _, by, _ = _recompute(C, D, Q, bv, Sc, Zc, i_n, i_bh, NT, H, V, BV)
    tl.store(y + p_v, by.to(y.dtype.element_ty), mask=m_v)


@autotune(_CONFIGS, key=["V"])
@triton.jit
def elita_bwd_sum_kernel(kappa, delta, rho, v, dy, Sc, Zc, ddelta, drho, ds, dz, T, NT, clip,
                         H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):  # fmt: skip
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    ld = _load_chunk(kappa, delta, rho, v, i_n, i_bh, T, clip, H, V, BT, BV)
    _, dlt, rh, C, D, Q, bv, p_l, p_v, m_v, mr = ld
    S, Z, N, by, p_c = _recompute(C, D, Q, bv, Sc, Zc, i_n, i_bh, NT, H, V, BV)
    g = tl.load(dy + p_v, mask=m_v, other=0.0).to(tl.float32)
    gy = tl.sum(g * by, 1)
    # y = (Q S + D v) / (Q Z + D): partials in Q and D, then through exp and the clip
    dQ = (tl.sum(g * S, 1) - gy * Z) / N
    dD = (tl.sum(g * bv, 1) - gy) / N
    live_r = (rh >= -clip) & (rh <= clip)
    live_d = (dlt >= -clip) & (dlt <= clip)
    tl.store(drho + p_l, tl.where(live_r, dQ * Q, 0.0).to(drho.dtype.element_ty), mask=mr)
    tl.store(ddelta + p_l, tl.where(live_d, dD * D, 0.0).to(ddelta.dtype.element_ty), mask=mr)
    ov = tl.arange(0, BV)
    dS = g * (Q / N)[:, None]
    tl.store(ds + p_c * V + ov, tl.sum(dS, 0), mask=ov < V)
    tl.store(dz + p_c, tl.sum(tl.where(mr, -Q * gy / N, 0.0), 0))


@autotune(_CONFIGS, key=["V"])
@triton.jit
def elita_bwd_kernel(kappa, delta, rho, v, dy, Sc, Zc, Rc, rc, dkappa, dv, T, NT, clip,
                     H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):  # fmt: skip
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    ld = _load_chunk(kappa, delta, rho, v, i_n, i_bh, T, clip, H, V, BT, BV)
    kap, _, _, C, D, Q, bv, p_l, p_v, m_v, mr = ld
    S, Z, N, by, p_c = _recompute(C, D, Q, bv, Sc, Zc, i_n, i_bh, NT, H, V, BV)
    g = tl.load(dy + p_v, mask=m_v, other=0.0).to(tl.float32)
    dS = g * (Q / N)[:, None]
    dZ = tl.where(mr, -Q * tl.sum(g * by, 1) / N, 0.0)
    ov = tl.arange(0, BV)
    # R_j = Σ_{i≥j} dS_i: later chunks (carry) + inclusive reverse cumsum inside the chunk, summed
    # directly (total − prefix would cancel: dκ = C·(R·v + r) is a difference of large sums)
    R = tl.load(Rc + p_c * V + ov, mask=ov < V, other=0.0)[None, :] + tl.cumsum(dS, 0, reverse=True)
    r = tl.load(rc + p_c) + tl.cumsum(dZ, 0, reverse=True)
    bdv = (D / N)[:, None] * g + C[:, None] * R
    dC = tl.sum(R * bv, 1) + r
    live = (kap >= -clip) & (kap <= clip)
    tl.store(dv + p_v, bdv.to(dv.dtype.element_ty), mask=m_v)
    tl.store(dkappa + p_l, tl.where(live, dC * C, 0.0).to(dkappa.dtype.element_ty), mask=mr)


def _blocks(T: int, V: int) -> tuple[int, int, int]:
    """``(BT, BV, NT)``: a chunk tile of about 4K floats, whole value width per program."""
    BV = pow2(V)
    BT = max(16, min(64, 4096 // BV))
    return BT, BV, triton.cdiv(max(T, 1), BT)


def _prep(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.contiguous() for x in xs]


def elita_fwd(kappa, delta, rho, v, S0, Z0, clip):
    """Forward: ``(y [B, T, H, V] in v's dtype, S_T [B, H, V] fp32, Z_T [B, H] fp32)``."""
    B, T, H, V = v.shape
    kappa, delta, rho, v = _prep(kappa, delta, rho, v)
    Sc, Zc, S, Z = _carries(kappa, v, S0, Z0, clip)
    BT, BV, NT = _blocks(T, V)
    y = torch.empty_like(v)
    elita_fwd_kernel[(NT, B * H)](kappa, delta, rho, v, Sc, Zc, y, T, NT, clip, H=H, V=V, BT=BT, BV=BV)
    return y, S, Z


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Sums over the earlier chunks (dim 1), by shifting rather than subtracting (which cancels)."""
    out = torch.zeros_like(x)
    out[:, 1:] = x[:, :-1].cumsum(1)
    return out


def _carries(kappa, v, S0, Z0, clip):
    """Exclusive per-chunk prefix sums ``(Sc [B, NT, H, V], Zc [B, NT, H])`` plus the final sums."""
    B, T, H, V = v.shape
    BT, BV, NT = _blocks(T, V)
    # T = 0 launches nothing, so the single (empty) chunk must already read as zero
    cs = torch.zeros(B, NT, H, V, dtype=torch.float32, device=v.device)
    cz = torch.zeros(B, NT, H, dtype=torch.float32, device=v.device)
    if T > 0:
        elita_chunk_sum_kernel[(NT, B * H)](kappa, v, cs, cz, T, NT, clip, H=H, V=V, BT=BT, BV=BV)
    Sc, Zc = _exclusive_cumsum(cs), _exclusive_cumsum(cz)
    S, Z = cs.sum(1), cz.sum(1)
    if S0 is not None:
        Sc, Zc = Sc + S0.float()[:, None], Zc + Z0.float()[:, None]
        S, Z = S + S0.float(), Z + Z0.float()
    return Sc.contiguous(), Zc.contiguous(), S, Z


def elita_bwd(dy, dS, dZ, kappa, delta, rho, v, S0, Z0, y, clip):
    """Backward: ``(dkappa, ddelta, drho, dv, dS0 fp32, dZ0 fp32)``; ``dS, dZ`` are the final-state grads."""
    B, T, H, V = v.shape
    kappa, delta, rho, v, dy = _prep(kappa, delta, rho, v, dy)
    Sc, Zc, _, _ = _carries(kappa, v, S0, Z0, clip)
    BT, BV, NT = _blocks(T, V)
    ds = torch.zeros(B, NT, H, V, dtype=torch.float32, device=v.device)
    dz = torch.zeros(B, NT, H, dtype=torch.float32, device=v.device)
    ddelta, drho, dkappa = torch.empty_like(delta), torch.empty_like(rho), torch.empty_like(kappa)
    common = dict(H=H, V=V, BT=BT, BV=BV)
    elita_bwd_sum_kernel[(NT, B * H)](kappa, delta, rho, v, dy, Sc, Zc, ddelta, drho, ds, dz, T, NT, clip, **common)
    # reverse exclusive prefix over chunks, seeded with the final-state gradient
    Rc = (_exclusive_cumsum(ds.flip(1)).flip(1) + dS.float()[:, None]).contiguous()
    rc = (_exclusive_cumsum(dz.flip(1)).flip(1) + dZ.float()[:, None]).contiguous()
    dv = torch.empty_like(v)
    elita_bwd_kernel[(NT, B * H)](kappa, delta, rho, v, dy, Sc, Zc, Rc, rc, dkappa, dv, T, NT, clip, **common)
    dS0 = ds.sum(1) + dS.float()
    dZ0 = dz.sum(1) + dZ.float()
    return dkappa, ddelta, drho, dv, dS0, dZ0
