"""``"window"``: sliding-window attention with attention sinks (StreamingLLM), training-free baseline.

Every host weight is reused; only the set of visible keys changes. Query ``i`` sees key ``j`` iff::

    j ≤ i  and  ( i − j < window  or  j < sinks )

(``window`` counts the query itself, as ``AttentionSite.window`` does), with the host's scale, GQA and
additive mask. With ``window ≥ T`` and ``sinks = 0`` this is the host attention exactly. A host that
already has a window keeps the smaller of the two.

Prefill and decoding run in query blocks that each attend to the sinks plus the last
``window + block`` keys (``O(T·window)``, never a ``T×T`` mask), also when the host mask is only
causal + key padding; only a mask with other content (a position bias, a host window) takes the dense
masked SDPA. A one-token decoding step once the window is full (the step ``generate()`` takes) is one
unmasked SDPA over the cache and the new token (:meth:`WindowAttention._decode_step`). On CUDA without
autograd a prefill from position 0 without padding runs one Triton kernel (:mod:`swapformer.kernels.window`)
instead of the block loop. Decoding keeps only the sink keys and the last ``window − 1`` keys (and their
positions / padding flags) in ``state``.

``cache=K`` also keeps, per kv head, the ``K`` evicted tokens that drew the most attention while in the
window, as exact keys (:mod:`swapformer.targets.window_cache`): fixed state, and on SmolLM2-135M 6 %
better held-out perplexity than the window with as many exact keys.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from swapformer.errors import ConfigError
from swapformer.kernels.window import window_attention, window_kernel_applies
from swapformer.sites import AttentionSite, Site
from swapformer.targets.base import TargetConfig, TargetModule, register_target
from swapformer.targets.reference import (
    adds_to_scores,
    attention_site_problem,
    bias_to_keep,
    evicted_first,
    full_window_step,
    key_keep_from_bias,
    masked_sdpa,
    score_terms_problem,
    sdpa_flops_per_token,
    state_keys_real,
    state_pos,
    window_buffer_slices,
    window_keep,
    window_position_step,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WindowConfig(TargetConfig):
    """Options of the ``"window"`` target.

    Args:
        window: keys visible to a query counting itself (``i - window < j <= i``).
        sinks: number of first tokens every query also sees.
        block_size: query block of the blocked attention (0 = ``window // 4`` within 64 .. 256).
            Measured on SmolLM2-135M's cores (9 heads / 3 kv heads, d 64, window 512, 1 thread, CPU
            time of a stateful prefill per layer): block 128: 38 ms at 2k, 173 ms at 8k; 256: 38 / 180;
            512: 52 ms at 2k (the host's causal SDPA: 49 / 665 ms).
        cache: evicted tokens per kv head kept as exact keys beside the window, the ones that drew the
            most attention while in it (:mod:`swapformer.targets.window_cache`); 0 = none.
    """

    name = "window"
    window: int = 512
    sinks: int = 4
    block_size: int = 0
    cache: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if self.sinks < 0:
            raise ConfigError(f"window sinks must be >= 0, got {self.sinks}")
        if self.block_size < 0:
            raise ConfigError(f"window block_size must be >= 0, got {self.block_size}")
        if self.cache < 0:
            raise ConfigError(f"window cache must be >= 0 (0 = no cache), got {self.cache}")


@register_target(WindowConfig)
class WindowAttention(TargetModule):
    """Sliding-window + sink attention core; see the module docstring."""

    site_kind = "attention"
    stateful = True

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        value_dim: int | None = None,
        scale: float | None = None,
        config: WindowConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or WindowConfig()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.value_dim = value_dim or head_dim
        self.scale = scale if scale is not None else head_dim**-0.5
        self.window, self.sinks = self.config.window, self.config.sinks
        # additive block masks by shape (see _window_bias); never saved, rebuilt on demand
        self._bias_cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def unsupported(cls, site: Site, config: TargetConfig) -> str | None:
        if getattr(config, "cache", 0):
            return score_terms_problem(site, "the window's cache") or attention_site_problem(site)
        return attention_site_problem(site)

    @classmethod
    def from_site(
        cls, site: Site, config: TargetConfig, weights: Mapping[str, torch.Tensor]
    ) -> WindowAttention:
        assert isinstance(site, AttentionSite) and isinstance(config, WindowConfig)
        if config.cache:
            from swapformer.targets.window_cache import CachedWindowAttention

            cls = CachedWindowAttention
        core = cls(site.num_heads, site.num_kv_heads or site.num_heads, site.head_dim,
                   site.value_dim or site.head_dim, site.scale, config)
        if site.window is not None:
            core.window = min(core.window, site.window)
        return core

    def _block(self) -> int:
        return self.config.block_size or min(max(64, self.window // 4), 256)

    def _blocked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                 start: int) -> torch.Tensor:
        """The queries at positions ``start ..`` over a key buffer, one query block at a time.

        ``k, v`` hold the sinks then one contiguous run of positions ending at this call's last
        token (:func:`window_buffer_slices`); ``keep`` ``[B, R]`` flags their padding (None: all
        real). Each block attends to its sinks plus the last ``window + block`` keys: ``O(T·window)``.
        """
        tq, length, blk, dev = q.shape[-2], k.shape[-2], self._block(), q.device
        if keep is None and start == 0 and length == tq and window_kernel_applies(q, k, v):
            # a prefill from position 0 on CUDA: one Triton kernel call instead of a block loop
            return window_attention(q, k, v, window=self.window, sinks=self.sinks, scale=self.scale)[0]
        last = start + tq - 1
        outs = []
        for a in range(0, tq, blk):
            qa, qb = start + a, start + min(tq, a + blk)
            lo = max(0, qa - self.window + 1)
            sink_end, run_start, run_end = window_buffer_slices(last, length, self.sinks, lo, qb)
            k_pos = torch.arange(lo, qb, device=dev)
            kb, vb = k[:, :, run_start:run_end], v[:, :, run_start:run_end]
            kept = None if keep is None else keep[:, run_start:run_end]
            if sink_end:
                k_pos = torch.cat([torch.arange(sink_end, device=dev), k_pos])
                # sinks right before the run (a decoding step): one view, no copy
                adjacent = sink_end == run_start
                kb = k[:, :, :run_end] if adjacent else torch.cat([k[:, :, :sink_end], kb], dim=2)
                vb = v[:, :, :run_end] if adjacent else torch.cat([v[:, :, :sink_end], vb], dim=2)
                if keep is not None:
                    kept = keep[:, :run_end] if adjacent else torch.cat([keep[:, :sink_end], kept], 1)
            qb_ = q[:, :, a:a + qb - qa]
            if kept is None:  # every query sees itself: no empty row, an additive mask from the cache
                bias = self._window_bias(qa, qb, lo, sink_end, q.dtype, dev)
                gqa = kb.shape[-3] != q.shape[-3]
                outs.append(F.scaled_dot_product_attention(qb_, kb, vb, attn_mask=bias, scale=self.scale,
                                                           enable_gqa=gqa))
                continue
            visible = window_keep(torch.arange(qa, qb, device=dev), k_pos, self.window, self.sinks)
            outs.append(masked_sdpa(qb_, kb, vb, visible[None, None] & kept[:, None, None], self.scale))
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    def _window_bias(self, qa: int, qb: int, lo: int, sink_end: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
        """Additive ``[Tq, Tk]`` mask of a block: keys are the sinks ``< sink_end`` then ``lo .. qb − 1``.

        It depends on the block only through ``(qb − qa, sink_end, qa − lo)`` and, near the start,
        on ``lo`` (which run keys are sinks), so the few distinct ones are built once and reused.
        """
        key = (qb - qa, sink_end, qa - lo, min(lo, self.sinks), self.window, dtype, device)
        bias = self._bias_cache.get(key)
        if bias is None:
            k_pos = torch.cat([torch.arange(sink_end, device=device), torch.arange(lo, qb, device=device)])
            keep = window_keep(torch.arange(qa, qb, device=device), k_pos, self.window, self.sinks)
            bias = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, -math.inf)
            if len(self._bias_cache) >= 64:
                self._bias_cache.clear()
            self._bias_cache[key] = bias
        return bias

    def _dense(self, q, k, v, bias):
        """Full forward with an arbitrary host mask (bottom-right aligned when keys outnumber queries)."""
        tq, tk, dev = q.shape[-2], k.shape[-2], q.device
        keep = window_keep(torch.arange(tk - tq, tk, device=dev), torch.arange(tk, device=dev),
                           self.window, self.sinks)
        if bias is None:
            return masked_sdpa(q, k, v, keep, self.scale)
        if bias.dtype == torch.bool:
            return masked_sdpa(q, k, v, bias & keep, self.scale)
        # additive host bias: keep its values, add the window's -inf
        mask = bias.to(q.dtype).masked_fill(~keep, float("-inf"))
        gqa = k.shape[-3] != q.shape[-3]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        # rows the host mask hides completely (padding queries) give NaN in SDPA: report zeros
        return torch.nan_to_num(out, nan=0.0)

    # a one-token step with a full window and no padding runs _decode_step (False: the block path,
    # which the tests take as the reference)
    fast_decode: bool = True

    def _decode_step_applies(self, q, k, bias, state: dict) -> bool:
        """One token, no mask, no gradient, a full window (``s + w − 1`` cached keys), no padding."""
        return self.fast_decode and full_window_step(q, k, bias, state, self.sinks, self.window)

    def _decode_step(self, q, k, v, state: dict) -> torch.Tensor:
        """One token at position ``i`` once the window is full: the cache and the new token are exactly
        the keys ``i`` sees (:func:`evicted_first`), so one unmasked SDPA; the cache keeps the view from
        row 1 on. Same sums as the block path (checked by the tests)."""
        keys, values = (evicted_first(state[name], new, self.sinks) for name, new in (("k", k), ("v", v)))
        out = F.scaled_dot_product_attention(q, keys, values, scale=self.scale,
                                             enable_gqa=keys.shape[-3] != q.shape[-3])
        state["k"], state["v"] = keys[:, :, 1:], values[:, :, 1:]
        state["k_pos"] = state["k_pos"] + window_position_step(state["k_pos"].device, self.sinks, self.window)
        state["pos"] = state["pos"] + 1
        return out

    def _decode(self, q, k, v, bias, state):
        """Attend over the cached sinks + window and this call's tokens, then trim the cache."""
        if self._decode_step_applies(q, k, bias, state):
            return self._decode_step(q, k, v, state)
        b, tq, dev = q.shape[0], q.shape[-2], q.device
        start = state_pos(state)
        keep_new = key_keep_from_bias(bias, b, tq)
        # known without reading the device: this call's padding, the state's flag (state_keys_real)
        padded = keep_new is not None or not state_keys_real(state)
        if keep_new is None:
            keep_new = torch.ones(b, tq, dtype=torch.bool, device=dev)
        if "k" in state:
            k = torch.cat([state["k"], k], dim=2)
            v = torch.cat([state["v"], v], dim=2)
            keep_keys = torch.cat([state["keep"], keep_new], dim=1)
        else:
            keep_keys = keep_new
        # no padding among the keys: the blocks take the cached additive masks
        out = self._blocked(q, k, v, keep_keys if padded else None, start)
        # future queries (position >= end) only see the sinks and keys after end - window
        end, length = start + tq, k.shape[-2]
        sink_end, run_start, run_end = window_buffer_slices(end - 1, length, self.sinks,
                                                            end - self.window + 1, end)
        kept = [(0, sink_end), (run_start, run_end)] if sink_end else [(run_start, run_end)]
        # copies, never views: a view of a long prefill's keys would keep all of them alive
        state["k"], state["v"] = (torch.cat([t[:, :, i:j] for i, j in kept], dim=2) for t in (k, v))
        # positions: the sinks, then the run (buffer index + end - length)
        positions = torch.arange(run_start, run_end, device=dev) + (end - length)
        if sink_end:
            positions = torch.cat([torch.arange(sink_end, device=dev), positions])
        # every state tensor is batch-first (so caches can reorder beams); positions agree across rows
        state["k_pos"] = positions.expand(b, -1)
        state["keep"] = torch.cat([keep_keys[:, i:j] for i, j in kept], dim=1)
        state["padded"] = padded  # may be stale-True once the padding has left: re-read then
        state["pos"] = end
        return out

    def _padding_only(self, bias: torch.Tensor, batch: int, t: int) -> tuple[bool, torch.Tensor | None]:
        """``(True, key keep [B, T] | None)`` when ``bias`` is causal + key padding and nothing else."""
        if bias.shape[-1] != t or bias.shape[-2] != t:
            return False, None
        keep = key_keep_from_bias(bias, batch, t)
        if adds_to_scores(bias):
            return False, None  # finite non-zero values (a position bias) must reach the scores
        visible = bias_to_keep(bias)
        pos = torch.arange(t, device=bias.device)
        expected = pos[None, :] <= pos[:, None]
        if keep is not None:
            expected = expected[None, None] & keep[:, None, None]
        return bool((visible == expected).all()), keep

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
        if state is not None:
            return self._decode(q, k, v, bias, state)
        tq, tk = q.shape[-2], k.shape[-2]
        if tq == tk:
            if bias is None:
                return self._blocked(q, k, v, None, 0)
            padding_only, keep = self._padding_only(bias, q.shape[0], tk)
            if padding_only:
                return self._blocked(q, k, v, keep, 0)
        return self._dense(q, k, v, bias)

    def new_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def flops_per_token(self, context_len: int) -> int:
        visible = min(context_len, self.window + self.sinks)
        return sdpa_flops_per_token(self.num_heads, self.head_dim, self.value_dim, visible)

    def state_bytes(self, context_len: int) -> int:
        """Cached keys/values per sequence (sinks + last window − 1 tokens, fp32), with each key's
        position (int64) and padding flag."""
        rows = min(context_len, self.window - 1 + self.sinks)
        return rows * (self.num_kv_heads * (self.head_dim + self.value_dim) * 4 + 8 + 1)
