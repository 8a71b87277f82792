"""``"cat"``: compress-and-attend attention (CAT, seeds §3) in place of softmax attention.

Query ``t`` in chunk ``c = t // C`` attends, with one softmax, to::

    sink (optional)  ∪  compressed chunks 0 .. c−1  ∪  raw tokens cC .. t of its own chunk

Two modes (``CatConfig.mode``):

* ``"retrofit"`` (default for ``from_site``): the host's post-RoPE ``q, k, v`` are used for the in-chunk
  tokens and the query; only the compressor is new. Chunk ``c`` is summarised per kv head by
  ``kc = k̄_c + k̄_c A_k + a_k``, ``vc = v̄_c + v̄_c A_v + a_v`` with ``k̄_c, v̄_c`` the mean of the chunk's
  keys/values and ``A, a`` zero at the start, so the start is exact mean pooling (the output map is the
  host's: position t is answered at t). With ``C ≥ T`` it is the host's causal attention (plus the
  sink if enabled). The compressor does not depend on C, so the chunk size can change per call
  (:meth:`CatAttention.set_chunk_size`, powers of two up to ``max_chunk_size`` in adaptive mode).
* ``"layer"``: the drop-in layer of seeds 3.2 (``cat_layer``), built on ``hidden`` alone: chunk
  summaries ``f_c = W_c vec(x_cC .. x_cC+C−1) + b_c`` (width ``w = width_factor · d_model``), token
  slots ``x W_E``, a learned dummy ``s_0``; sequence ``[s_0, chunk 0, s_1, chunk 1, …, s_K]`` with every
  s-slot at RoPE position 0 and tokens at 1..C; tokens see earlier s-slots and their own chunk causally,
  s-slots see s-slots only; multi-head attention of width ``w`` (head dim 64, optional q/k RMSNorm,
  fused ``W_qkv``, ``W_o``); output map: the last token of chunk c is answered by ``s_{c+1}``; then
  ``final_proj`` to the host's ``H·Dv`` (the caller applies the host ``o_proj``). Adaptive: one dummy
  per chunk size, ``W_c`` learned at ``C_max`` and resized linearly along the token axis for smaller C
  (the seed resizes the flattened weight bilinearly). ``from_site`` widens the host function-preservingly
  where it can (seeds 3.6): ``W_E = [I | 0]``, host Wq/Wk/Wv into the first H heads (kv heads repeated,
  biases dropped), ``W_o``/``final_proj`` select them; then the first chunk reproduces the host when
  the host uses half-split RoPE with ``rope_base`` (minus the dummy sink).

Hybrid form (the default for ``"retrofit"``, ``local_window > 0``; issue 12): :class:`HybridCat`, an
exact window of ``local_window`` keys plus ``sinks``, and the evicted tokens compressed in chunks of
``C`` (the retrofit compressor, per kv head; chunks aligned at the first non-sink token) in one
normaliser (:mod:`swapformer.targets.hybrid`)::

    m_i = Σ_{chunks n ⊆ F_i} e^{scale q_i·kc_n − c_i} vc_n,   n_i = Σ_{chunks n ⊆ F_i} e^{scale q_i·kc_n − c_i}
    y_i = (Σ_{N_i} e^{scale q_i·k_j − c_i} v_j + g_h m_i) / (Σ_{N_i} e^{…} + g_h n_i)

A chunk is read once all its tokens are evicted: up to ``C − 1`` evicted tokens wait (raw, in the
state) for their chunk to fill and are seen by no query meanwhile. ``local_window=0`` keeps the
window-free retrofit above; ``"layer"`` mode has no hybrid.

The config lives in :mod:`~swapformer.targets.cat_config`, the ``"layer"`` mode in
:mod:`~swapformer.targets.cat_layer`; this module holds the retrofit core, its chunk compressor and
the hybrid, and registers the target.

Decoding state — retrofit: compressed chunks, the current chunk's raw keys/values, ``pos``; layer:
s-slot keys/values, the current chunk's token keys/values and inputs, ``pos``. Padding: retrofit
skips padded keys (masked mean, masked attention); the layer ignores masks (right padding is exact).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from swapformer.errors import ConfigError, InputError
from swapformer.sites import AttentionSite, Site
from swapformer.targets.base import TargetConfig, TargetModule, register_target
from swapformer.targets.cat_config import CatConfig, check_chunk_size
from swapformer.targets.cat_layer import CatLayer, rope
from swapformer.targets.hybrid import STATE_ELEMENT_BYTES, HybridAttention, hybrid_site_problem, own
from swapformer.targets.reference import (
    attention_site_problem,
    check_full_call,
    from_kernel_layout,
    key_keep_from_bias,
    masked_sdpa,
    sdpa_with_lse,
    state_pos,
    to_kernel_layout,
)


def _chunk_means(x: torch.Tensor, chunk: int, keep: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Per-chunk mean of ``x [B, T, Hkv, D]`` over real tokens -> ``([B, N, Hkv, D], has_real [B, N])``."""
    b, t = x.shape[:2]
    n = -(-t // chunk)
    w = x.new_ones(b, t) if keep is None else keep.to(x.dtype)
    pad = n * chunk - t
    xs = F.pad(x * w[..., None, None], (0, 0, 0, 0, 0, pad)).view(b, n, chunk, *x.shape[2:])
    counts = F.pad(w, (0, pad)).view(b, n, chunk).sum(-1)
    means = xs.sum(2) / counts.clamp_min(1)[..., None, None]
    return means, counts > 0


class ChunkCompressor(nn.Module):
    """Mean pooling + learned linear correction per kv head (shared by the retrofit and the hybrid)."""

    config: CatConfig

    def _init_compressor(self, hkv: int, d: int) -> None:
        if self.config.correction:
            self.k_corr = nn.Parameter(torch.zeros(hkv, d, d))
            self.v_corr = nn.Parameter(torch.zeros(hkv, d, d))
            self.k_corr_bias = nn.Parameter(torch.zeros(hkv, d))
            self.v_corr_bias = nn.Parameter(torch.zeros(hkv, d))

    def compress(self, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, chunk: int):
        """``(kc, vc, real)``: one summary per chunk of ``k, v [B, T, Hkv, D]`` (kernel layout)."""
        kc, real = _chunk_means(k, chunk, keep)
        vc, _ = _chunk_means(v, chunk, keep)
        if self.config.correction:
            kc = kc + torch.einsum("bnhd,hde->bnhe", kc, self.k_corr.to(kc.dtype)) + self.k_corr_bias
            vc = vc + torch.einsum("bnhd,hde->bnhe", vc, self.v_corr.to(vc.dtype)) + self.v_corr_bias
        return kc.to(k.dtype), vc.to(v.dtype), real


@register_target(CatConfig)
class CatAttention(TargetModule, ChunkCompressor):
    """Retrofit CAT core (host q/k/v + mean-pooling compressor); ``from_site`` also builds the layer."""

    site_kind = "attention"
    stateful = True

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
        config: CatConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or CatConfig(local_window=0)
        if self.config.local_window:
            raise ConfigError("CatAttention is the window-free retrofit: pass local_window=0, or build "
                              "the hybrid with HybridCat / from_site")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale if scale is not None else head_dim**-0.5
        self.chunk_size = self.config.chunk_size
        hkv, d = num_kv_heads, head_dim
        self._init_compressor(hkv, d)
        self.sink_k = nn.Parameter(torch.zeros(hkv, d)) if self.config.sink else None
        self.sink_v = nn.Parameter(torch.zeros(hkv, d)) if self.config.sink else None

    @classmethod
    def unsupported(cls, site: Site, config: TargetConfig) -> str | None:
        reason = hybrid_site_problem(site, config) or attention_site_problem(
            site, needs_width=getattr(config, "mode", "") == "layer")
        if reason is None and site.value_dim not in (0, site.head_dim):
            return "value head width differs from the key head width"
        return reason

    @classmethod
    def from_site(
        cls, site: Site, config: TargetConfig, weights: Mapping[str, torch.Tensor]
    ) -> TargetModule:
        assert isinstance(site, AttentionSite) and isinstance(config, CatConfig)
        if config.mode == "layer":
            return CatLayer.from_site(site, config, weights)
        if config.local_window:
            return HybridCat(site.num_heads, site.num_kv_heads or site.num_heads, site.head_dim,
                             site.scale, config)
        return cls(site.num_heads, site.num_kv_heads or site.num_heads, site.head_dim, site.scale,
                   config)

    def set_chunk_size(self, chunk_size: int) -> None:
        """Chunk length used from the next call on (adaptive mode: a power of two <= max)."""
        check_chunk_size(self.config, chunk_size, None)
        self.chunk_size = chunk_size

    def _sink(self, dtype: torch.dtype):
        if self.sink_k is None:
            return None, None
        return self.sink_k.to(dtype), self.sink_v.to(dtype)

    def _dense(self, q, k, v, kc, vc, real, keep, chunk: int, start: int = 0):
        """Masked SDPA over ``[sink | kc | k]`` (kernel layout in/out); keys start at ``start``."""
        b, tq, tk, n, dev = q.shape[0], q.shape[1], k.shape[1], kc.shape[1], q.device
        qpos = torch.arange(tk - tq, tk, device=dev) + start
        kpos = torch.arange(tk, device=dev) + start
        tok = (kpos[None] <= qpos[:, None]) & (kpos[None] // chunk == qpos[:, None] // chunk)
        comp = torch.arange(n, device=dev)[None] < (qpos[:, None] // chunk)
        mask = torch.cat([comp, tok], 1)[None].expand(b, -1, -1)
        mask = mask & torch.cat([real, keep if keep is not None else real.new_ones(b, tk)], 1)[:, None]
        keys, vals = torch.cat([kc, k], 1), torch.cat([vc, v], 1)
        sink_k, sink_v = self._sink(q.dtype)
        if sink_k is not None:
            keys = torch.cat([sink_k.expand(b, 1, -1, -1), keys], 1)
            vals = torch.cat([sink_v.expand(b, 1, -1, -1), vals], 1)
            mask = torch.cat([mask.new_ones(b, tq, 1), mask], 2)
        out = masked_sdpa(q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2),
                          mask[:, None], self.scale)
        return out.transpose(1, 2)

    def _full(self, q, k, v, keep):
        from swapformer.kernels.cat import cat_attention

        kc, vc, real = self.compress(k, v, keep, self.chunk_size)
        if keep is not None:
            return self._dense(q, k, v, kc, vc, real, keep, self.chunk_size)
        sink_k, sink_v = self._sink(q.dtype)
        return cat_attention(q, k, v, kc, vc, chunk_size=self.chunk_size, scale=self.scale,
                             sink_k=sink_k, sink_v=sink_v)

    def _fill_state(self, k, v, keep, state):
        """State after a prefill from position 0: finished chunks compressed, the rest raw."""
        c = self.chunk_size
        done = (k.shape[1] // c) * c
        kc, vc, real = self.compress(k[:, :done], v[:, :done], None if keep is None else keep[:, :done], c)
        state.update(kc=kc, vc=vc, real=real, ck=k[:, done:], cv=v[:, done:],
                     ckeep=(keep[:, done:] if keep is not None
                            else k.new_ones(k.shape[0], k.shape[1] - done, dtype=torch.bool)),
                     pos=k.shape[1], chunk_size=c)

    def _decode_segment(self, q, k, v, keep, state):
        """Tokens that all fall in the current chunk: attend, append, compress when it fills."""
        c, start = state["chunk_size"], state["pos"]
        ck, cv = torch.cat([state["ck"], k], 1), torch.cat([state["cv"], v], 1)
        ckeep = torch.cat([state["ckeep"], keep], 1)
        chunk_start = start - state["ck"].shape[1]
        out = self._dense(q, ck, cv, state["kc"], state["vc"], state["real"], ckeep, c, chunk_start)
        state.update(ck=ck, cv=cv, ckeep=ckeep, pos=start + q.shape[1])
        if state["pos"] % c == 0:
            kc, vc, real = self.compress(ck, cv, ckeep, c)
            state.update(kc=torch.cat([state["kc"], kc], 1), vc=torch.cat([state["vc"], vc], 1),
                         real=torch.cat([state["real"], real], 1), ck=ck[:, :0], cv=cv[:, :0],
                         ckeep=ckeep[:, :0])
        return out

    def _decode(self, q, k, v, keep, state):
        if state.get("chunk_size", self.chunk_size) != self.chunk_size:
            raise InputError("the cat chunk size changed during decoding; start a new state")
        if keep is None:
            keep = torch.ones(q.shape[0], q.shape[1], dtype=torch.bool, device=q.device)
        if state_pos(state) == 0:
            out = self._full(q, k, v, None if bool(keep.all()) else keep)
            self._fill_state(k, v, keep, state)
            return out
        outs, i = [], 0
        while i < q.shape[1]:
            n = min(q.shape[1] - i, state["chunk_size"] - state["pos"] % state["chunk_size"])
            outs.append(self._decode_segment(q[:, i:i + n], k[:, i:i + n], v[:, i:i + n],
                                             keep[:, i:i + n], state))
            i += n
        return torch.cat(outs, 1)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        hidden: torch.Tensor | None = None,
        state: dict | None = None,
    ) -> torch.Tensor:
        groups_ok = self.num_heads % k.shape[1] == 0
        if not groups_ok:
            raise InputError(f"{self.num_heads} query heads do not split over {k.shape[1]} kv heads")
        keep = key_keep_from_bias(bias, q.shape[0], k.shape[-2])
        qk, kk, vk = to_kernel_layout(q), to_kernel_layout(k), to_kernel_layout(v)
        if state is None:
            check_full_call(q, k, self.target_name)
            return from_kernel_layout(self._full(qk, kk, vk, keep))
        return from_kernel_layout(self._decode(qk, kk, vk, keep, state))

    def flops_per_token(self, context_len: int) -> int:
        """Attention over the visible compressed chunks + own chunk, plus the amortised compressor."""
        c, h, d, hkv = self.chunk_size, self.num_heads, self.head_dim, self.num_kv_heads
        visible = min(context_len, context_len // c + c) + (self.sink_k is not None)
        compress = 2 * hkv * d + (4 * hkv * d * d // c if self.config.correction else 0)
        return 4 * h * d * visible + compress

    def state_bytes(self, context_len: int) -> int:
        """Compressed chunks + the current chunk's raw keys/values (fp32), one padding flag each."""
        rows = context_len // self.chunk_size + context_len % self.chunk_size
        return rows * (2 * self.num_kv_heads * self.head_dim * 4 + 1)



class HybridCat(HybridAttention, ChunkCompressor):
    """Exact window + sinks + compressed chunks of the evicted tokens; see the module docstring."""

    # built through CatAttention.from_site (local_window > 0), so not registered itself
    target_name = "cat"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 config: CatConfig | None = None) -> None:
        config = config or CatConfig()
        if not config.local_window or config.mode != "retrofit":
            raise ConfigError("HybridCat needs mode='retrofit' and local_window > 0")
        super().__init__(num_heads, num_kv_heads, head_dim, head_dim, scale, config.local_window,
                         config.sinks, config.block_size, config.mix_init)
        self.config = config
        self.chunk_size = config.chunk_size
        self._init_compressor(num_kv_heads, head_dim)

    def query_features(self, q, hidden, pos) -> torch.Tensor:
        return q

    def memory_init(self, batch: int, ref: torch.Tensor) -> dict[str, torch.Tensor]:
        hkv, d = self.num_kv_heads, self.head_dim
        empty = ref.new_zeros(batch, hkv, 0, d)
        flags = torch.zeros(batch, 0, dtype=torch.bool, device=ref.device)
        return {"kc": empty, "vc": empty, "real": flags, "pk": empty, "pv": empty, "pkeep": flags}

    def _chunks(self, mem, items, avail, item_keep):
        """Pending + newly evicted tokens -> ``(kc, vc, real, chunk avail, pending memory)``."""
        c, p = self.chunk_size, mem["pk"].shape[2]
        k = torch.cat([mem["pk"], items["k"]], 2)
        v = torch.cat([mem["pv"], items["v"]], 2)
        keep = torch.cat([mem["pkeep"], item_keep], 1)
        done = (k.shape[2] // c) * c
        kc, vc, real = self.compress(k[:, :, :done].transpose(1, 2), v[:, :, :done].transpose(1, 2),
                                     keep[:, :done], c)
        # a chunk is read from its last token's eviction on (that token is always a new item)
        last = torch.arange(done // c, device=k.device) * c + (c - 1 - p)
        rest = {"pk": k[:, :, done:], "pv": v[:, :, done:], "pkeep": keep[:, done:]}
        return kc.transpose(1, 2), vc.transpose(1, 2), real, avail[last], rest

    def _read(self, q, kc, vc, visible, c):
        b, h, tq, d = q.shape
        qg = q.reshape(b, self.num_kv_heads, -1, tq, d)
        s = torch.einsum("bkgtd,bknd->bkgtn", qg, kc) * self.scale - c.reshape(qg.shape[:-1] + (1,))
        e = torch.exp(s.masked_fill(~visible, -math.inf))
        m = torch.einsum("bkgtn,bknd->bkgtd", e, vc)
        return m.reshape(b, h, tq, d), e.sum(-1).reshape(b, h, tq, 1)

    def far_block(self, mem, qf, items, avail, item_keep, q_pos, c):
        m, n = self._read(qf, mem["kc"], mem["vc"], mem["real"][:, None, None, None], c)
        if avail.numel():
            kc, vc, real, chunk_avail, rest = self._chunks(mem, items, avail, item_keep)
            vis = real[:, None, None, None] & (chunk_avail[None, :] <= q_pos[:, None])
            m2, n2 = self._read(qf, kc, vc, vis, c)
            m, n = m + m2, n + n2
            mem = {"kc": torch.cat([mem["kc"], kc], 2), "vc": torch.cat([mem["vc"], vc], 2),
                   "real": torch.cat([mem["real"], real], 1), **rest}
        return m, n, mem

    def far_step(self, state, qf, item, pos, c):
        """Attention over every chunk of the memory (none is masked but padding-only ones), then the
        evicted token joins the pending ones; a chunk that fills is compressed (:meth:`_chunks`)."""
        b, h, _, d = qf.shape
        kc, vc, real = state["kc"], state["vc"], state["real"]
        qg = qf.view(b, self.num_kv_heads, -1, d)
        if kc.shape[2]:
            s = torch.matmul(qg, kc.transpose(-1, -2)).mul_(self.scale).sub_(c.view(qg.shape[:-1] + (1,)))
            e = s.masked_fill_(~real[:, None, None], -math.inf).exp_()
            m, n = torch.matmul(e, vc), e.sum(-1, keepdim=True)
        else:
            m, n = qf.new_zeros(b, h, 1, d), qf.new_zeros(b, h, 1, 1)
        keep = torch.ones(b, 1, dtype=torch.bool, device=qf.device)
        if state["pk"].shape[2] + 1 < self.chunk_size:  # the chunk is not full yet
            mem = {"pk": torch.cat([state["pk"], item["k"]], 2), "pv": torch.cat([state["pv"], item["v"]], 2),
                   "pkeep": torch.cat([state["pkeep"], keep], 1)}
        else:
            pending = {n: state[n] for n in ("pk", "pv", "pkeep")}
            avail = torch.tensor([pos + 1], device=qf.device)
            kc2, vc2, real2, _, mem = self._chunks(pending, item, avail, keep)
            mem.update(kc=torch.cat([kc, kc2], 2), vc=torch.cat([vc, vc2], 2),
                       real=torch.cat([real, real2], 1))
        return m.reshape(b, h, 1, d), n.reshape(b, h, 1, 1), mem

    far_reads_row_max = True

    def far_tiles_supported(self) -> bool:
        return True

    def far_tiles_context(self, qf, buf, length, padded_len) -> dict:
        """Every chunk that fills within the call, compressed at once (a chunk's summary does not
        depend on when it is made), the first position that reads each, and the memory after the call."""
        w, s, c = self.window, self.sinks, self.chunk_size
        evicted = max(0, length - w + 1 - s)  # tokens s .. length − w are in the memory after the call
        done = evicted // c * c
        k, v = buf["k"][:, :, s:s + done], buf["v"][:, :, s:s + done]
        kc, vc, real = self.compress(k.transpose(1, 2), v.transpose(1, 2), None, c)
        kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)
        keep = torch.ones(k.shape[0], evicted - done, dtype=torch.bool, device=k.device)
        after = {"kc": kc, "vc": vc, "real": real, "pk": own(buf["k"][:, :, s + done:s + evicted]),
                 "pv": own(buf["v"][:, :, s + done:s + evicted]), "pkeep": keep}
        # chunk n is read from its last token's eviction on: position s + (n + 1)·C − 1 + w
        return {"kc": kc * self.scale, "vc": torch.cat([vc, torch.ones_like(vc[..., :1])], dim=-1),
                "v": vc, "first": s + c - 1 + w, "after": after, "padded_len": padded_len}

    def far_tiles(self, ctx, qt, qf, mem, a, e, c):
        """Attention over the chunks readable by the segment's last query, masked per query.

        Between segments the memory is passed on untouched (the chunks are all in ``ctx``); the last
        segment returns the memory after the call.
        """
        b, hk, nb, g, blk, d = qt.shape
        kc, vc, first, cs = ctx["kc"], ctx["vc"], ctx["first"], self.chunk_size
        if e == ctx["padded_len"]:
            mem = ctx["after"]
        end = min(kc.shape[2], max(0, (e - 1 - first) // cs + 1))  # chunks readable by query e − 1
        if end == 0:
            zero = qt.new_zeros(b, hk, nb, g, blk, 1)
            return zero.expand(-1, -1, -1, -1, -1, d), zero, mem
        if qt.device.type == "cpu" and not torch.is_grad_enabled():
            return (*self._fused_far_read(ctx, qt, a, e, end, c), mem)
        scores = torch.matmul(qt.view(b, hk, nb * g * blk, d), kc[:, :, :end].transpose(-1, -2))
        i = torch.arange(a, e, device=qt.device).view(nb, 1, blk, 1)
        seen = torch.arange(end, device=qt.device) * cs + first <= i  # [blocks, 1, block, chunks]
        scores = scores.view(b, hk, nb, g, blk, end)
        if torch.is_grad_enabled():
            weights = torch.exp((scores - c).masked_fill(~seen, -math.inf))
        else:
            weights = scores.sub_(c).masked_fill_(~seen, -math.inf).exp_()
        read = torch.matmul(weights.view(b, hk, nb * g * blk, end), vc[:, :, :end])
        read = read.view(b, hk, nb, g, blk, d + 1)
        return read[..., :d], read[..., d:], mem

    def _fused_far_read(self, ctx, qt, a: int, e: int, end: int, c) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`far_tiles`' sums from the fused CPU kernel (:func:`sdpa_with_lse`): with the row
        log-sum-exp ``l`` over the chunks and the attention ``o``, ``n = e^{l − c}`` and ``m = o·n``.

        The chunks every query of the segment reads (all before ``full``) go in one unmasked call;
        the few the segment's queries start reading within it (at most ``segment / C + 1``) in a
        second, masked one. A query that reads none of the second group gets zero from it.
        """
        b, hk, nb, g, blk, d = qt.shape
        kc, vc, first, cs = ctx["kc"], ctx["v"], ctx["first"], self.chunk_size
        rows, shape = qt.view(b, hk, nb * g * blk, d), (b, hk, nb, g, blk, 1)
        full = min(end, max(0, (a - first) // cs + 1))  # chunks readable by query a
        m = n = None
        if full:
            o, lse = sdpa_with_lse(rows, kc[:, :, :full], vc[:, :, :full])
            n = (lse.view(shape) - c).exp_()
            m = o.view(qt.shape).mul_(n)
        if end > full:
            i = torch.arange(a, e, device=qt.device).view(nb, 1, blk, 1)
            seen = torch.arange(full, end, device=qt.device) * cs + first <= i  # [blocks, 1, block, chunks]
            bias = torch.zeros(seen.shape, dtype=qt.dtype, device=qt.device).masked_fill_(~seen, -math.inf)
            bias = bias.expand(nb, g, blk, end - full).reshape(nb * g * blk, end - full)
            o, lse = sdpa_with_lse(rows, kc[:, :, full:end], vc[:, :, full:end], bias)
            reads = seen.any(-1, keepdim=True)
            n2 = torch.where(reads, (lse.view(shape) - c).exp_(), 0.0)
            m2 = torch.where(reads, o.view(qt.shape) * n2, 0.0)
            m, n = (m2, n2) if m is None else (m.add_(m2), n.add_(n2))
        return m, n

    def memory_bytes(self, context_len: int) -> int:
        evicted = self.evicted(context_len)
        rows = evicted // self.chunk_size + evicted % self.chunk_size
        return rows * (2 * self.num_kv_heads * self.head_dim * STATE_ELEMENT_BYTES + 1)

    def flops_per_token(self, context_len: int) -> int:
        """Exact window attention, attention over the compressed chunks, the amortised compressor."""
        chunks = self.evicted(context_len) // self.chunk_size
        h, hkv, d, c = self.num_heads, self.num_kv_heads, self.head_dim, self.chunk_size
        compress = 2 * hkv * d + (4 * hkv * d * d // c if self.config.correction else 0)
        return self.window_flops_per_token(context_len) + 4 * h * d * chunks + compress


_rope = rope  # the layer's RoPE, under the name the tests use
__all__ = ["CatAttention", "CatConfig", "CatLayer", "ChunkCompressor", "HybridCat"]
