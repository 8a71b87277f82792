"""``"window"`` with ``cache=K``: the sliding window and sinks plus ``K`` heavy-hitter tokens per kv head.

Training-free, like the window: every host weight is reused and only the set of visible keys changes.
For query ``i`` (0-based), sinks ``s``, window ``w``::

    N_i = {j ≤ i : i − j < w  or  j < s}              the window target's keys
    E_i = {j : s ≤ j ≤ i − w}                          evicted from the window (not sinks)
    a_j = Σ_{i = j}^{j + w − 1} Σ_{h ∈ kv head} p^N_{h,i,j}   the attention token j drew while in the window,
                                                       p^N the softmax over N_i alone; final once j is evicted
    C_i = the K tokens of E_i with the largest a_j      per kv head, and per batch row
    y_i = softmax over N_i ∪ C_i of the host's scores

``K = 0`` is the window target; ``K ≥ T`` or ``w ≥ T`` the host's causal attention. Because ``a_j`` is
fixed at eviction and ``C_i`` is the top ``K`` of a growing set, a token that leaves the cache never
returns: ``C_{i+1}`` is the top ``K`` of ``C_i`` and the one token evicted at ``i + 1``. So a decoder keeps
``K`` slots (keys, values, scores) beside the window's ``s + w − 1`` tokens and their running ``a``:
fixed state. This is H2O's heavy-hitter rule (Zhang et al., 2023) with the score taken over the window
only, so that it does not depend on the cache (quality-recipes.md §1.4 names the LoLA cache, which
keeps instead the tokens a far memory recalls worst).

Measured training-free on SmolLM2-135M at 2k (``benchmarks/sparse_cache_probe.py``, RESULTS.md issue 12,
session 25): ``window=64, sinks=4, cache=64`` beats the window of the same exact keys (``window=128``)
by 6 % on held-out text, and recalls part of a repeated random sequence 256 tokens back, which no
window of that size can.

Every call runs one algorithm, prefill and decoding alike, in query blocks: first the window part of
every block (its scores give each key's ``a``), then the blocks in order, each reading the ``K`` slots
ready for its first query plus the tokens evicted inside it (masked per query to the top ``K`` of what
that query may see), and passing on the top ``K`` ready for the next block. A one-token step after the
window has filled (the one ``generate()`` takes) is one softmax instead (:meth:`CachedWindowAttention._decode_step`).
A prefill from position 0 without padding (a model's prompt, and every calibration row) computes the same
sums as tiles (:meth:`CachedWindowAttention._tiled`): the window part of all query blocks as one batched
softmax, the choice of cached keys block by block on scores alone (one sort per block), then the cache
part of all blocks as one batched softmax, the two joined by their log-sum-exps. Measured per layer at
SmolLM2-135M's shapes (2 threads, ``benchmarks/profile_smollm2.py --cores``): 30-42 ms for a 2k prefill
against the block loop's 51-68 ms and the host's causal SDPA's 40-69 ms (RESULTS.md, issue 12, session 26).
Every path ranks with one stable sort (:func:`~swapformer.targets.heavy_cache.rank`): ties go to the
earlier candidate.
Keys the host mask marks as padding are never seen nor cached. A site whose mask has other content (a
position bias) is refused, and so is such a mask at run time: the cache does not read it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from swapformer.errors import ConfigError, InputError
from swapformer.targets.heavy_cache import add_window_scores, choose, merge, rank
from swapformer.targets.hybrid import (
    local_terms,
    mask_bias,
    query_rows,
    tile_bias,
    tile_keys,
    tile_terms,
)
from swapformer.targets.reference import (
    check_full_call,
    full_window_step,
    key_keep_from_bias,
    state_pos,
    window_buffer_slices,
    window_keep,
    window_position_step,
)
from swapformer.targets.window import WindowAttention

NEG_INF = -math.inf


class CachedWindowAttention(WindowAttention):
    """The ``window`` core with a heavy-hitter cache (``WindowConfig.cache > 0``); see the module docstring."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.config.cache < 1:
            raise ConfigError(f"CachedWindowAttention needs a config with cache >= 1, got {self.config.cache}")
        self.cache = self.config.cache

    def forward(self, q, k, v, bias=None, *, hidden=None, state=None) -> torch.Tensor:
        if state is None:
            check_full_call(q, k, self.target_name)
            if bias is not None and not self._padding_only(bias, q.shape[0], k.shape[-2])[0]:
                raise InputError("window with cache reads only a causal and key-padding mask; this mask has "
                                 "other content (a position bias?): use cache=0, which keeps it")
        dt = torch.promote_types(q.dtype, torch.float32)
        out_dtype, q, k, v = q.dtype, q.to(dt), k.to(dt), v.to(dt)
        if state is not None and self._decode_step_applies(q, k, bias, state):
            return self._decode_step(q, k, v, state).to(out_dtype)
        b, tq = q.shape[0], q.shape[-2]
        keep_new = key_keep_from_bias(bias, b, k.shape[-2])
        if keep_new is None and self.tiled_prefill and state_pos(state) == 0 and tq > self._block():
            out, score, slots = self._tiled(q, k, v)
            if state is not None:
                keep = torch.ones(b, tq, dtype=torch.bool, device=q.device)
                self._store(state, {"k": k, "v": v, "keep": keep, "score": score}, slots, tq)
            return out.to(out_dtype)
        if keep_new is None:
            keep_new = torch.ones(b, tq, dtype=torch.bool, device=q.device)
        buf = self._buffer(state, k, v, keep_new)
        slots = self._slots(state, b, k, v)
        start = state_pos(state)
        out, slots = self._attend(q, buf, slots, start)
        if state is not None:
            self._store(state, buf, slots, start + tq)
        return out.to(out_dtype)

    # a prefill from position 0 without padding runs as tiles (False: the block loop, which the tests
    # take as the reference); queries per segment of tiles
    tiled_prefill: bool = True
    segment_len: int = 512

    def _tiled(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The block loop's sums for a prefill from position 0 without padding, query blocks as tiles.

        Per segment of ``segment_len`` queries: the window part of every block at once (one batched
        softmax over each tile's sinks and ``w + block − 1`` keys, as the hybrids' tiles), whose weights
        give the keys' ``a``; then the choice of the cached keys block by block, on scores alone
        (:meth:`_choose_tiles`); then the cache part of every block at once over the keys each block
        chose. The two parts combine through their log-sum-exps. Returns the output ``[B, H, T, Dv]``,
        ``a [B, Hkv, T]`` and the slots ready for query ``T``.
        """
        b, h, t, d = q.shape
        hk, blk = self.num_kv_heads, self._block()
        tp = -(-t // blk) * blk
        seg = max(blk, self.segment_len // blk * blk)
        kp, vp = (F.pad(x, (0, 0, self.window - 1, tp - t)) for x in (k, v))
        # index j + w − 1 holds a_j; room for the candidate slices of _choose_tiles past the end
        score = k.new_zeros(b, hk, tp + self.window + self.sinks + blk)
        slots = {"pos": torch.zeros(b, hk, self.cache, dtype=torch.long, device=q.device),
                 "score": k.new_full((b, hk, self.cache), NEG_INF)}
        outs = []
        for a in range(0, tp, seg):
            e = min(tp, a + seg)
            qt = query_rows(q, a, e).view(b, hk, h // hk, (e - a) // blk, blk, d).transpose(2, 3)
            o_w, lse_w = self._window_tiles(qt, k, v, kp, vp, score, a, e, t)
            pos, member, slots = self._choose_tiles(score, slots, a, e, t)
            o_c, lse_c = self._cache_tiles(qt, k, v, pos, member)
            out = torch.lerp(o_w, o_c, torch.sigmoid(lse_c - lse_w))  # shares e^lse_w : e^lse_c
            outs.append(out.transpose(2, 3).reshape(b, h, e - a, -1))
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        ready = slots["pos"][..., None]
        final = {"k": k.gather(2, ready.expand(-1, -1, -1, d)), "v": v.gather(2, ready.expand(-1, -1, -1, v.shape[-1])),
                 "score": slots["score"]}
        return out[:, :, :t], score[:, :, self.window - 1:self.window - 1 + t], final

    def _window_tiles(self, qt, k, v, kp, vp, score, a: int, e: int, t: int):
        """``(o, lse)`` of the window part of queries ``a .. e − 1`` in tiles ``[B, Hkv, blocks, G, block, ·]``;
        adds the weights of real queries (``< t``) on the run keys to ``score`` (in place)."""
        nb, blk = qt.shape[2], qt.shape[4]
        w, sinks = self.window, min(self.sinks, t)
        span = blk + w - 1
        kt, vt = tile_keys(kp, k[:, :, :sinks], a, e, blk, w), tile_keys(vp, v[:, :, :sinks], a, e, blk, w)
        bias = tile_bias(a, e, blk, w, sinks, qt.dtype, qt.device)
        o, inv_den, c, p = tile_terms(qt, kt, vt, bias, self.scale, row_max=True)
        real = (torch.arange(a, e, device=qt.device) < t).to(p.dtype).view(nb, 1, blk, 1)
        drawn = (p[..., sinks:].detach() * real).sum(dim=(3, 4))  # [B, Hkv, blocks, span]: a_j, the run only
        cols = (torch.arange(a, e, blk, device=qt.device)[:, None] + torch.arange(span, device=qt.device)).flatten()
        score.index_add_(2, cols, drawn.flatten(2))
        return o, c - torch.log(inv_den)

    def _choose_tiles(self, score, slots, a: int, e: int, t: int):
        """The candidates' positions ``[B, Hkv, blocks, K + block]`` of each block of queries ``a .. e − 1``
        (the slots, then the tokens evicted inside the block), which each query keeps, and the slots
        after: :func:`~swapformer.targets.heavy_cache.choose` on positions and scores alone."""
        w, n, blk, dev = self.window, self.cache, self._block(), score.device
        b, hk = score.shape[:2]
        positions, members = [], []
        for qa in range(a, e, blk):
            qb = min(t, qa + blk)
            lo_e = max(self.sinks, qa - w + 1)
            ev = torch.arange(lo_e, lo_e + blk, device=dev)  # evicted in the block: ev ≤ qb − w
            real = ev <= qb - w
            ev_score = score[:, :, w - 1 + lo_e:w - 1 + lo_e + blk].masked_fill(~real, NEG_INF)
            cand_score = torch.cat([slots["score"], ev_score], 2)
            cand_pos = torch.cat([slots["pos"], torch.where(real, ev, 0).expand(b, hk, -1)], 2)
            q_pos = torch.arange(qa, qa + blk + 1, device=dev)  # the last row stands for query qb
            vis = torch.cat([torch.ones(blk + 1, n, dtype=torch.bool, device=dev),
                             ev[None, :] <= torch.minimum(q_pos, torch.tensor(qb, device=dev))[:, None] - w], 1)
            member, ready, ready_score = rank(cand_score, vis, n)
            members.append(member[:, :, :-1])
            positions.append(cand_pos)
            slots = {"pos": cand_pos.gather(2, ready), "score": ready_score}
        return torch.stack(positions, 2), torch.stack(members, 2), slots

    def _cache_tiles(self, qt, k, v, pos, member):
        """``(o, lse)`` of the cache part: each tile's queries over its candidates' keys, masked by
        ``member [B, Hkv, blocks, block, C]`` (``lse = −inf`` on rows that keep none)."""
        b, hk, nb = qt.shape[:3]
        idx = pos.flatten(2)[..., None]
        kc = k.gather(2, idx.expand(-1, -1, -1, k.shape[-1])).view(b, hk, nb, -1, k.shape[-1])
        vc = v.gather(2, idx.expand(-1, -1, -1, v.shape[-1])).view(b, hk, nb, -1, v.shape[-1])
        has = member.any(-1, keepdim=True)[:, :, :, None]  # [B, Hkv, blocks, 1, block, 1]
        # rows that keep nothing see every candidate (no NaN in the softmax's gradient), then lse = −inf
        bias = mask_bias(member[:, :, :, None] | ~has, qt.dtype)
        o, inv_den, c, _ = tile_terms(qt, kc, vc, bias, self.scale, row_max=True)
        return o, torch.where(has, c - torch.log(inv_den), NEG_INF)

    def _decode_step_applies(self, q, k, bias, state: dict) -> bool:
        """The window's one-token step (:func:`full_window_step`) once the slots exist."""
        return (self.fast_decode and "cache_k" in state
                and full_window_step(q, k, bias, state, self.sinks, self.window))

    def _decode_step(self, q, k, v, state: dict) -> torch.Tensor:
        """One token at ``i = state["pos"]`` after the window has filled, without padding: one softmax over
        the sinks, tokens ``i − w + 1 .. i`` and the slots (the block path's keys, unmasked but for empty
        slots); the window's share of it adds to the window tokens' scores; token ``i − w + 1`` then leaves
        the window and takes the lowest slot if it scores higher. Same sums as the block path (tests)."""
        b, h, _, d = q.shape
        hk, s, n_win = k.shape[1], self.sinks, self.sinks + self.window
        keys = torch.cat([state["k"], k, state["cache_k"]], 2)
        values = torch.cat([state["v"], v, state["cache_v"]], 2)
        scores = torch.matmul(q.view(b, hk, h // hk, d), (keys * self.scale).transpose(-1, -2))
        empty = ~torch.isfinite(state["cache_score"])[:, :, None]  # [B, Hkv, 1, K]
        scores[..., n_win:] = scores[..., n_win:].masked_fill(empty, NEG_INF)
        p = torch.softmax(scores, dim=-1)
        out = torch.matmul(p, values).view(b, h, 1, -1)
        in_window = p[..., s:n_win]  # the run: tokens i − w + 1 .. i
        drawn = (in_window / p[..., :n_win].sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)).sum(2)
        score = torch.cat([state["score"], torch.zeros_like(drawn[..., :1])], 2)
        score[..., s:] += drawn
        cand_score = torch.cat([state["cache_score"], score[..., s:s + 1]], 2)
        # ranked as heavy_cache.rank ranks (a stable sort): on a tie the slot stays
        ready = cand_score.sort(dim=-1, descending=True, stable=True).indices[..., :self.cache]
        for name, cached, new in (("k", state["cache_k"], keys), ("v", state["cache_v"], values)):
            cand = torch.cat([cached, new[:, :, s:s + 1]], 2)
            state["cache_" + name] = cand.gather(2, ready[..., None].expand(-1, -1, -1, cand.shape[-1]))
            state[name] = torch.cat([new[:, :, :s], new[:, :, s + 1:n_win]], 2)
        state["cache_score"] = cand_score.gather(2, ready)
        state["score"] = torch.cat([score[..., :s], score[..., s + 1:]], 2)
        state["k_pos"] = state["k_pos"] + window_position_step(state["k_pos"].device, s, self.window)
        state["pos"] = state["pos"] + 1
        return out

    def _buffer(self, state, k, v, keep_new) -> dict[str, torch.Tensor]:
        """The state's window tokens then this call's: ``k, v``, ``keep [B, R]``, ``score [B, Hkv, R]``
        (each token's attention so far while in the window)."""
        score = k.new_zeros(k.shape[:3])
        if state is None or "k" not in state:
            return {"k": k, "v": v, "keep": keep_new, "score": score}
        return {"k": torch.cat([state["k"], k], 2), "v": torch.cat([state["v"], v], 2),
                "keep": torch.cat([state["keep"], keep_new], 1), "score": torch.cat([state["score"], score], 2)}

    def _slots(self, state, b: int, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ``K`` cache slots ``(k, v, score)``; an empty slot scores −inf."""
        if state is not None and "cache_k" in state:
            return {"k": state["cache_k"], "v": state["cache_v"], "score": state["cache_score"]}
        hk, n = k.shape[1], self.cache
        return {"k": k.new_zeros(b, hk, n, k.shape[-1]), "v": v.new_zeros(b, hk, n, v.shape[-1]),
                "score": k.new_full((b, hk, n), NEG_INF)}

    def _attend(self, q, buf, slots, start: int):
        """Outputs ``[B, H, Tq, Dv]`` of queries ``start ..`` and the slots ready for the next query."""
        b, h, tq, d = q.shape
        hk, blk = buf["k"].shape[1], self._block()
        qg = q.view(b, hk, h // hk, tq, d)
        last, length = start + tq - 1, buf["k"].shape[2]
        blocks = [(a, min(tq, a + blk)) for a in range(0, tq, blk)]
        window_parts = [self._window_part(qg[:, :, :, a:e], buf, start + a, start + e, last, length)
                        for a, e in blocks]
        outs = []
        for (a, e), (num, den, c) in zip(blocks, window_parts):
            num_c, den_c, c_c, slots = self._cache_part(qg[:, :, :, a:e], buf, slots, start + a, start + e, last)
            num, den, _ = merge(num, den, c, num_c, den_c, c_c)
            out = num / den.clamp_min(torch.finfo(den.dtype).tiny)
            outs.append(out.reshape(b, h, e - a, -1))
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0], slots

    def _window_part(self, qg, buf, qa: int, qb: int, last: int, length: int):
        """The shifted sums over ``N_i`` of queries ``qa .. qb − 1``, adding their softmax weights to the
        scores of the window keys they see (the keys' ``a``)."""
        lo = max(0, qa - self.window + 1)
        sink_end, run_start, run_end = window_buffer_slices(last, length, self.sinks, lo, qb)
        idx = torch.cat([torch.arange(sink_end), torch.arange(run_start, run_end)]).to(qg.device)
        k_pos = torch.cat([torch.arange(sink_end), torch.arange(lo, qb)]).to(qg.device)
        vis = window_keep(torch.arange(qa, qb, device=qg.device), k_pos, self.window, self.sinks)
        keep = vis[None, None, None] & buf["keep"][:, idx][:, None, None, None]
        num, den, c, e = local_terms(qg, buf["k"][:, :, idx], buf["v"][:, :, idx], mask_bias(keep, qg.dtype),
                                     self.scale)
        buf["score"] = add_window_scores(buf["score"], e, den, sink_end, run_start, run_end)
        return num, den, c

    def _cache_part(self, qg, buf, slots, qa: int, qb: int, last: int):
        """The shifted sums over ``C_i`` of queries ``qa .. qb − 1`` and the slots ready for query ``qb``
        (:func:`~swapformer.targets.heavy_cache.choose`)."""
        tokens = {name: buf[name] for name in ("k", "v", "score")}
        cand, member, slots = choose(slots, tokens, buf["keep"], qa, qb, last, self.window, self.sinks, self.cache)
        num, den, c, _ = local_terms(qg, cand["k"], cand["v"], mask_bias(member[:, :, None], qg.dtype), self.scale)
        return num, den, c, slots

    def _store(self, state: dict, buf, slots, end: int) -> None:
        """Keep the sinks, the last ``w − 1`` tokens (with their running scores) and the slots."""
        length = buf["k"].shape[2]
        sink_end, run_start, run_end = window_buffer_slices(end - 1, length, self.sinks, end - self.window + 1, end)
        idx = torch.cat([torch.arange(sink_end), torch.arange(run_start, run_end)]).to(buf["k"].device)
        state["k"], state["v"], state["score"] = (buf[n][:, :, idx] for n in ("k", "v", "score"))
        state["keep"] = buf["keep"][:, idx]
        positions = torch.cat([torch.arange(sink_end), torch.arange(run_start, run_end) + (end - length)])
        state["k_pos"] = positions.to(buf["k"].device).expand(buf["k"].shape[0], -1)
        state["padded"] = not bool(state["keep"].all())
        state["cache_k"], state["cache_v"], state["cache_score"] = slots["k"], slots["v"], slots["score"]
        state["pos"] = end

    def flops_per_token(self, context_len: int) -> int:
        return super().flops_per_token(context_len) + 2 * self.num_heads * min(
            self.cache, max(0, context_len - self.window - self.sinks)) * (self.head_dim + self.value_dim)

    def state_bytes(self, context_len: int) -> int:
        """The window's state, one fp32 score per window token and kv head, and ``K`` slots (fp32 key,
        value and score per kv head)."""
        rows = min(context_len, self.window - 1 + self.sinks)
        slots = self.cache * self.num_kv_heads * (self.head_dim + self.value_dim + 1) * 4 if context_len else 0
        return super().state_bytes(context_len) + rows * self.num_kv_heads * 4 + slots
