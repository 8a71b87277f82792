"""Pure PyTorch reference for CAT attention (``shared/spec/seeds.md`` §3.1–3.2). This file is the spec.

Tokens are split into chunks of ``C``; chunk ``c`` covers positions ``cC .. cC+C-1`` and has one
compressed key/value pair ``(kc[c], vc[c])`` summarising it. Query ``t`` in chunk ``c = t // C`` attends,
with ONE softmax over the union (``scale`` applied to every logit), to

    sink (optional, always visible)  ∪  kc[0 .. c-1] (earlier chunks only)  ∪  k[cC .. t] (own chunk, causal)

Layout: ``q [B, T, H, D]``; ``k, v [B, T, Hkv, D]``; ``kc, vc [B, N, Hkv, D]`` with ``N = ceil(T / C)``;
``sink_k, sink_v [Hkv, D]``. GQA: query head ``h`` reads kv head ``h // (H // Hkv)``.
"""

from __future__ import annotations

import torch

from swapformer.kernels.utils import acc_dtype


def naive_cat_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    chunk_size: int,
    scale: float,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunk-by-chunk softmax attention over ``sink ∪ compressed earlier chunks ∪ own chunk``.

    Returns:
        ``o [B, T, H, D]`` in q's dtype; with ``return_lse`` also the row log-sum-exp of the scaled
        logits, ``[B, H, T]`` in the accumulation dtype.
    """
    B, T, H, D = q.shape
    G = H // k.shape[2]
    acc = acc_dtype(q.dtype)
    rep = lambda x: x.to(acc).repeat_interleave(G, dim=2)  # [B, L, Hkv, D] -> [B, L, H, D]
    k_, v_, kc_, vc_ = rep(k), rep(v), rep(kc), rep(vc)
    outs, lses = [], []
    for c0 in range(0, T, chunk_size):
        c, L = c0 // chunk_size, min(chunk_size, T - c0)
        keys = [kc_[:, :c], k_[:, c0 : c0 + L]]
        vals = [vc_[:, :c], v_[:, c0 : c0 + L]]
        visible = [torch.ones(L, c, dtype=torch.bool, device=q.device)]
        visible.append(torch.ones(L, L, dtype=torch.bool, device=q.device).tril())
        if sink_k is not None:
            keys.insert(0, rep(sink_k.expand(B, 1, *sink_k.shape)))
            vals.insert(0, rep(sink_v.expand(B, 1, *sink_v.shape)))
            visible.insert(0, torch.ones(L, 1, dtype=torch.bool, device=q.device))
        keys, vals, visible = torch.cat(keys, 1), torch.cat(vals, 1), torch.cat(visible, 1)
        logits = torch.einsum("bihd,bjhd->bhij", q[:, c0 : c0 + L].to(acc), keys) * scale
        logits = logits.masked_fill(~visible, float("-inf"))
        lses.append(logits.logsumexp(-1))
        outs.append(torch.einsum("bhij,bjhd->bihd", logits.softmax(-1), vals))
    o = torch.cat(outs, 1).to(q.dtype)
    return (o, torch.cat(lses, 2)) if return_lse else o


def cat_visible_mask(T: int, chunk_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean ``[T, N + T]`` mask over ``[compressed slots | tokens]`` (sink excluded: always visible).

    Used by the FlexAttention variant and by tests; True where query ``t`` may attend.
    """
    N = -(-T // chunk_size)
    t = torch.arange(T, device=device)[:, None]
    slot = torch.arange(N, device=device)[None, :]
    j = torch.arange(T, device=device)[None, :]
    comp = slot < t // chunk_size
    tok = (j <= t) & (j // chunk_size == t // chunk_size)
    return torch.cat([comp, tok], 1)
