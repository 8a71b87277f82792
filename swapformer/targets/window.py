"""``"window"``: sliding-window attention with attention sinks (StreamingLLM), training-free baseline.

Every host weight is reused; only the set of visible keys changes. Query ``i`` sees key ``j`` iff::

    j ≤ i  and  ( i − j < window  or  j < sinks )

(``window`` counts the query itself, as ``AttentionSite.window`` does), with the host's scale, GQA and
additive mask. With ``window ≥ T`` and ``sinks = 0`` this is the host attention exactly. A host that
already has a window keeps the smaller of the two.

Prefill without a mask runs in query blocks that each attend to the sinks plus the last
``window + block`` keys (``O(T·window)``); with a mask the dense masked SDPA is used. Decoding keeps
only the sink keys and the last ``window − 1`` keys (and their positions / padding flags) in ``state``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from swapformer.errors import ConfigError
from swapformer.sites import AttentionSite, Site
from swapformer.targets.base import TargetConfig, TargetModule, register_target
from swapformer.targets.reference import (
    attention_site_problem,
    key_keep_from_bias,
    masked_sdpa,
    sdpa_flops_per_token,
    state_pos,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WindowConfig(TargetConfig):
    """Options of the ``"window"`` target.

    Args:
        window: keys visible to a query counting itself (``i - window < j <= i``).
        sinks: number of first tokens every query also sees.
        block_size: query block of the windowed prefill (0 = ``max(64, window)`` capped at 1024).
    """

    name = "window"
    window: int = 512
    sinks: int = 4
    block_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if self.sinks < 0:
            raise ConfigError(f"window sinks must be >= 0, got {self.sinks}")
        if self.block_size < 0:
            raise ConfigError(f"window block_size must be >= 0, got {self.block_size}")


def window_keep(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, sinks: int
) -> torch.Tensor:
    """``[Tq, Tk]`` bool from absolute query/key positions: causal ∧ (in window ∨ sink)."""
    i, j = q_pos[:, None], k_pos[None, :]
    return (j <= i) & ((i - j < window) | (j < sinks))


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

    @classmethod
    def unsupported(cls, site: Site, config: TargetConfig) -> str | None:
        return attention_site_problem(site)

    @classmethod
    def from_site(
        cls, site: Site, config: TargetConfig, weights: Mapping[str, torch.Tensor]
    ) -> WindowAttention:
        assert isinstance(site, AttentionSite) and isinstance(config, WindowConfig)
        core = cls(site.num_heads, site.num_kv_heads or site.num_heads, site.head_dim,
                   site.value_dim or site.head_dim, site.scale, config)
        if site.window is not None:
            core.window = min(core.window, site.window)
        return core

    def _block(self) -> int:
        return self.config.block_size or min(max(64, self.window), 1024)

    def _blocked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Full causal forward, one query block at a time over its sinks + window of keys."""
        t, blk, dev = q.shape[-2], self._block(), q.device
        outs = []
        for s in range(0, t, blk):
            e = min(t, s + blk)
            lo = max(0, s - self.window + 1)
            k_pos = torch.cat([torch.arange(min(self.sinks, lo), device=dev),
                               torch.arange(lo, e, device=dev)])
            keep = window_keep(torch.arange(s, e, device=dev), k_pos, self.window, self.sinks)
            outs.append(masked_sdpa(q[:, :, s:e], k[:, :, k_pos], v[:, :, k_pos], keep, self.scale))
        return torch.cat(outs, dim=2)

    def _dense(self, q, k, v, bias):
        """Full forward with the host mask (bottom-right aligned when keys outnumber queries)."""
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

    def _decode(self, q, k, v, bias, state):
        """Attend over the cached sinks + window and this call's tokens, then trim the cache."""
        b, tq, dev = q.shape[0], q.shape[-2], q.device
        start = state_pos(state)
        q_pos = torch.arange(start, start + tq, device=dev)
        keep_new = key_keep_from_bias(bias, b, tq)
        if keep_new is None:
            keep_new = torch.ones(b, tq, dtype=torch.bool, device=dev)
        if "k" in state:
            k = torch.cat([state["k"], k], dim=2)
            v = torch.cat([state["v"], v], dim=2)
            k_pos = torch.cat([state["k_pos"][0], q_pos])
            keep_keys = torch.cat([state["keep"], keep_new], dim=1)
        else:
            k_pos, keep_keys = q_pos, keep_new
        keep = window_keep(q_pos, k_pos, self.window, self.sinks)[None, None] & keep_keys[:, None, None]
        out = masked_sdpa(q, k, v, keep, self.scale)
        # future queries (position > last) only ever see sinks and keys after last + 1 - window
        last = start + tq - 1
        stay = (k_pos < self.sinks) | (k_pos > last + 1 - self.window)
        state["k"], state["v"] = k[:, :, stay], v[:, :, stay]
        # every state tensor is batch-first (so caches can reorder beams); positions agree across rows
        state["k_pos"] = k_pos[stay].expand(b, -1)
        state["keep"], state["pos"] = keep_keys[:, stay], last + 1
        return out

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
        if bias is None and tq == tk and tk > self.window + self._block():
            return self._blocked(q, k, v)
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
