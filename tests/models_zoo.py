"""A zoo of tiny hand-written modules: every attention and FFN spelling the detector must find.

Each :class:`ZooCase` pairs a model factory and example inputs with the site fields detection must
report. The fields come from the same :class:`AttnSpec` / :class:`FFNSpec` the module is built from,
so no number is written twice. :func:`check_against_reference` recomputes every zoo attention from
its spec with one ``F.scaled_dot_product_attention`` call (and every FFN with plain ``F.linear``),
which checks the specs themselves without swapformer.
"""

from __future__ import annotations

import inspect
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

D_MODEL = 32
N_HEADS = 4
BATCH = 2
SEQ = 16
MAX_LEN = 64
VOCAB = 100

Proj = tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class AttnSpec:
    """Construction parameters of one zoo attention, read by the module and by its expectations."""

    d_model: int = D_MODEL
    n_heads: int = N_HEADS
    n_kv_heads: int | None = None
    scale: float | None = None  # None: head_dim ** -0.5
    causal: bool = False
    window: int | None = None
    mask: str | None = None  # None: "causal" when causal else "none"
    cross: bool = False
    rope: bool = False
    qk_norm: bool = False
    dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.kv_heads

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5 if self.scale is None else self.scale

    @property
    def mask_kind(self) -> str:
        return self.mask or ("causal" if self.causal else "none")

    def expected(self) -> dict[str, Any]:
        return {
            "num_heads": self.n_heads,
            "num_kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "value_dim": self.head_dim,
            "scale": self.softmax_scale,
            "causal": self.causal,
            "window": self.window,
            "mask": self.mask_kind,
            "cross": self.cross,
            "rope": self.rope,
            "qk_norm": self.qk_norm,
            "dropout": self.dropout,
        }


@dataclass(frozen=True)
class FFNSpec:
    """Construction parameters of one zoo FFN."""

    activation: str = "gelu"
    gated: bool = False
    hidden: int = 4 * D_MODEL
    d_model: int = D_MODEL
    bias: bool = True

    def expected(self) -> dict[str, Any]:
        return {
            "activation": self.activation,
            "gated": self.gated,
            "hidden_size": self.hidden,
            "model_dim": self.d_model,
        }


@dataclass(frozen=True)
class ZooCase:
    """One zoo entry: ``make_model()`` (eval mode) and ``make_inputs()`` (tensor, tuple or dict)."""

    name: str
    make_model: Callable[[], nn.Module]
    make_inputs: Callable[[], Any]
    expected_attention: list[dict[str, Any]]
    expected_ffn: list[dict[str, Any]]
    form: str = ""

    @property
    def negative(self) -> bool:
        return not self.expected_attention and not self.expected_ffn


