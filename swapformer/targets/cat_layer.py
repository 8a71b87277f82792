"""The ``"layer"`` mode of the ``"cat"`` target: the seed's drop-in cat_layer (seeds 3.2), built on the
host's hidden states alone; see :mod:`swapformer.targets.cat` for the sequence layout and output map.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from swapformer.errors import ConfigError, InputError
from swapformer.sites import AttentionSite, Site
from swapformer.targets.base import TargetConfig, TargetModule
from swapformer.targets.cat_config import CatConfig, check_chunk_size
from swapformer.targets.reference import (
    projection_weight,
    repeat_kv,
    require_hidden,
    site_model_dim,
    state_pos,
)

logger = logging.getLogger(__name__)


def rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Half-split RoPE of ``x [B, T, H, D]`` at positions ``pos [T]``."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d // 2, device=x.device, dtype=torch.float32) * 2 / d)
    ang = pos.to(torch.float32)[:, None] * inv[None]  # [T, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None].to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class CatLayer(TargetModule):
    """The seed's drop-in CAT layer (seeds 3.2), reading only ``hidden``; see the module docstring."""

    # built through CatAttention.from_site (mode="layer"), so not registered itself
    target_name = "cat"
    site_kind = "attention"
    stateful = True

    def __init__(
        self,
        d_model: int,
        out_heads: int,
        out_head_dim: int,
        config: CatConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or CatConfig(mode="layer")
        self.d_model, self.out_heads, self.out_head_dim = d_model, out_heads, out_head_dim
        self.width = self.config.width_factor * d_model
        self.head_dim = self.config.head_dim or 64
        if self.width % self.head_dim:
            raise ConfigError(f"cat layer width {self.width} is not a multiple of head_dim {self.head_dim}")
        self.num_heads = self.width // self.head_dim
        self.scale = self.head_dim**-0.5
        self.chunk_size = self.config.chunk_size
        c_max = self.config.max_chunk_size or self.config.chunk_size
        n_sizes = int(math.log2(c_max)) + 1 if self.config.max_chunk_size else 1
        self.compressor = nn.Linear(c_max * d_model, self.width)
        self.expand = nn.Linear(d_model, self.width, bias=False)
        self.dummy = nn.Parameter(torch.randn(n_sizes, self.width) * 0.02)
        self.qkv = nn.Linear(self.width, 3 * self.width, bias=False)
        self.wo = nn.Linear(self.width, self.width, bias=False)
        self.final = nn.Linear(self.width, out_heads * out_head_dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim) if self.config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim) if self.config.qk_norm else None

    @classmethod
    def from_site(
        cls, site: Site, config: TargetConfig, weights: Mapping[str, torch.Tensor]
    ) -> CatLayer:
        assert isinstance(site, AttentionSite) and isinstance(config, CatConfig)
        if not config.head_dim:
            config = dataclasses.replace(config, head_dim=site.head_dim)
        layer = cls(site_model_dim(site, weights), site.num_heads, site.value_dim or site.head_dim, config)
        # in the host's dtype before copying, so the embedded host weights are not rounded
        layer = layer.to(weights[site.q_proj.weight].dtype) if site.q_proj is not None else layer
        layer.scale = site.scale
        layer.widen_from_host(site, weights)
        return layer

    def widen_from_host(self, site: AttentionSite, weights: Mapping[str, torch.Tensor]) -> None:
        """Seeds 3.6: embed the host's Wq/Wk/Wv into the first heads and route them to the output."""
        qw, kw, vw = (projection_weight(r, weights) for r in (site.q_proj, site.k_proj, site.v_proj))
        h, hd, dm = site.num_heads, self.head_dim, self.d_model
        if None in (qw, kw, vw) or site.head_dim != hd or h * hd > self.width:
            logger.info("cat layer at %s: host weights not embedded (shapes do not line up)", site.name)
            return
        groups = h // (site.num_kv_heads or h)
        kw_rep = repeat_kv(kw[0].view(-1, hd, dm), groups, dim=0).reshape(h * hd, dm)
        vw_rep = repeat_kv(vw[0].view(-1, hd, dm), groups, dim=0).reshape(h * hd, dm)
        w = self.width
        with torch.no_grad():
            self.expand.weight.zero_()
            self.expand.weight[:dm] = torch.eye(dm)
            self.qkv.weight.zero_()
            for i, part in enumerate((qw[0], kw_rep, vw_rep)):
                self.qkv.weight[i * w : i * w + h * hd, :dm] = part
            self.wo.weight.copy_(torch.eye(w))
            self.final.weight.zero_()
            self.final.weight[:, : h * hd] = torch.eye(h * hd)

    def set_chunk_size(self, chunk_size: int) -> None:
        """Chunk length used from the next call on (adaptive layers only)."""
        check_chunk_size(self.config, chunk_size, None if self.config.max_chunk_size else
                          self.config.chunk_size)
        self.chunk_size = chunk_size

    def _compressor_weight(self, chunk: int) -> torch.Tensor:
        w = self.compressor.weight
        c_max = w.shape[1] // self.d_model
        if chunk == c_max:
            return w
        # resize along the token axis only: [w, C_max, d] -> [w, C, d]
        taps = w.view(self.width, c_max, self.d_model).permute(0, 2, 1)
        taps = F.interpolate(taps, size=chunk, mode="linear", align_corners=False)
        return taps.permute(0, 2, 1).reshape(self.width, chunk * self.d_model)

    def _dummy(self, chunk: int) -> torch.Tensor:
        return self.dummy[int(math.log2(chunk)) if self.config.max_chunk_size else 0]

    def _heads(self, z: torch.Tensor, pos: torch.Tensor | None):
        """``z [B, T, w]`` -> roped/normed ``q, k, v`` as ``[B, T, nh, hd]``."""
        b, t, _ = z.shape
        q, k, v = self.qkv(z).view(b, t, 3, self.num_heads, self.head_dim).unbind(2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if pos is not None:
            q, k = rope(q, pos, self.config.rope_base), rope(k, pos, self.config.rope_base)
        return q, k, v

    def _slots(self, x_chunks: torch.Tensor, chunk: int) -> torch.Tensor:
        """``[B, N, C·d]`` chunk inputs -> s-slot inputs ``[B, N, w]`` (``f_c``)."""
        return F.linear(x_chunks, self._compressor_weight(chunk).to(x_chunks.dtype),
                        self.compressor.bias.to(x_chunks.dtype))

    def _parallel(self, x: torch.Tensor) -> torch.Tensor:
        from swapformer.kernels.cat import cat_attention

        b, t, d = x.shape
        c = self.chunk_size
        n = -(-t // c)
        xp = F.pad(x, (0, 0, 0, n * c - t))
        s_in = torch.cat([self._dummy(c).to(x.dtype).expand(b, 1, -1),
                          self._slots(xp.view(b, n, c * d), c)], 1)  # [B, N+1, w]
        qs, ks, vs = self._heads(s_in, None)
        pos = torch.arange(n * c, device=x.device) % c + 1
        qt, kt, vt = self._heads(self.expand(xp), pos)
        o_tok = cat_attention(qt, kt, vt, ks[:, 1:], vs[:, 1:], chunk_size=c,
                              scale=self.scale, sink_k=ks[0, 0], sink_v=vs[0, 0])
        o_s = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2),
                                             vs.transpose(1, 2), is_causal=True,
                                             scale=self.scale).transpose(1, 2)
        # output map: the last token of chunk c is answered by s_{c+1}
        o = o_tok.view(b, n, c, self.num_heads, self.head_dim).clone()
        o[:, :, c - 1] = o_s[:, 1:]
        return o.view(b, n * c, self.width)[:, :t]

    def _project_out(self, o: torch.Tensor) -> torch.Tensor:
        b, t, _ = o.shape
        y = self.final(self.wo(o)).view(b, t, self.out_heads, self.out_head_dim)
        return y.transpose(1, 2)

    def _init_state(self, x: torch.Tensor, state: dict) -> None:
        """State after a prefill of ``x`` from position 0 (chunks compressed, the rest raw)."""
        b, t, d = x.shape
        c = self.chunk_size
        n = t // c
        s_in = torch.cat([self._dummy(c).to(x.dtype).expand(b, 1, -1),
                          self._slots(x[:, : n * c].reshape(b, n, c * d), c)], 1)
        _, ks, vs = self._heads(s_in, None)
        rest = x[:, n * c :]
        _, kt, vt = self._heads(self.expand(rest), torch.arange(rest.shape[1], device=x.device) + 1)
        state.update(sk=ks, sv=vs, tk=kt, tv=vt, x=rest, pos=t, chunk_size=c)

    def _step(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """One token ``x [B, 1, d]`` at position ``state["pos"]`` -> attention output ``[B, 1, w]``."""
        c, p = state["chunk_size"], state["pos"]
        j = p % c
        q, k, v = self._heads(self.expand(x), torch.tensor([j + 1], device=x.device))
        tk, tv, xs = (torch.cat([state[n], new], 1) for n, new in (("tk", k), ("tv", v), ("x", x)))
        if j < c - 1:
            keys, vals = torch.cat([state["sk"], tk], 1), torch.cat([state["sv"], tv], 1)
            state.update(tk=tk, tv=tv, x=xs)
        else:
            b, d = x.shape[0], x.shape[-1]
            q, ks, vs = self._heads(self._slots(xs.reshape(b, 1, c * d), c), None)
            keys, vals = torch.cat([state["sk"], ks], 1), torch.cat([state["sv"], vs], 1)
            state.update(sk=keys, sv=vals, tk=tk[:, :0], tv=tv[:, :0], x=xs[:, :0])
        state["pos"] = p + 1
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2),
                                           vals.transpose(1, 2), scale=self.scale)
        return o.transpose(1, 2).reshape(x.shape[0], 1, self.width)

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
        hidden = require_hidden(hidden, "cat")
        x = hidden.to(self.expand.weight.dtype)
        if state is None or state_pos(state) == 0:
            o = self._parallel(x)
            if state is not None:
                self._init_state(x, state)
            return self._project_out(o).to(hidden.dtype)
        if state["chunk_size"] != self.chunk_size:
            raise InputError("the cat chunk size changed during decoding; start a new state")
        o = torch.cat([self._step(x[:, i : i + 1], state) for i in range(x.shape[1])], 1)
        return self._project_out(o).to(hidden.dtype)

    def flops_per_token(self, context_len: int) -> int:
        """Dense projections, the amortised compressor and the attention over s-slots + own chunk."""
        w, c, d = self.width, self.chunk_size, self.d_model
        dense = 2 * d * w + 2 * w * 3 * w + 2 * w * w + 2 * w * self.out_heads * self.out_head_dim
        compress = (2 * c * d * w + 2 * w * 3 * w) // c
        visible = min(context_len, context_len // c + c) + 1
        return dense + compress + 4 * w * visible

    def state_bytes(self, context_len: int) -> int:
        """s-slot and current-chunk keys/values plus the chunk's inputs, fp32."""
        c = self.chunk_size
        rows = context_len // c + 1 + min(c, context_len)
        return (rows * 2 * self.width + c * self.d_model) * 4
