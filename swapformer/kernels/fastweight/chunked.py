"""Chunkwise decay-rule fast weights in plain PyTorch, fast enough for CPU prefill and calibration.

Same math as :func:`~swapformer.kernels.fastweight.naive.naive_fastweight_decay_chunked`, but the
intra-chunk decays are factorised instead of materialised per pair. With ``a_i``/``b_i`` the cumulative
log gates from the chunk start::

    o_i = e^{a_i-a_m} ⊙ Σ_{j≤i} ((q_i ⊙ e^{b_i-b_m})·(k_j ⊙ e^{b_m-b_j})) (v_j ⊙ e^{a_m-a_j})
        + e^{a_i} ⊙ S (q_i ⊙ e^{b_i})

with ``m`` the chunk's middle step, so every chunk is two small matmuls instead of ``[C, C, D]``
exponentials. Each factor is at most ``e^{range/2}`` where ``range`` is the chunk's total log decay.

Chunk length: the caller's ``chunk_size`` (the config's), halved until every chunk's decay fits the
working dtype (``range ≤ MAX_RANGE``: factors stay below ``e^{60}`` in float32). The halving is exact,
the same sums in another grouping, and it always ends: one-step chunks decay by at most
``e^{LOG_GATE_MIN}`` = ``e^{-60}``. So a call never switches to float64 nor to the pairwise
reference because trained gates close (calibration drives some to ~1e-4); deep decays only cost
shorter chunks (more steps of the chunk-state loop).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from swapformer.kernels.fastweight.naive import naive_fastweight_decay_chunked
from swapformer.kernels.utils import acc_dtype, log_gate

DEFAULT_CHUNK = 64
logger = logging.getLogger(__name__)
# largest chunk log decay per working dtype: factors reach e^{range/2} (fp32 overflows past e^88,
# fp64 past e^709), with margin for the sums of K products
MAX_RANGE = {torch.float32: 120.0, torch.float64: 1200.0}


def chunked_fastweight_decay(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: torch.Tensor, fhat: torch.Tensor,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, T, H, K]`` q, k, fhat and ``[B, T, H, V]`` v, f → (o ``[B, T, H, V]``, S_T ``[B, H, V, K]``).

    Runs in chunks of ``chunk_size`` tokens, or of the largest halving of it whose decays fit the
    working dtype (see the module docstring).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    work = acc_dtype(q.dtype)
    if T == 0:
        return naive_fastweight_decay_chunked(q, k, v, f, fhat, initial_state, output_final_state, 1)
    log_f, log_fhat = log_gate(f.to(work)), log_gate(fhat.to(work))
    chunk = max(1, min(chunk_size, 1 << (T - 1).bit_length()))  # no chunk longer than the call
    while True:
        N = -(-T // chunk)
        pad = N * chunk - T
        split = lambda x, c=chunk, n=N, p=pad: F.pad(x, (0, 0, 0, 0, 0, p)).view(B, n, c, H, -1).permute(0, 3, 1, 2, 4)
        a = split(log_f).cumsum(3)  # [B, H, N, C, V]
        b = split(log_fhat).cumsum(3)  # [B, H, N, C, K]
        if chunk == 1 or _fits(a, b, work):
            break
        chunk //= 2
    if chunk < chunk_size:
        logger.debug("fastweight chunked: chunks of %d tokens (asked %d) keep the decays in %s",
                     chunk, chunk_size, work)
    qs, ks, vs = (split(x.to(work)) for x in (q, k, v))
    mid = chunk // 2
    a_mid, b_mid = a[:, :, :, mid : mid + 1], b[:, :, :, mid : mid + 1]
    q_rel, k_rel, v_rel = qs * (b - b_mid).exp(), ks * (b_mid - b).exp(), vs * (a_mid - a).exp()
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    # entries above the diagonal may overflow (their true decay is > 1): they are masked out
    scores = (q_rel @ k_rel.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [B, H, N, C, C]
    states = _chunk_states(a, b, ks, vs, initial_state, work)  # [B, H, N + 1, V, K]
    inter = (qs * b.exp()) @ states[:, :, :-1].transpose(-1, -2)  # S_n (q_i e^{b_i}): [B, H, N, C, V]
    o = (a - a_mid).exp() * (scores @ v_rel) + a.exp() * inter
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * chunk, H, V)[:, :T]
    return o.to(q.dtype), (states[:, :, -1].clone() if output_final_state else None)


def _fits(a: torch.Tensor, b: torch.Tensor, work: torch.dtype) -> bool:
    """True when every chunk's total log decay is within what ``work`` holds (``MAX_RANGE``)."""
    depth = -min(float(a[..., -1, :].min()), float(b[..., -1, :].min()))
    return depth <= MAX_RANGE[work]


def _chunk_states(a, b, k, v, initial_state, acc) -> torch.Tensor:
    """State at every chunk boundary: ``S_{n+1} = e^{a_C} S_n e^{b_C} + Σ_j (v_j e^{a_C-a_j})(k_j e^{b_C-b_j})ᵀ``."""
    B, H, N, _, V = v.shape
    K = k.shape[-1]
    a_last, b_last = a[:, :, :, -1:], b[:, :, :, -1:]
    updates = (v * (a_last - a).exp()).transpose(-1, -2) @ (k * (b_last - b).exp())  # [B, H, N, V, K]
    decay = a_last.transpose(-1, -2).exp() * b_last.exp()  # [B, H, N, V, K]
    S = torch.zeros(B, H, V, K, dtype=acc, device=v.device) if initial_state is None else initial_state.to(acc)
    out = [S]
    for n in range(N):
        S = S * decay[:, :, n] + updates[:, :, n]
        out.append(S)
    return torch.stack(out, 2)
