"""Worker attention in plain PyTorch, fast enough for CPU prefill, decode and calibration.

Same math as :func:`~swapformer.kernels.worker.naive.naive_worker_attention` (worker ``w`` at position
``idx_w`` attends to keys ``j ≤ idx_w``), computed differently.

:func:`blocked_worker_attention_lse` (the custom op's CPU forward, which must also return ``lse`` for
its backward):

- the workers run in blocks; a block reads only the keys up to its last worker's position, so the
  causal half of ``W × T`` is never computed (the reference forms every logit, then masks);
- GQA without copies: the ``G = H / Hkv`` query heads of a key/value head are stacked as rows of one
  matmul against that head's keys (the reference repeats ``k`` and ``v`` ``G`` times);
- the output and the log-sum-exp come from the same logits (the op's backward needs ``lse``; the
  reference path computed the logits a second time for it).

Memory: one block's logits, ``B · H · rows · keys`` floats, kept near ``BLOCK_FLOATS``.

:func:`blocked_worker_attention` (inference: no ``lse``, no gradient): the same blocks through
PyTorch's fused SDPA with a boolean mask (the flash CPU kernel never materialises the logits). At
SmolLM2-135M's shapes, 8k tokens, interval 4, one thread (``python benchmarks/profile_smollm2.py --cores
--targets worker --length 8192 --threads 1``): 0.33 s against 0.66 s for the matmul blocks, 1.84 s for
the reference (whose op path formed the logits a second time for ``lse``) and 1.13 s for the host's
dense causal SDPA over all rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swapformer.kernels.utils import acc_dtype

# floats in one block's logits (32 MiB in float32): big enough for matmul efficiency, small enough
# that a 32k-token prefill never holds a W × T matrix
BLOCK_FLOATS = 2**23


def blocked_worker_attention_lse(
    q_w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, worker_idx: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [B, W, H, D] in q's dtype, lse [B, H, W] float32)``; shapes as the naive reference."""
    b, w, h, d = q_w.shape
    hkv = k.shape[2]
    g = h // hkv
    acc = acc_dtype(q_w.dtype)
    qg = q_w.to(acc).view(b, w, hkv, g, d).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, W, D]
    # strided views, no copies (a decode step reads the whole cache through them)
    kt = k.to(acc).permute(0, 2, 3, 1)  # [B, Hkv, D, T]
    vt = v.to(acc).transpose(1, 2)  # [B, Hkv, T, D]
    idx = worker_idx.to(k.device)
    limits = (idx + 1).tolist()
    o = torch.empty(b, hkv, g, w, d, dtype=acc, device=q_w.device)
    lse = torch.empty(b, hkv, g, w, dtype=acc, device=q_w.device)
    step = max(1, BLOCK_FLOATS // (b * h * limits[-1])) if w else 1
    for a in range(0, w, step):
        e = min(w, a + step)
        n = limits[e - 1]
        rows = qg[:, :, :, a:e].reshape(b, hkv, g * (e - a), d)
        logits = torch.matmul(rows, kt[..., :n]).mul_(scale).view(b, hkv, g, e - a, n)
        logits.masked_fill_(torch.arange(n, device=k.device) > idx[a:e, None], float("-inf"))
        lse[..., a:e] = torch.logsumexp(logits, -1)
        p = logits.sub_(lse[..., a:e, None]).exp_().view(b, hkv, g * (e - a), n)
        o[:, :, :, a:e] = torch.matmul(p, vt[:, :, :n]).view(b, hkv, g, e - a, d)
    o = o.reshape(b, h, w, d).transpose(1, 2).to(q_w.dtype)
    return o, lse.reshape(b, h, w).float()


def blocked_worker_attention(
    q_w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, worker_idx: torch.Tensor, scale: float,
    block: int = 256,
) -> torch.Tensor:
    """``o [B, W, H, D]`` in q's dtype, through masked SDPA over ``block`` workers at a time."""
    qh, kh, vh = q_w.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    idx = worker_idx.to(k.device)
    limits = (idx + 1).tolist()
    outs = []
    for a in range(0, q_w.shape[1], block):
        e = min(q_w.shape[1], a + block)
        n = limits[e - 1]
        visible = torch.arange(n, device=k.device) <= idx[a:e, None]
        outs.append(F.scaled_dot_product_attention(qh[:, :, a:e], kh[:, :, :n], vh[:, :, :n], attn_mask=visible,
                                                   scale=scale, enable_gqa=kh.shape[1] != qh.shape[1]))
    return torch.cat(outs, 2).transpose(1, 2) if outs else q_w.new_empty(q_w.shape)
