"""Sliding-window attention with sinks, with the softmax's row statistics (forward kernel).

Layout ``[B, H, T, D]`` (the attention targets' own), keys/values ``[B, Hkv, T, D]``; see
:mod:`swapformer.kernels.window.naive` for the math. Used on CUDA by the ``window`` target's prefill and
the hybrid targets' exact part; their PyTorch paths serve the CPU and training.
"""

from __future__ import annotations

import torch

from swapformer.kernels.utils import resolve_backend
from swapformer.kernels.window.naive import naive_window_attention, window_visible
from swapformer.kernels.window.op import window_attention_op

__all__ = ["naive_window_attention", "window_attention", "window_kernel_applies", "window_visible"]


def _needs_grad(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def window_kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when :func:`window_attention` would run the Triton kernel on these tensors: the ``auto``
    backend picks Triton (CUDA, or ``SWAPFORMER_KERNELS=triton``), no gradient is recorded and the
    dtype is one ``tl.dot`` takes (not float64)."""
    return q.dtype != torch.float64 and not _needs_grad(q, k, v) and resolve_backend("auto", q) == "triton"


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    sinks: int = 0,
    scale: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention over the last ``window`` keys plus the first ``sinks`` (from position 0).

    Args:
        q: ``[B, H, T, D]`` queries.
        k, v: ``[B, Hkv, T, D]`` / ``[B, Hkv, T, Dv]`` keys and values (``H`` a multiple of ``Hkv``).
        window: keys a query sees counting itself (``i − window < j ≤ i``), ≥ 1.
        sinks: first keys every query also sees.
        scale: logit scale.
        backend: ``"auto"`` | ``"triton"`` | ``"naive"``; the kernel is forward-only, so with
            autograd the (dense) reference runs whatever the backend.

    Returns:
        ``(o [B, H, T, Dv] in q's dtype, c [B, H, T], den [B, H, T])``: each row's max score and
        ``Σ e^{s − c}`` over the keys it sees (float32; float64 on the reference for float64 inputs).

    Raises:
        ValueError: inconsistent shapes, ``window < 1``, ``sinks < 0`` or an unknown backend.
    """
    b, h, t, d = q.shape
    if k.dim() != 4 or k.shape[0] != b or k.shape[2] != t or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(f"k must be [B, Hkv, T, D] = [{b}, Hkv, {t}, {d}] with H % Hkv == 0, got {list(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B, Hkv, T, Dv] with k's first three dims {list(k.shape[:3])}, got {list(v.shape)}")
    if window < 1 or sinks < 0:
        raise ValueError(f"window must be >= 1 and sinks >= 0, got window={window}, sinks={sinks}")
    backend = resolve_backend(backend, q)
    if _needs_grad(q, k, v):
        return naive_window_attention(q, k, v, window, sinks, float(scale))
    return window_attention_op(q, k, v, int(window), int(sinks), float(scale), backend)
