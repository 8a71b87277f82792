"""The heavy-hitter cache's choice of evicted tokens, shared by ``window`` with ``cache=K``
(:mod:`swapformer.targets.window_cache`) and the hybrids with ``cache=K`` (:mod:`swapformer.targets.hybrid`).

Per kv head and batch row, query ``i`` keeps ``C_i``: the ``K`` evicted tokens (``s ≤ j ≤ i − w``) with the
largest ``a_j``, the attention token ``j`` drew while in the window (final once it is evicted). A token that
leaves ``C`` never returns, so ``K`` slots carry it from one query block to the next: the block's queries
choose among the slots and the tokens evicted inside the block, per query, and the top ``K`` for the
block's end become the next block's slots.
"""

from __future__ import annotations

import math

import torch

from swapformer.targets.reference import window_buffer_slices

Tokens = dict[str, torch.Tensor]  # per-token tensors [B, X, T, ...] (X a multiple of the kv heads)
NEG_INF = -math.inf


def gather_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Tokens ``index [B, Hkv, K]`` (chosen per kv head) of ``t [B, X, T, ...]``, where ``X`` is the kv heads
    or a multiple of them (per query head: each head takes its kv head's tokens); returns ``[B, X, K, ...]``."""
    b, x, t_len, *rest = t.shape
    hk, n = index.shape[1], index.shape[2]
    grouped = t.reshape(b, hk, x // hk, t_len, *rest)
    idx = index.view(b, hk, 1, n, *([1] * len(rest))).expand(b, hk, x // hk, n, *rest)
    return grouped.gather(3, idx).reshape(b, x, n, *rest)


def empty_slots(tokens: Tokens, slots: int) -> Tokens:
    """``slots`` empty slots for every per-token tensor of ``tokens`` (zeros), scoring −inf."""
    empty = {name: t.new_zeros(t.shape[0], t.shape[1], slots, *t.shape[3:]) for name, t in tokens.items()}
    empty["score"] = tokens["score"].new_full((*tokens["score"].shape[:2], slots), NEG_INF)
    return empty


def choose(slots: Tokens, tokens: Tokens, keep: torch.Tensor, qa: int, qb: int, last: int, window: int,
           sinks: int, cache: int) -> tuple[Tokens, torch.Tensor, Tokens]:
    """The candidates of queries ``qa .. qb − 1``, which of them each query keeps, and the next slots.

    ``slots`` the ``K`` slots ready for query ``qa`` (every per-token tensor of ``tokens``, and ``score``);
    ``tokens`` a buffer of the sinks then one run of positions ending at ``last`` (per-token tensors, and
    ``score [B, Hkv, R]`` each token's ``a`` so far), ``keep [B, R]`` False for padding. Candidates are the
    slots then the tokens ``qa − w + 1 .. qb − w`` (evicted inside the block, visible to query ``i`` once
    ``j ≤ i − w``). Returns ``(candidates, member [B, Hkv, Tq, K + Ne], slots for query qb)``; the candidates are
    every per-token tensor but ``score``.
    """
    length = keep.shape[1]
    lo_e, hi_e = max(sinks, qa - window + 1), qb - window + 1
    _, ev_start, ev_end = window_buffer_slices(last, length, 0, lo_e, hi_e)
    cand = {name: torch.cat([slots[name], t[:, :, ev_start:ev_end]], 2) for name, t in tokens.items()
            if name != "score"}
    ev_score = tokens["score"][:, :, ev_start:ev_end].masked_fill(~keep[:, None, ev_start:ev_end], NEG_INF)
    cand_score = torch.cat([slots["score"], ev_score], 2)
    dev = keep.device
    q_pos = torch.arange(qa, qb + 1, device=dev)  # the block's queries and a virtual query qb
    j = torch.arange(lo_e, max(lo_e, hi_e), device=dev)
    vis = torch.cat([torch.ones(qb + 1 - qa, cache, dtype=torch.bool, device=dev), j[None, :] <= q_pos[:, None] - window], 1)
    member, ready, ready_score = rank(cand_score, vis, cache)
    nxt = {name: gather_tokens(t, ready) for name, t in cand.items()}
    nxt["score"] = ready_score
    return cand, member[:, :, :-1], nxt


def rank(cand_score: torch.Tensor, vis: torch.Tensor, cache: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which candidates each row keeps, and the ``K`` slots after the last row.

    ``cand_score [B, Hkv, C]``, ``vis [R, C]`` the candidates each row may see (the last row sees them
    all). A row keeps the first ``K`` finite candidates it sees in the order of their scores, one stable
    sort for all rows, so that ties go to the earlier candidate (the slots, then older tokens) on every
    path. Returns ``member [B, Hkv, R, C]`` and the last row's ``K`` indices and scores ``[B, Hkv, K]``
    (−inf where fewer than ``K`` are finite: empty slots).
    """
    ranked, order = cand_score.sort(dim=-1, descending=True, stable=True)
    idx = order[:, :, None].expand(-1, -1, vis.shape[0], -1)
    seen = vis.expand(*cand_score.shape[:2], -1, -1).gather(3, idx) & torch.isfinite(ranked)[:, :, None]
    kept = seen & (seen.cumsum(-1) <= cache)
    # the scores go into a decoding state: their own storage, not a view of all the candidates'
    return torch.zeros_like(kept).scatter_(3, idx, kept), order[..., :cache], ranked[..., :cache].contiguous()


def add_window_scores(score: torch.Tensor, e: torch.Tensor, den: torch.Tensor, sink_end: int,
                      run_start: int, run_end: int) -> torch.Tensor:
    """``score [B, Hkv, R]`` plus the window softmax weights that a block's queries gave the run keys.

    ``e [B, Hkv, G, Tq, S + run]`` the block's shifted exact weights over the sinks before the window then
    the run (buffer ``run_start .. run_end − 1``), ``den`` their sums: ``a_j`` counts the window only (a
    sink column is never evicted)."""
    drawn = (e[..., sink_end:] / den.clamp_min(torch.finfo(den.dtype).tiny)).sum(dim=(2, 3))
    return score.index_add(2, torch.arange(run_start, run_end, device=score.device), drawn.detach())


def merge(num: torch.Tensor, den: torch.Tensor, c: torch.Tensor, num_c: torch.Tensor, den_c: torch.Tensor,
          c_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two sets of shifted sums ``(Σ e v, Σ e, c)`` over disjoint keys as one, shifted by the larger max of
    the sets a row sees a key in (``c = 0`` where it sees none)."""
    c, c_c = torch.where(den > 0, c, NEG_INF), torch.where(den_c > 0, c_c, NEG_INF)
    top = torch.maximum(c, c_c)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w_n, w_c = torch.exp(c - top), torch.exp(c_c - top)
    return num * w_n + num_c * w_c, den * w_n + den_c * w_c, top