# shared pieces


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary(nn.Module):
    """Half-split RoPE on ``[B, H, T, D]`` with cos/sin tables held as buffers."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
        freqs = torch.outer(torch.arange(MAX_LEN).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[-2]
        return x * self.cos[:t] + rotate_half(x) * self.sin[:t]


def repeat_kv(hidden: torch.Tensor, n_rep: int) -> torch.Tensor:
    """HF-style GQA repeat: ``[B, Hkv, T, D] -> [B, Hkv * n_rep, T, D]``."""
    if n_rep == 1:
        return hidden
    b, h, t, d = hidden.shape
    return hidden[:, :, None, :, :].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / n_heads) for i in range(n_heads)])


def _lin(layer: nn.Linear) -> Proj:
    return layer.weight, layer.bias


def _rows(layer: nn.Linear, start: int, stop: int) -> Proj:
    bias = None if layer.bias is None else layer.bias[start:stop]
    return layer.weight[start:stop], bias


def _fused_qkv(layer: nn.Linear, spec: AttnSpec) -> dict[str, Proj]:
    q = spec.n_heads * spec.head_dim
    kv = spec.kv_heads * spec.head_dim
    return {
        "q": _rows(layer, 0, q),
        "k": _rows(layer, q, q + kv),
        "v": _rows(layer, q + kv, q + 2 * kv),
    }


class _ZooAttention(nn.Module):
    """Projections, norms and rotary of most zoo attentions; ``weights()`` feeds the reference."""

    def __init__(self, spec: AttnSpec, *, fused: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.n_heads, self.n_kv, self.head_dim = spec.n_heads, spec.kv_heads, spec.head_dim
        self.n_rep, self.scale = spec.n_rep, spec.softmax_scale
        d, q_out, kv_out = spec.d_model, spec.n_heads * spec.head_dim, spec.kv_heads * spec.head_dim
        if fused:
            self.qkv = nn.Linear(d, q_out + 2 * kv_out, bias=bias)
        else:
            self.q_proj = nn.Linear(d, q_out, bias=bias)
            self.k_proj = nn.Linear(d, kv_out, bias=bias)
            self.v_proj = nn.Linear(d, kv_out, bias=bias)
        self.o_proj = nn.Linear(q_out, d, bias=bias)
        if spec.rope:
            self.rotary = Rotary(spec.head_dim)
        if spec.qk_norm:
            self.q_norm = nn.RMSNorm(spec.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(spec.head_dim, eps=1e-6)

    def weights(self) -> dict[str, Proj]:
        if hasattr(self, "qkv"):
            return {**_fused_qkv(self.qkv, self.spec), "o": _lin(self.o_proj)}
        projs = (self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        return {name: _lin(layer) for name, layer in zip("qkvo", projs)}


# attention forms


class ScoresMulAttention(_ZooAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * self.scale
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.o_proj(y)


class NanoGPTAttention(nn.Module):
    """nanoGPT's manual path: fused ``c_attn`` split, sliced tril buffer, dropout on the probs."""

    def __init__(self, spec: AttnSpec) -> None:
        super().__init__()
        self.spec = spec
        self.n_head, self.n_embd = spec.n_heads, spec.d_model
        self.c_attn = nn.Linear(spec.d_model, 3 * spec.d_model)
        self.c_proj = nn.Linear(spec.d_model, spec.d_model)
        self.attn_dropout = nn.Dropout(spec.dropout)
        self.resid_dropout = nn.Dropout(spec.dropout)
        tril = torch.tril(torch.ones(MAX_LEN, MAX_LEN)).view(1, 1, MAX_LEN, MAX_LEN)
        self.register_buffer("bias", tril)

    def weights(self) -> dict[str, Proj]:
        return {**_fused_qkv(self.c_attn, self.spec), "o": _lin(self.c_proj)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class MatmulDivTriuAttention(_ZooAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim).permute(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, t, self.n_heads, self.head_dim).permute(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, t, self.n_heads, self.head_dim).permute(0, 2, 1, 3)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        future = torch.triu(torch.full((t, t), float("-inf"), device=x.device), diagonal=1)
        probs = torch.softmax(scores + future, dim=-1)
        out = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(b, t, c)
        return self.o_proj(out)


class BmmFoldedAttention(_ZooAttention):
    """fairseq style: q scaled after its projection, heads folded into the batch for ``bmm``."""

    def _fold(self, y: torch.Tensor) -> torch.Tensor:
        b, t, _ = y.shape
        y = y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        return y.reshape(b * self.n_heads, t, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self._fold(self.q_proj(x) * self.scale)
        k, v = self._fold(self.k_proj(x)), self._fold(self.v_proj(x))
        attn = torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1)
        out = torch.bmm(attn, v).view(b, self.n_heads, t, self.head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c))


class BaddbmmAlibiAttention(nn.Module):
    """Bloom style: per-head interleaved fused qkv read by indexing, ALiBi through ``baddbmm``,
    ``finfo.min`` causal fill, float32 softmax cast back."""

    def __init__(self, spec: AttnSpec) -> None:
        super().__init__()
        self.spec = spec
        self.n_heads, self.head_dim = spec.n_heads, spec.head_dim
        self.inv_norm_factor = spec.softmax_scale
        self.query_key_value = nn.Linear(spec.d_model, 3 * spec.d_model)
        self.dense = nn.Linear(spec.d_model, spec.d_model)
        self.register_buffer("slopes", alibi_slopes(spec.n_heads), persistent=False)

    def position_bias(self, t: int) -> torch.Tensor:
        """ALiBi bias ``[H, 1, T]`` (slope × key position; a row shift of slope × distance)."""
        keys = torch.arange(t, device=self.slopes.device, dtype=self.slopes.dtype)
        return self.slopes[:, None, None] * keys[None, None, :]

    def weights(self) -> dict[str, Proj]:
        h, hd, d = self.n_heads, self.head_dim, self.spec.d_model
        w = self.query_key_value.weight.view(h, 3, hd, d)
        b = self.query_key_value.bias.view(h, 3, hd)
        out = {
            n: (w[:, i].reshape(h * hd, d), b[:, i].reshape(h * hd)) for i, n in enumerate("qkv")
        }
        return {**out, "o": _lin(self.dense)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h, hd = self.n_heads, self.head_dim
        fused = self.query_key_value(x).view(b, t, h, 3, hd)
        q = fused[..., 0, :].transpose(1, 2).reshape(b * h, t, hd)
        k = fused[..., 1, :].permute(0, 2, 3, 1).reshape(b * h, hd, t)
        v = fused[..., 2, :].transpose(1, 2).reshape(b * h, t, hd)
        alibi = self.position_bias(t).repeat(b, 1, 1)
        scores = torch.baddbmm(alibi, q, k, beta=1.0, alpha=self.inv_norm_factor).view(b, h, t, t)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)
        ctx = torch.bmm(probs.view(b * h, t, t), v).view(b, h, t, hd)
        return self.dense(ctx.permute(0, 2, 1, 3).reshape(b, t, h * hd))


