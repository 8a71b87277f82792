"""``torch.library`` custom op for sliding-window attention's forward (inference; no autograd).

``backend="triton"`` runs :func:`.triton.window_fwd` (imported lazily); ``"naive"`` the dense reference.
The public :func:`swapformer.kernels.window.window_attention` runs the reference directly when a
gradient is needed, so this op never records one.
"""

from __future__ import annotations

import torch

from swapformer.kernels.window.naive import naive_window_attention

Tensor = torch.Tensor


@torch.library.custom_op("swapformer::window_attention", mutates_args=())
def window_attention_op(
    q: Tensor, k: Tensor, v: Tensor, window: int, sinks: int, scale: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """``(o [B, H, T, Dv], c [B, H, T], den [B, H, T])``, statistics in float32 (float64 for float64)."""
    if backend == "triton":
        from swapformer.kernels.window import triton as tri

        return tri.window_fwd(q, k, v, window, sinks, scale)
    o, c, den = naive_window_attention(q, k, v, window, sinks, scale)
    return o.contiguous(), c.contiguous(), den.contiguous()


@window_attention_op.register_fake
def _(q, k, v, window, sinks, scale, backend):
    b, h, t, _ = q.shape
    acc = torch.float64 if q.dtype == torch.float64 and backend != "triton" else torch.float32
    stats = q.new_empty(b, h, t, dtype=acc)
    return q.new_empty(b, h, t, v.shape[-1]), stats, stats.clone()
