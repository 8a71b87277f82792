"""Pure PyTorch references for the WorkerTransformer hot path (``shared/spec/seeds.md`` §1.1). This file is the spec.

Worker attention: only the rows at worker positions ``worker_idx[w]`` issue queries; every key of the
sequence is a key. Worker ``w`` attends causally (self included)::

    o_w = Σ_{j ≤ idx_w} softmax_j(scale · q_w · k_j) v_j

Layout: ``q_w [B, W, H, D]``, ``k, v [B, T, Hkv, D]``, ``worker_idx [W]`` (int64, increasing), GQA with
query head ``h`` reading kv head ``h // (H // Hkv)``.

Causal depthwise convolution (the block's token mixer), ``x [B, T, d]``, ``weight [d, K]``, ``bias [d]``::

    u_t = bias + Σ_{i<K} weight[:, i] ⊙ x_{t-K+1+i}          (x_{<0} = 0; the last tap is the current token)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swapformer.kernels.utils import acc_dtype


def naive_worker_attention(
    q_w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, worker_idx: torch.Tensor, scale: float
) -> torch.Tensor:
    """Dense masked softmax of the worker rows against all keys. Returns ``o [B, W, H, D]`` in q's dtype."""
    G = q_w.shape[2] // k.shape[2]
    acc = acc_dtype(q_w.dtype)
    k_, v_ = (x.to(acc).repeat_interleave(G, dim=2) for x in (k, v))
    logits = torch.einsum("bwhd,bjhd->bhwj", q_w.to(acc), k_) * scale
    j = torch.arange(k.shape[1], device=k.device)
    visible = j[None, :] <= worker_idx.to(k.device)[:, None]  # [W, T]
    p = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("bhwj,bjhd->bwhd", p, v_).to(q_w.dtype)


def naive_causal_dwconv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise convolution as K shifted multiply-adds. Returns ``u [B, T, d]`` in x's dtype."""
    T, K = x.shape[1], weight.shape[1]
    acc = acc_dtype(x.dtype)
    xp = F.pad(x.to(acc), (0, 0, K - 1, 0))  # zero left padding
    w = weight.to(acc)
    u = sum(xp[:, i : i + T] * w[:, i] for i in range(K))
    if bias is not None:
        u = u + bias.to(acc)
    return u.to(x.dtype)
