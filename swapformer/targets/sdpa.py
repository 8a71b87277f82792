"""``"sdpa"``: the exact target.

Re-expresses a detected attention core as one ``F.scaled_dot_product_attention`` call built only from
the site's description::

    out = softmax(scale · q kᵀ + bias) v        (bias = host mask; causal / window from the site)

with GQA through ``enable_gqa``. Nothing is learned, so a rewrite to ``"sdpa"`` must reproduce the host
to float tolerance: any difference is a detection bug. That makes it the oracle for the detectors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from swapformer.sites import AttentionSite, Site
from swapformer.targets.base import TargetConfig, TargetModule, register_target
from swapformer.targets.reference import ACTIVATIONS, causal_window_keep


@dataclasses.dataclass(frozen=True, kw_only=True)
class SdpaConfig(TargetConfig):
    """Options of the exact ``"sdpa"`` target (none besides the version)."""

    name = "sdpa"
    exact = True


@register_target(SdpaConfig)
class SdpaAttention(TargetModule):
    site_kind = "attention"

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        scale: float,
        causal: bool = False,
        window: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.causal = causal
        self.window = window
        self.dropout = dropout

    @classmethod
    def unsupported(cls, site: Site, config: TargetConfig) -> str | None:
        assert isinstance(site, AttentionSite)
        if site.softcap is not None:
            return "logit soft-capping (tanh on the scores) has no SDPA form"
        return None

    @classmethod
    def from_site(
        cls, site: Site, config: TargetConfig, weights: Mapping[str, torch.Tensor]
    ) -> SdpaAttention:
        assert isinstance(site, AttentionSite)
        return cls(site.num_heads, site.num_kv_heads, site.scale, site.causal, site.window, site.dropout)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        gqa = q.dim() == 4 and k.shape[-3] != q.shape[-3]
        causal = self.causal and bias is None
        if causal and (self.window is not None or q.shape[-2] != k.shape[-2]):
            # SDPA's is_causal is top-left aligned and windowless: spell the mask out instead.
            bias = causal_window_keep(q.shape[-2], k.shape[-2], self.window, q.device)
            causal = False
        if bias is not None and bias.dtype not in (torch.bool, q.dtype):
            bias = bias.to(q.dtype)
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=p, is_causal=causal, scale=self.scale, enable_gqa=gqa
        )

    def new_parameters(self) -> list[torch.nn.Parameter]:
        return []


@register_target(SdpaConfig)
class ExactFFN(TargetModule):
    """The FFN rebuilt from its detected description: ``down(act(gate(x)) * up(x))`` or
    ``down(act(up(x)))``. Under ``"sdpa"`` it is the exactness oracle for FFN detection, and
    calibration uses it as the host reference of an FFN site."""

    site_kind = "ffn"

    def __init__(self, up: torch.nn.Linear, down: torch.nn.Linear, activation: str,
                 gate: torch.nn.Linear | None = None) -> None:
        super().__init__()
        self.up, self.down, self.gate = up, down, gate
        self.activation = activation
        self.act = ACTIVATIONS[activation]

    @classmethod
    def unsupported(cls, site: Site, config: TargetConfig) -> str | None:
        if site.activation not in ACTIVATIONS:
            return f"activation {site.activation!r} has no exact form"
        if site.up_proj is None or site.down_proj is None:
            return "projection weights are not parameters of the model"
        return None

    @classmethod
    def from_site(cls, site: Site, config: TargetConfig, weights: Mapping[str, torch.Tensor]) -> ExactFFN:
        from swapformer.targets.base import copy_projection

        return cls(copy_projection(site.up_proj, weights), copy_projection(site.down_proj, weights),
                   site.activation, copy_projection(site.gate_proj, weights))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.down(self.act(self.up(x)))
        return self.down(self.act(self.gate(x)) * self.up(x))

    def new_parameters(self) -> list[torch.nn.Parameter]:
        return []
