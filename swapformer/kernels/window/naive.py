"""Reference (the spec) of sliding-window attention with sinks, returning the softmax's row statistics.

Query ``i`` sees key ``j`` iff ``j ≤ i`` and (``i − j < window`` or ``j < sinks``): the ``window``
target's rule, also the exact part of the hybrid targets. With scores ``s_ij = scale·q_i·k_j``::

    c_i   = max_{j seen} s_ij                 (row max)
    den_i = Σ_{j seen} e^{s_ij − c_i}         (≥ 1: the max term is 1)
    o_i   = Σ_{j seen} e^{s_ij − c_i} v_j / den_i

``(c, den)`` let a caller add other terms to the same normaliser (the hybrids' far memory). Every row
sees at least itself, so no row is empty. Dense ``T × T``: for tests and short sequences.
"""

from __future__ import annotations

import torch


def window_visible(t: int, window: int, sinks: int, device: torch.device | None = None) -> torch.Tensor:
    """``[T, T]`` bool: True where query ``i`` (row) sees key ``j`` (column)."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    return (j <= i) & ((i - j < window) | (j < sinks))


def naive_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q [B, H, T, D]``, ``k [B, Hkv, T, D]``, ``v [B, Hkv, T, Dv]`` → ``(o [B, H, T, Dv], c, den [B, H, T])``.

    ``o`` in q's dtype, ``c`` and ``den`` in float32 (float64 for float64 inputs).
    """
    b, h, t, d = q.shape
    g = h // k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(acc).view(b, k.shape[1], g, t, d)
    s = torch.einsum("bkgtd,bksd->bkgts", qg, k.to(acc)) * scale
    s = s.masked_fill(~window_visible(t, window, sinks, q.device), float("-inf"))
    c = s.amax(-1, keepdim=True)
    e = torch.exp(s - c)
    den = e.sum(-1, keepdim=True)
    o = torch.einsum("bkgts,bksd->bkgtd", e, v.to(acc)) / den
    return o.reshape(b, h, t, -1).to(q.dtype), c.reshape(b, h, t), den.reshape(b, h, t)