class EinsumWhereAttention(_ZooAttention):
    def __init__(self, spec: AttnSpec) -> None:
        super().__init__(spec)
        keep = torch.ones(MAX_LEN, MAX_LEN, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", keep, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.scale
        scores = torch.where(self.causal_mask[:t, :t], scores, torch.finfo(scores.dtype).min)
        out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c))


class EinsumWindowAttention(_ZooAttention):
    """``bqhd,bkhd->bhqk`` layout (heads never transposed), √scale on q and k, sliding window."""

    def __init__(self, spec: AttnSpec, **kw: Any) -> None:
        super().__init__(spec, **kw)
        self.window = spec.window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        root = self.scale**0.5
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim) * root
        k = self.k_proj(x).view(b, t, self.n_heads, self.head_dim) * root
        v = self.v_proj(x).view(b, t, self.n_heads, self.head_dim)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
        i = torch.arange(t, device=x.device)[:, None]
        j = torch.arange(t, device=x.device)[None, :]
        scores = scores.masked_fill((j > i) | (i - j >= self.window), float("-inf"))
        probs = F.softmax(scores, dim=-1)
        return self.o_proj(torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, c))


class SdpaCausalAttention(_ZooAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c))


class PaddingMaskAttention(_ZooAttention):
    """Encoder attention with the caller's boolean padding mask ``[B, T]`` (True = keep)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim).permute(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, t, self.n_heads, self.head_dim).permute(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, t, self.n_heads, self.head_dim).permute(0, 2, 1, 3)
        scores = torch.matmul(q, k.transpose(-2, -1)).mul(self.scale)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        probs = scores.float().softmax(dim=-1).type_as(q)
        return self.o_proj(torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(b, t, c))


class RepeatInterleaveRopeAttention(_ZooAttention):
    def __init__(self, spec: AttnSpec) -> None:
        super().__init__(spec)
        self.register_buffer("tril", torch.tril(torch.ones(MAX_LEN, MAX_LEN)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q), self.rotary(k)
        k = k.repeat_interleave(self.n_rep, dim=1)
        v = v.repeat_interleave(self.n_rep, dim=1)
        att = q @ k.transpose(-2, -1) * self.scale
        att = F.softmax(att.masked_fill(self.tril[:t, :t] == 0, float("-inf")), dim=-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, t, -1))


class LlamaStyleAttention(_ZooAttention):
    """HF eager path: per-head q/k RMSNorm, RoPE, ``repeat_kv``, additive causal buffer, float32
    softmax cast back, functional dropout."""

    def __init__(self, spec: AttnSpec) -> None:
        super().__init__(spec, bias=False)
        self.attention_dropout = spec.dropout
        future = torch.full((MAX_LEN, MAX_LEN), float("-inf")).triu(1)
        self.register_buffer("causal_mask", future[None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        hidden_shape = (b, t, -1, self.head_dim)
        q = self.q_norm(self.q_proj(x).view(hidden_shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(hidden_shape)).transpose(1, 2)
        v = self.v_proj(x).view(hidden_shape).transpose(1, 2)
        q, k = self.rotary(q), self.rotary(k)
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        attn = torch.matmul(q, k.transpose(2, 3)) * self.scale
        attn = attn + self.causal_mask[:, :, :t, : k.shape[-2]]
        attn = F.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)
        attn = F.dropout(attn, p=self.attention_dropout, training=self.training)
        out = torch.matmul(attn, v).transpose(1, 2).contiguous()
        return self.o_proj(out.reshape(b, t, -1))


class MQAIndexAttention(_ZooAttention):
    """One kv head; fused qkv read by slicing; q divided before the product; expand + reshape."""

    def __init__(self, spec: AttnSpec) -> None:
        super().__init__(spec, fused=True)
        self.inv_scale = 1.0 / spec.softmax_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q_end = self.n_heads * self.head_dim
        k_end = q_end + self.n_kv * self.head_dim
        qkv = self.qkv(x)
        q = qkv[..., :q_end].view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = qkv[..., q_end:k_end].view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = qkv[..., k_end:].view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        shape = (b, self.n_kv, self.n_rep, t, self.head_dim)
        k = k[:, :, None].expand(shape).reshape(b, self.n_heads, t, self.head_dim)
        v = v[:, :, None].expand(shape).reshape(b, self.n_heads, t, self.head_dim)
        att = torch.matmul(q / self.inv_scale, k.transpose(-1, -2)).softmax(-1)
        return self.o_proj(torch.matmul(att, v).transpose(1, 2).reshape(b, t, -1))


class CrossAttention(nn.Module):
    """Queries from ``x``, keys and values from ``memory`` through one fused kv projection."""

    def __init__(self, spec: AttnSpec) -> None:
        super().__init__()
        self.spec = spec
        self.n_heads, self.head_dim, self.scale = spec.n_heads, spec.head_dim, spec.softmax_scale
        self.q_proj = nn.Linear(spec.d_model, spec.d_model)
        self.kv_proj = nn.Linear(spec.d_model, 2 * spec.d_model)
        self.out_proj = nn.Linear(spec.d_model, spec.d_model)

    def weights(self) -> dict[str, Proj]:
        d = self.spec.d_model
        kv = {"k": _rows(self.kv_proj, 0, d), "v": _rows(self.kv_proj, d, 2 * d)}
        return {"q": _lin(self.q_proj), **kv, "o": _lin(self.out_proj)}

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        s = memory.shape[1]
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(memory).chunk(2, dim=-1)
        k = k.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        att = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.out_proj((att @ v).transpose(1, 2).reshape(b, t, c))


class MHAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch_first) called with ``need_weights=False`` or by default."""

    def __init__(self, spec: AttnSpec, need_weights: bool) -> None:
        super().__init__()
        self.spec = spec
        self.need_weights, self.causal = need_weights, spec.causal
        self.mha = nn.MultiheadAttention(spec.d_model, spec.n_heads, batch_first=True)
        future = torch.full((MAX_LEN, MAX_LEN), float("-inf")).triu(1)
        self.register_buffer("future", future, persistent=False)

    def weights(self) -> dict[str, Proj]:
        d, w, b = self.spec.d_model, self.mha.in_proj_weight, self.mha.in_proj_bias
        qkv = {n: (w[i * d : (i + 1) * d], b[i * d : (i + 1) * d]) for i, n in enumerate("qkv")}
        return {**qkv, "o": _lin(self.mha.out_proj)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = self.future[:t, :t] if self.causal else None
        if self.need_weights:
            out, _ = self.mha(x, x, x, attn_mask=mask)
        else:
            out, _ = self.mha(x, x, x, attn_mask=mask, need_weights=False)
        return out


# FFN forms


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def new_gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh-approximate GELU written out."""
    return (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    )


class MLP(nn.Module):
    """Linear → activation → Linear; the activation is a module or a function."""

    def __init__(self, spec: FFNSpec, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.spec = spec
        self.fc1 = nn.Linear(spec.d_model, spec.hidden, bias=spec.bias)
        self.act = act
        self.fc2 = nn.Linear(spec.hidden, spec.d_model, bias=spec.bias)

    def weights(self) -> dict[str, Proj | None]:
        return {"up": _lin(self.fc1), "gate": None, "down": _lin(self.fc2)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with separate gate/up projections (Llama MLP)."""

    def __init__(self, spec: FFNSpec) -> None:
        super().__init__()
        self.spec = spec
        self.act_fn = _ACTIVATIONS[spec.activation]
        self.gate_proj = nn.Linear(spec.d_model, spec.hidden, bias=spec.bias)
        self.up_proj = nn.Linear(spec.d_model, spec.hidden, bias=spec.bias)
        self.down_proj = nn.Linear(spec.hidden, spec.d_model, bias=spec.bias)

    def weights(self) -> dict[str, Proj | None]:
        return {
            "up": _lin(self.up_proj),
            "gate": _lin(self.gate_proj),
            "down": _lin(self.down_proj),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class FusedGatedMLP(nn.Module):
    """One fused projection chunked in two; ``gate_first``: the first half is the activated one
    (Phi-3 puts the gate first, diffusers' GEGLU second)."""

    def __init__(self, spec: FFNSpec, gate_first: bool) -> None:
        super().__init__()
        self.spec = spec
        self.gate_first = gate_first
        self.act_fn = _ACTIVATIONS[spec.activation]
        self.gate_up_proj = nn.Linear(spec.d_model, 2 * spec.hidden, bias=spec.bias)
        self.down_proj = nn.Linear(spec.hidden, spec.d_model, bias=spec.bias)

    def weights(self) -> dict[str, Proj | None]:
        f = self.spec.hidden
        first, second = _rows(self.gate_up_proj, 0, f), _rows(self.gate_up_proj, f, 2 * f)
        gate, up = (first, second) if self.gate_first else (second, first)
        return {"up": up, "gate": gate, "down": _lin(self.down_proj)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_first:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            up, gate = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act_fn(gate))


class SequentialMLP(nn.Module):
    """An ``nn.Sequential`` MLP held by a plain module."""

    def __init__(self, spec: FFNSpec) -> None:
        super().__init__()
        self.spec = spec
        act = nn.GELU(approximate="tanh") if spec.activation == "gelu_tanh" else nn.GELU()
        self.net = nn.Sequential(
            nn.Linear(spec.d_model, spec.hidden), act, nn.Linear(spec.hidden, spec.d_model)
        )

    def weights(self) -> dict[str, Proj | None]:
        return {"up": _lin(self.net[0]), "gate": None, "down": _lin(self.net[2])}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# blocks and models


class NanoGPTBlock(nn.Module):
    def __init__(self, attn: AttnSpec, ffn: FFNSpec) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(attn.d_model)
        self.attn = NanoGPTAttention(attn)
        self.ln_2 = nn.LayerNorm(attn.d_model)
        self.mlp = MLP(ffn, nn.GELU())
        self.mlp_dropout = nn.Dropout(attn.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_dropout(self.mlp(self.ln_2(x)))


class NanoGPT(nn.Module):
    """A two-layer nanoGPT language model (tied embeddings, learned positions, manual attention)."""

    def __init__(self, attn: AttnSpec, ffn: FFNSpec, n_layer: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, attn.d_model)
        self.wpe = nn.Embedding(MAX_LEN, attn.d_model)
        self.drop = nn.Dropout(attn.dropout)
        self.h = nn.ModuleList(NanoGPTBlock(attn, ffn) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(attn.d_model)
        self.lm_head = nn.Linear(attn.d_model, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(0, idx.shape[1], dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class TimmAttention(nn.Module):
    """timm ``Attention``: qkv reshape/permute/unbind, q scaled before the product."""

    def __init__(self, spec: AttnSpec) -> None:
        super().__init__()
        self.spec = spec
        self.num_heads, self.head_dim, self.scale = spec.n_heads, spec.head_dim, spec.softmax_scale
        self.qkv = nn.Linear(spec.d_model, 3 * spec.d_model)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(spec.dropout)
        self.proj = nn.Linear(spec.d_model, spec.d_model)
        self.proj_drop = nn.Dropout(0.0)

    def weights(self) -> dict[str, Proj]:
        return {**_fused_qkv(self.qkv, self.spec), "o": _lin(self.proj)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * self.scale
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        x = self.attn_drop(attn) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class ViTBlock(nn.Module):
    """timm-style pre-norm ViT block: attention and a GELU MLP, both residual."""

    def __init__(self, attn: AttnSpec, ffn: FFNSpec) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(attn.d_model, eps=1e-6)
        self.attn = TimmAttention(attn)
        self.norm2 = nn.LayerNorm(attn.d_model, eps=1e-6)
        self.mlp = MLP(ffn, nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# negative cases


class SoftmaxClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(D_MODEL, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.head(x.mean(dim=1)), dim=-1)


class MatmulChain(nn.Module):
    """Products of activations with no softmax anywhere (``(x W1)(x W1)ᵀ x W2``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(D_MODEL, D_MODEL) / D_MODEL)
        self.w2 = nn.Parameter(torch.randn(D_MODEL, D_MODEL) / D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w1
        return torch.matmul(y @ y.transpose(-2, -1), x) @ self.w2


class SoftmaxPooling(nn.Module):
    """Attention pooling: a softmax over the *token* dim weighting a sum; no query-key product."""

    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Linear(D_MODEL, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.score(x).softmax(dim=1)
        return torch.matmul(weights.transpose(1, 2), x).squeeze(1)


class LinearNormLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_MODEL, 4 * D_MODEL)
        self.norm = nn.LayerNorm(4 * D_MODEL)
        self.fc2 = nn.Linear(4 * D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))


# references: each zoo module recomputed from its spec and weights


def _heads(y: torch.Tensor, n: int) -> torch.Tensor:
    b, t, _ = y.shape
    return y.view(b, t, n, -1).transpose(1, 2)


def _keep(tq: int, tk: int, window: int | None) -> torch.Tensor:
    i = torch.arange(tq)[:, None]
    j = torch.arange(tk)[None, :]
    keep = j <= i
    return keep & (i - j < window) if window is not None else keep


def _reference_bias(
    module: nn.Module, spec: AttnSpec, tq: int, tk: int, mask: torch.Tensor | None
) -> torch.Tensor:
    bias = torch.zeros(1, 1, tq, tk)
    if spec.causal:
        bias = bias.masked_fill(~_keep(tq, tk, spec.window), float("-inf"))
    if mask is not None:
        bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
    if spec.mask_kind == "bias":
        bias = bias + module.position_bias(tk)[None]
    return bias


def reference_attention(
    module: nn.Module,
    x: torch.Tensor,
    memory: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``module``'s output rebuilt from ``module.spec`` with one SDPA call."""
    spec, w = module.spec, module.weights()
    source = x if memory is None else memory
    q = _heads(F.linear(x, *w["q"]), spec.n_heads)
    k = _heads(F.linear(source, *w["k"]), spec.kv_heads)
    v = _heads(F.linear(source, *w["v"]), spec.kv_heads)
    if spec.qk_norm:
        q, k = module.q_norm(q), module.k_norm(k)
    if spec.rope:
        q, k = module.rotary(q), module.rotary(k)
    bias = _reference_bias(module, spec, q.shape[-2], k.shape[-2], mask)
    gqa = spec.kv_heads != spec.n_heads
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, scale=spec.softmax_scale, enable_gqa=gqa
    )
    return F.linear(out.transpose(1, 2).flatten(2), *w["o"])


def reference_ffn(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module``'s output rebuilt from ``module.spec``: ``down(act(up x))`` or the gated form."""
    spec, w = module.spec, module.weights()
    act = _ACTIVATIONS[spec.activation]
    if spec.gated:
        hidden = act(F.linear(x, *w["gate"])) * F.linear(x, *w["up"])
    else:
        hidden = act(F.linear(x, *w["up"]))
    return F.linear(hidden, *w["down"])


def _reference(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    if isinstance(module.spec, AttnSpec):
        return reference_attention(module, **bound)
    return reference_ffn(module, **bound)


def check_against_reference(case: ZooCase, rtol: float = 1e-5) -> int:
    """Run ``case`` and compare every zoo attention/FFN module with its reference.

    Returns:
        The number of modules checked.

    Raises:
        AssertionError: naming the first module whose output differs beyond ``rtol`` of its scale.
    """
    model = case.make_model()
    seen: list[tuple[str, nn.Module, tuple, dict, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "spec", None), (AttnSpec, FFNSpec)):
            hook = partial(_record, seen, name)
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        call(model, case.make_inputs())
        for handle in handles:
            handle.remove()
        for name, module, args, kwargs, out in seen:
            ref = _reference(module, args, kwargs)
            err = (ref - out).abs().max().item() / max(ref.abs().max().item(), 1e-6)
            assert err <= rtol, (
                f"{case.name}: {name or 'root'} differs from its reference by {err:.3g}"
            )
    return len(seen)


def _record(seen: list, name: str, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
    seen.append((name, module, args, kwargs, out))


def call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


# the zoo


def _seeded(factory: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    """A factory that builds the same eval-mode model every call (norm weights perturbed off 1)."""

    def make() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory()
            for module in model.modules():
                if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
                    nn.init.normal_(module.weight, 1.0, 0.1)
        return model.eval()

    return make


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _hidden(seq: int = SEQ) -> Callable[[], torch.Tensor]:
    return lambda: _randn(BATCH, seq, D_MODEL)


def _padded_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool)
    mask[1, -5:] = False
    return _randn(BATCH, SEQ, D_MODEL), mask


def _cross_inputs() -> dict[str, torch.Tensor]:
    return {"x": _randn(BATCH, SEQ, D_MODEL), "memory": _randn(BATCH, 8, D_MODEL, seed=1)}


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def _seed(name: str) -> int:
    return zlib.crc32(name.encode()) % 10_000


def _attention_case(
    name: str,
    build: Callable[[AttnSpec], nn.Module],
    spec: AttnSpec,
    form: str,
    inputs: Callable[[], Any] | None = None,
) -> ZooCase:
    make = _seeded(partial(build, spec), _seed(name))
    return ZooCase(name, make, inputs or _hidden(), [spec.expected()], [], form=form)


def _ffn_case(name: str, build: Callable[[], nn.Module], spec: FFNSpec, form: str) -> ZooCase:
    return ZooCase(name, _seeded(build, _seed(name)), _hidden(), [], [spec.expected()], form=form)


def _negative_case(name: str, build: Callable[[], nn.Module], form: str) -> ZooCase:
    return ZooCase(name, _seeded(build, _seed(name)), _hidden(), [], [], form=form)


def _attention_cases() -> list[ZooCase]:
    causal, gqa = AttnSpec(causal=True), AttnSpec(n_kv_heads=2, causal=True, rope=True)
    return [
        _attention_case(
            "matmul_op_scores_mul",
            ScoresMulAttention,
            AttnSpec(),
            "separate biased projections, view/transpose, `@`, scores * scale, F.softmax",
        ),
        _attention_case(
            "nanogpt_tril_masked_fill",
            NanoGPTAttention,
            AttnSpec(causal=True, dropout=0.1),
            "fused c_attn split, sliced tril buffer masked_fill, dropout p=0.1 on probs",
        ),
        _attention_case(
            "torch_matmul_div_triu",
            partial(MatmulDivTriuAttention, bias=False),
            causal,
            "no-bias projections, reshape/permute, torch.matmul / √d, + triu(-inf), torch.softmax",
        ),
        _attention_case(
            "bmm_folded_q_prescaled",
            BmmFoldedAttention,
            AttnSpec(),
            "q * scale after projection, heads folded into batch, 3-D bmm, Tensor.softmax",
        ),
        _attention_case(
            "baddbmm_alibi_fp32_softmax",
            BaddbmmAlibiAttention,
            AttnSpec(causal=True, mask="bias"),
            "Bloom: per-head fused qkv indexed, ALiBi in baddbmm(alpha=s), finfo.min, fp32 softmax",
        ),
        _attention_case(
            "einsum_bhqd_bool_where",
            EinsumWhereAttention,
            AttnSpec(causal=True, scale=0.1),
            "einsum bhqd,bhkd->bhqk, custom scale 0.1, torch.where(bool tril buffer, s, finfo.min)",
        ),
        _attention_case(
            "einsum_bqhd_split_sqrt_window",
            partial(EinsumWindowAttention, bias=False),
            AttnSpec(causal=True, window=4),
            "einsum bqhd,bkhd->bhqk (no transpose), sqrt(scale) on q and k, sliding window 4",
        ),
        _attention_case(
            "sdpa_is_causal_chunk",
            partial(SdpaCausalAttention, fused=True, bias=False),
            causal,
            "fused qkv chunk(3), F.scaled_dot_product_attention(is_causal=True)",
        ),
        _attention_case(
            "padding_mask_argument",
            partial(PaddingMaskAttention, bias=False),
            AttnSpec(mask="padding"),
            "caller's bool padding mask, matmul(...).mul(scale), .float().softmax().type_as",
            inputs=_padded_inputs,
        ),
        _attention_case(
            "gqa_repeat_interleave_rope",
            RepeatInterleaveRopeAttention,
            gqa,
            "GQA 4/2 via repeat_interleave, half-split RoPE, tril buffer masked_fill",
        ),
        _attention_case(
            "hf_repeat_kv_rope_qk_norm",
            LlamaStyleAttention,
            AttnSpec(n_kv_heads=2, causal=True, rope=True, qk_norm=True),
            "HF eager: q/k RMSNorm, RoPE, repeat_kv, additive causal buffer, fp32 softmax, dropout",
        ),
        _attention_case(
            "mqa_fused_index_expand",
            MQAIndexAttention,
            AttnSpec(n_kv_heads=1),
            "MQA: fused qkv sliced by index, q / sqrt(d), expand+reshape, Tensor.softmax",
        ),
        _attention_case(
            "cross_attention_fused_kv",
            CrossAttention,
            AttnSpec(cross=True),
            "queries from x, keys/values from memory (fused kv chunk(2)), dict inputs",
            inputs=_cross_inputs,
        ),
        _attention_case(
            "mha_need_weights_false",
            partial(MHAttention, need_weights=False),
            AttnSpec(),
            "nn.MultiheadAttention(batch_first=True), need_weights=False",
        ),
        _attention_case(
            "mha_default_causal_mask",
            partial(MHAttention, need_weights=True),
            causal,
            "nn.MultiheadAttention default need_weights, float causal attn_mask buffer",
        ),
    ]


def _model_cases() -> list[ZooCase]:
    attn, mlp, layers = AttnSpec(causal=True, dropout=0.1), FFNSpec(activation="gelu"), 2
    vit_attn = AttnSpec()
    return [
        ZooCase(
            "nanogpt_model",
            _seeded(partial(NanoGPT, attn, mlp, layers), seed=1),
            _tokens,
            [attn.expected()] * layers,
            [mlp.expected()] * layers,
            form="2-layer nanoGPT LM: tied embeddings, manual causal attention, GELU MLP",
        ),
        ZooCase(
            "vit_block",
            _seeded(partial(ViTBlock, vit_attn, mlp), seed=2),
            _hidden(SEQ + 1),
            [vit_attn.expected()],
            [mlp.expected()],
            form="timm ViT block (T=17): qkv reshape/permute/unbind attention + GELU MLP",
        ),
    ]


def _ffn_cases() -> list[ZooCase]:
    gelu, relu, silu = (
        FFNSpec(activation="gelu"),
        FFNSpec(activation="relu"),
        FFNSpec(activation="silu"),
    )
    tanh = FFNSpec(activation="gelu_tanh")
    swiglu = FFNSpec(activation="silu", gated=True, hidden=64, bias=False)
    geglu = FFNSpec(activation="gelu", gated=True, hidden=64)
    return [
        _ffn_case(
            "ffn_gelu_module", partial(MLP, gelu, nn.GELU()), gelu, "Linear, nn.GELU(), Linear"
        ),
        _ffn_case(
            "ffn_relu_functional", partial(MLP, relu, F.relu), relu, "Linear, F.relu, Linear"
        ),
        _ffn_case(
            "ffn_silu_module", partial(MLP, silu, nn.SiLU()), silu, "Linear, nn.SiLU(), Linear"
        ),
        _ffn_case(
            "ffn_gelu_tanh_functional",
            partial(MLP, tanh, _ACTIVATIONS["gelu_tanh"]),
            tanh,
            "Linear, F.gelu(approximate='tanh'), Linear",
        ),
        _ffn_case(
            "ffn_gelu_tanh_manual",
            partial(MLP, tanh, new_gelu),
            tanh,
            "Linear, GPT-2's written-out tanh GELU formula, Linear",
        ),
        _ffn_case(
            "ffn_swiglu_separate",
            partial(GatedMLP, swiglu),
            swiglu,
            "Llama MLP: down(silu(gate x) * up x), no bias",
        ),
        _ffn_case(
            "ffn_swiglu_fused_chunk",
            partial(FusedGatedMLP, swiglu, gate_first=True),
            swiglu,
            "Phi-3 MLP: gate_up chunk(2), up * silu(gate)",
        ),
        _ffn_case(
            "ffn_geglu_separate", partial(GatedMLP, geglu), geglu, "down(gelu(gate x) * up x)"
        ),
        _ffn_case(
            "ffn_geglu_fused_chunk",
            partial(FusedGatedMLP, geglu, gate_first=False),
            geglu,
            "diffusers GEGLU: proj chunk(2) -> h, gate; h * gelu(gate)",
        ),
        _ffn_case(
            "ffn_sequential",
            partial(SequentialMLP, tanh),
            tanh,
            "nn.Sequential(Linear, nn.GELU(approximate='tanh'), Linear)",
        ),
    ]


def _negative_cases() -> list[ZooCase]:
    return [
        _negative_case(
            "neg_softmax_classifier", SoftmaxClassifier, "mean-pool, Linear, softmax over classes"
        ),
        _negative_case(
            "neg_matmul_chain", MatmulChain, "(x W1)(x W1)^T x W2: products, no softmax"
        ),
        _negative_case(
            "neg_softmax_pooling", SoftmaxPooling, "softmax over tokens (dim=1) weighting a matmul"
        ),
        _negative_case("neg_single_linear", partial(nn.Linear, D_MODEL, D_MODEL), "one Linear"),
        _negative_case(
            "neg_linear_layernorm_linear",
            LinearNormLinear,
            "Linear, LayerNorm, Linear (no activation)",
        ),
    ]


ZOO: list[ZooCase] = _attention_cases() + _model_cases() + _ffn_cases() + _negative_cases()
CASES: dict[str, ZooCase] = {case.name: case for case in ZOO}
