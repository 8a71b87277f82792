"""WorkerTransformer hot path: attention from worker rows only, and the causal depthwise conv.

Layout ``[B, T, H, D]`` (worker queries ``[B, W, H, D]``); see :mod:`swapformer.kernels.worker.naive`.
"""

from __future__ import annotations

import torch

from swapformer.kernels.utils import resolve_backend
from swapformer.kernels.worker.blocked import blocked_worker_attention
from swapformer.kernels.worker.naive import naive_causal_dwconv, naive_worker_attention
from swapformer.kernels.worker.op import causal_dwconv_op, worker_attention_op

__all__ = [
    "causal_dwconv",
    "causal_dwconv_gather",
    "naive_causal_dwconv",
    "naive_worker_attention",
    "worker_attention",
]


def worker_attention(
    q_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    worker_idx: torch.Tensor,
    *,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention from worker positions to all earlier keys (``seeds.md`` §1.1 step 4).

    Worker ``w`` at position ``worker_idx[w]`` attends to keys ``j ≤ worker_idx[w]`` (self included).

    Args:
        q_w: ``[B, W, H, D]`` queries at the worker positions only.
        k, v: ``[B, T, Hkv, D]`` keys/values of every position (``H`` a multiple of ``Hkv``).
        worker_idx: ``[W]`` int64 strictly increasing positions in ``[0, T)``.
        scale: logit scale (usually ``D ** -0.5``).
        backend: ``"auto"`` | ``"triton"`` | ``"naive"``.

    Returns:
        ``o [B, W, H, D]`` in q_w's dtype.

    Raises:
        ValueError: inconsistent shapes or unknown backend.
    """
    B, W, H, D = q_w.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or H % k.shape[2]:
        raise ValueError(f"k, v must be [B, T, Hkv, D] with H % Hkv == 0; got {k.shape}, {v.shape}")
    if tuple(worker_idx.shape) != (W,):
        raise ValueError(f"worker_idx must be [W] = [{W}], got {list(worker_idx.shape)}")
    backend = resolve_backend(backend, q_w)
    if backend == "naive" and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q_w, k, v))):
        # inference on the reference path (CPU): fused SDPA blocks, no log-sum-exp for a backward
        return blocked_worker_attention(q_w, k, v, worker_idx.to(torch.int64), float(scale))
    o, _ = worker_attention_op(q_w, k, v, worker_idx.to(torch.int64), float(scale), backend)
    return o


def causal_dwconv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, backend: str = "auto"
) -> torch.Tensor:
    """Causal depthwise convolution ``u_t = bias + Σ_i weight[:, i] ⊙ x_{t-K+1+i}`` (zero left padding).

    Args:
        x: ``[B, T, d]``.
        weight: ``[d, K]``; the last tap multiplies the current token.
        bias: ``[d]`` or None.
        backend: ``"auto"`` | ``"triton"`` | ``"naive"``.

    Returns:
        ``u [B, T, d]`` in x's dtype.
    """
    return _dwconv(x, weight, bias, None, backend)[0]


def causal_dwconv_gather(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    worker_idx: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`causal_dwconv` that also returns the worker rows ``u[:, worker_idx]`` from the same pass.

    Returns:
        ``(u [B, T, d], u_w [B, W, d])``.
    """
    return _dwconv(x, weight, bias, worker_idx.to(torch.int64), backend)


def _dwconv(x, weight, bias, worker_idx, backend):
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"x must be [B, T, d] and weight [d, K]; got {list(x.shape)}, {list(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (x.shape[2],):
        raise ValueError(f"bias must be [d] = [{x.shape[2]}], got {list(bias.shape)}")
    backend = resolve_backend(backend, x)
    return causal_dwconv_op(x, weight, bias, worker_idx, backend)
