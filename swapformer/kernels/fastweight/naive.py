"""Pure PyTorch references for the T2FW decay rule (``shared/spec/seeds.md`` §4.1). This file is the spec.

Per batch row and head, with ``q_t, k_t, f̂_t ∈ R^K`` and ``v_t, f_t ∈ R^V``::

    S_t = S_{t-1} ⊙ (f_t f̂_tᵀ) + v_t k_tᵀ          S_t ∈ R^{V×K}, S_0 = initial state (or 0)
    o_t = S_t q_t                                     (state AFTER the update: token t sees itself)

Layout ``[B, T, H, D]`` for every sequence tensor; the state is ``[B, H, V, K]``. Gates are given
already squashed into (0, 1]. Accumulation is float32 (float64 inputs stay float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swapformer.kernels.utils import acc_dtype, log_gate


def naive_fastweight_decay_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    f: torch.Tensor,
    fhat: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token recurrence, literally the equation above.

    Args:
        q, k, fhat: ``[B, T, H, K]``.
        v, f: ``[B, T, H, V]``.
        initial_state: ``[B, H, V, K]`` or None (zeros).
        output_final_state: also return ``S_T``.

    Returns:
        ``(o [B, T, H, V] in q's dtype, S_T [B, H, V, K] in the accumulation dtype or None)``.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype, acc = q.dtype, acc_dtype(q.dtype)
    q, k, v, f, fhat = (x.to(acc) for x in (q, k, v, f, fhat))
    S = q.new_zeros(B, H, V, K) if initial_state is None else initial_state.to(acc).clone()
    o = q.new_empty(B, T, H, V)
    for t in range(T):
        decay = f[:, t, :, :, None] * fhat[:, t, :, None, :]
        S = S * decay + v[:, t, :, :, None] * k[:, t, :, None, :]
        o[:, t] = torch.einsum("bhvk,bhk->bhv", S, q[:, t])
    return o.to(dtype), (S if output_final_state else None)


def naive_fastweight_decay_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    f: torch.Tensor,
    fhat: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise-parallel form of the same recurrence, numerically stable for long sequences.

    Inside a chunk let ``a_i = Σ_{s≤i} log f_s`` and ``b_i = Σ_{s≤i} log f̂_s`` (cumulative from the
    chunk start, so every exponent below is ≤ 0 and nothing overflows)::

        o_i = e^{a_i} ⊙ (S (e^{b_i} ⊙ q_i))                                       inter-chunk
            + Σ_{j≤i} [Σ_m q_im k_jm e^{b_im - b_jm}] (e^{a_i - a_j} ⊙ v_j)           intra-chunk
        S  ← e^{a_C} ⊙ S ⊙ e^{b_C}ᵀ + Σ_j (e^{a_C - a_j} ⊙ v_j)(e^{b_C - b_j} ⊙ k_j)ᵀ

    Cost O(T·C·(K + V) + T·K·V). Arguments and returns as :func:`naive_fastweight_decay_recurrent`.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = acc_dtype(q.dtype)
    if T == 0:
        S = q.new_zeros(B, H, V, K, dtype=acc) if initial_state is None else initial_state.to(acc)
        return q.new_empty(B, 0, H, V), (S if output_final_state else None)
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    # zero keys/values and unit gates (log 0) on padded steps leave the state untouched
    q_, k_, v_ = (F.pad(x.to(acc), (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    lf, lfh = (F.pad(log_gate(g), (0, 0, 0, 0, 0, pad)) for g in (f, fhat))
    # [B, T, H, D] -> [B, H, N, C, D]
    q_, k_, v_, lf, lfh = (x.view(B, N, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q_, k_, v_, lf, lfh))
    S = q_.new_zeros(B, H, V, K) if initial_state is None else initial_state.to(acc)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    outs = []
    for n in range(N):
        qn, kn, vn = q_[:, :, n], k_[:, :, n], v_[:, :, n]
        a, b = lf[:, :, n].cumsum(2), lfh[:, :, n].cumsum(2)
        o = a.exp() * torch.einsum("bhvk,bhck->bhcv", S, qn * b.exp())
        outs.append(o + _intra_chunk(qn, kn, vn, a, b, causal))
        a_last, b_last = a[:, :, -1:], b[:, :, -1:]
        S = S * a_last.exp().transpose(-1, -2) * b_last.exp()
        S = S + torch.einsum("bhjv,bhjk->bhvk", vn * (a_last - a).exp(), kn * (b_last - b).exp())
    o = torch.stack(outs, 2).permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    return o.to(q.dtype), (S if output_final_state else None)


def _intra_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, causal: torch.Tensor
) -> torch.Tensor:
    """``Σ_{j≤i}`` part of a chunk with exact pairwise decays (``[B, H, C, ·]`` inputs)."""
    # the mask goes in before exp so that j > i never produces e^{+large}
    neg = torch.finfo(a.dtype).min
    db = (b[:, :, :, None, :] - b[:, :, None, :, :]).masked_fill(~causal[:, :, None], neg)
    da = (a[:, :, :, None, :] - a[:, :, None, :, :]).masked_fill(~causal[:, :, None], neg)
    scores = torch.einsum("bhik,bhjk,bhijk->bhij", q, k, db.exp())  # [B, H, C, C]
    return torch.einsum("bhij,bhjv,bhijv->bhiv", scores, v, da.exp())
