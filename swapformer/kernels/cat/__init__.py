"""CAT (Compress And Attend) attention: softmax over compressed earlier chunks + own chunk + a sink.

Layout ``[B, T, H, D]``; see :mod:`swapformer.kernels.cat.naive` for the exact visibility rule.
"""

from __future__ import annotations

import torch

from swapformer.kernels.cat.flex import cat_attention_flex, flex_available
from swapformer.kernels.cat.naive import cat_visible_mask, naive_cat_attention
from swapformer.kernels.cat.op import cat_attention_op
from swapformer.kernels.utils import resolve_backend

__all__ = [
    "cat_attention",
    "cat_attention_flex",
    "cat_visible_mask",
    "flex_available",
    "naive_cat_attention",
]


def _check(q, k, v, kc, vc, chunk_size, sink_k, sink_v) -> None:
    B, T, H, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"k, v must be [B, T, Hkv, D] matching q {list(q.shape)}; got {k.shape}, {v.shape}")
    Hkv = k.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({Hkv})")
    N = -(-T // chunk_size)
    if chunk_size < 1 or kc.shape != (B, N, Hkv, D) or vc.shape != kc.shape:
        raise ValueError(f"kc, vc must be [B, ceil(T/C), Hkv, D] = {[B, N, Hkv, D]}; got {kc.shape}, {vc.shape}")
    if (sink_k is None) != (sink_v is None):
        raise ValueError("sink_k and sink_v must be given together")
    if sink_k is not None and (sink_k.shape != (Hkv, D) or sink_v.shape != (Hkv, D)):
        raise ValueError(f"sink_k, sink_v must be [Hkv, D] = {[Hkv, D]}")


def cat_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    *,
    chunk_size: int,
    scale: float,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """CAT attention (``seeds.md`` §3.1–3.2), fused flash-style on GPU.

    Query ``t`` in chunk ``c = t // chunk_size`` attends, with one softmax over the union and ``scale``
    on every logit, to ``sink ∪ kc[:, :c] ∪ k[:, cC .. t]``.

    Args:
        q: ``[B, T, H, D]`` queries.
        k, v: ``[B, T, Hkv, D]`` token keys/values (``H`` a multiple of ``Hkv``; head ``h`` reads kv head
            ``h // (H // Hkv)``).
        kc, vc: ``[B, N, Hkv, D]`` compressed key/value of each chunk, ``N = ceil(T / chunk_size)``
            (the last entry is never attended but keeps shapes simple).
        chunk_size: tokens per chunk ``C`` (``T`` need not be a multiple).
        scale: logit scale (usually ``D ** -0.5``).
        sink_k, sink_v: ``[Hkv, D]`` optional key/value visible to every query.
        backend: ``"auto"`` | ``"triton"`` | ``"naive"``.

    Returns:
        ``o [B, T, H, D]`` in q's dtype.

    Raises:
        ValueError: inconsistent shapes or unknown backend.
    """
    _check(q, k, v, kc, vc, chunk_size, sink_k, sink_v)
    backend = resolve_backend(backend, q)
    o, _ = cat_attention_op(q, k, v, kc, vc, sink_k, sink_v, int(chunk_size), float(scale), backend)
    return o
