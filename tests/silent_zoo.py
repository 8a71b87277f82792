"""Small 2-layer models (d_model 64, 4 heads) for issue 13, "nothing silent".

Each attention here is a spelling whose description used to be wrong without an error: masks that
equal "causal" or "no mask" only at the example length, learned biases that are zero at rewrite time,
keys prepended before a causal SDPA call, positional products added to the scores, heads folded into
the query length, scores edited in place, per-head temperatures and sink logits. :class:`Stack` puts
two of them in a pre-norm residual stack with an MLP.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

D_MODEL = 64
N_HEADS = 4
HEAD_DIM = D_MODEL // N_HEADS
MAX_LEN = 64


def _positions(t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(t, device=device)[:, None], torch.arange(t, device=device)[None, :]


# fixed masks: keep[i, j] (True = attend), built from the length at every call


def sliding_window_24(t: int, device: torch.device) -> torch.Tensor:
    i, j = _positions(t, device)
    return (j <= i) & (i - j < 24)


def chunked_local_16(t: int, device: torch.device) -> torch.Tensor:
    i, j = _positions(t, device)
    return (j <= i) & (i // 16 == j // 16)


def band_24(t: int, device: torch.device) -> torch.Tensor:
    i, j = _positions(t, device)
    return (i - j).abs() < 24


def local_strided(t: int, device: torch.device) -> torch.Tensor:
    """Sparse Transformer's fixed pattern: the last 4 keys plus every 4th key, causal."""
    i, j = _positions(t, device)
    return (j <= i) & ((i - j < 4) | (j % 4 == 3))


MASKS: dict[str, Callable[[int, torch.device], torch.Tensor]] = {
    "sliding_window_24": sliding_window_24,
    "chunked_local_16": chunked_local_16,
    "band_24": band_24,
    "local_strided": local_strided,
}


class _Heads(nn.Module):
    """q, k, v projections split into ``[B, H, T, D]`` and the output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = nn.Linear(D_MODEL, D_MODEL)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(D_MODEL, dim=-1)
        return tuple(y.view(b, t, N_HEADS, HEAD_DIM).transpose(1, 2) for y in (q, k, v))

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, t, D_MODEL))


class FixedMaskAttention(_Heads):
    """Manual attention with a fixed (input-independent) mask built from the length."""

    def __init__(self, mask: str) -> None:
        super().__init__()
        self.keep = MASKS[mask]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        att = (q @ k.transpose(-2, -1)) * HEAD_DIM**-0.5
        att = att.masked_fill(~self.keep(x.shape[1], x.device), float("-inf"))
        return self.merge(att.softmax(dim=-1) @ v)


class RelativeBiasAttention(_Heads):
    """BEiT: a learned relative-position table, zero-initialised, gathered into a ``[H, T, T]`` bias."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(2 * MAX_LEN - 1, N_HEADS))
        i, j = _positions(MAX_LEN, torch.device("cpu"))
        self.register_buffer("index", (i - j + MAX_LEN - 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self.split(x)
        bias = self.table[self.index[:t, :t]].permute(2, 0, 1)
        att = (q @ k.transpose(-2, -1)) * HEAD_DIM**-0.5 + bias
        return self.merge(att.softmax(dim=-1) @ v)


class DropoutAttention(_Heads):
    """nanoGPT's manual path with attention and residual dropout."""

    def __init__(self, p_attn: float = 0.1, p_resid: float = 0.1) -> None:
        super().__init__()
        self.attn_drop = nn.Dropout(p_attn)
        self.resid_drop = nn.Dropout(p_resid)
        self.register_buffer("tril", torch.tril(torch.ones(MAX_LEN, MAX_LEN)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self.split(x)
        att = (q @ k.transpose(-2, -1)) * HEAD_DIM**-0.5
        att = att.masked_fill(self.tril[:t, :t] == 0, float("-inf")).softmax(dim=-1)
        return self.resid_drop(self.merge(self.attn_drop(att) @ v))


class SdpaAttention(_Heads):
    """nanoGPT's flash path: one SDPA call with ``is_causal=True``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p
        self.resid_drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        p = self.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.resid_drop(self.merge(out))


class MemoryCausalAttention(_Heads):
    """Learned memory keys/values prepended, then ``is_causal=True`` (PyTorch aligns it top-left)."""

    def __init__(self, n_mem: int = 4) -> None:
        super().__init__()
        self.mem = nn.Parameter(torch.randn(1, N_HEADS, n_mem, 2 * HEAD_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        mk, mv = self.mem.expand(x.shape[0], -1, -1, -1).split(HEAD_DIM, dim=-1)
        k, v = torch.cat([mk, k], dim=2), torch.cat([mv, v], dim=2)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class TupeAttention(_Heads):
    """TUPE: an untied positional product added *before* the content product."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(MAX_LEN, D_MODEL) * 0.5)
        self.pos_q = nn.Linear(D_MODEL, D_MODEL)
        self.pos_k = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self.split(x)
        pos = self.pos[:t]
        pq = self.pos_q(pos).view(t, N_HEADS, HEAD_DIM).transpose(0, 1)
        pk = self.pos_k(pos).view(t, N_HEADS, HEAD_DIM).transpose(0, 1)
        att = (pq @ pk.transpose(-2, -1) + q @ k.transpose(-2, -1)) * (2 * HEAD_DIM) ** -0.5
        return self.merge(att.softmax(dim=-1) @ v)


class FoldedMQAAttention(nn.Module):
    """Legacy GPTBigCode MQA: q reshaped to ``[B, T*H, D]`` against one shared ``k: [B, T, D]``."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(D_MODEL, D_MODEL + 2 * HEAD_DIM)
        self.c_proj = nn.Linear(D_MODEL, D_MODEL)
        self.register_buffer("tril", torch.tril(torch.ones(MAX_LEN, MAX_LEN, dtype=torch.bool)),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split([D_MODEL, HEAD_DIM, HEAD_DIM], dim=-1)
        q = q.reshape(b, t * N_HEADS, HEAD_DIM)
        att = torch.bmm(q, k.transpose(1, 2)) * HEAD_DIM**-0.5  # [B, T*H, T]
        att = att.view(b, t, N_HEADS, t)
        att = att.masked_fill(~self.tril[:t, None, :t], float("-inf")).softmax(dim=-1)
        out = torch.bmm(att.view(b, t * N_HEADS, t), v)
        return self.c_proj(out.view(b, t, D_MODEL))


class InPlaceAttention(_Heads):
    """Scores edited in place: ``scores *= s`` (HF Falcon eager), ``scores += bias`` (T5 / fairseq)."""

    def __init__(self) -> None:
        super().__init__()
        future = torch.full((MAX_LEN, MAX_LEN), float("-inf")).triu(1)
        self.register_buffer("future", future, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self.split(x)
        scores = q @ k.transpose(-2, -1)
        scores *= HEAD_DIM**-0.5
        scores += self.future[:t, :t]
        return self.merge(scores.softmax(dim=-1) @ v)


class FullScaleAttention(_Heads):
    """The scale as a 0-d tensor: ``scores / torch.full([], sqrt(d))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        scores = (q @ k.transpose(-2, -1)) / torch.full([], math.sqrt(HEAD_DIM))
        return self.merge(scores.softmax(dim=-1) @ v)


class TemperatureAttention(_Heads):
    """XCiT / SwinV2-cr: a learned per-head temperature ``[H, 1, 1]`` multiplying the scores."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.linspace(0.5, 2.0, N_HEADS).view(N_HEADS, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        att = (q @ k.transpose(-2, -1)) * self.temperature
        return self.merge(att.softmax(dim=-1) @ v)


class SinkAttention(_Heads):
    """gpt-oss: a learned sink logit per head as an extra key column, dropped after the softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(N_HEADS))
        future = torch.full((MAX_LEN, MAX_LEN), float("-inf")).triu(1)
        self.register_buffer("future", future, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.split(x)
        att = (q @ k.transpose(-2, -1)) * HEAD_DIM**-0.5 + self.future[:t, :t]
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, t, -1)
        logits = torch.cat([att, sinks], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = F.softmax(logits, dim=-1)[..., :-1]
        return self.merge(probs @ v)


class SlicedProbsAttention(_Heads):
    """Probabilities that lose their last key column before the value product, with no sink column:
    not attention over every key (``softmax(s)[..., :-1] @ v[..., :-1, :]``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        probs = ((q @ k.transpose(-2, -1)) * HEAD_DIM**-0.5).softmax(dim=-1)
        out = probs[..., :-1] @ v[..., :-1, :]
        return self.merge(out)


class CrossCovarianceAttention(_Heads):
    """XCiT / EdgeNeXt XCA: attention over the channel axis, ``[B, H, D, T]`` queries and keys, L2-
    normalised along the tokens, with a learned per-head temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.linspace(0.5, 2.0, N_HEADS).view(N_HEADS, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (y.transpose(-2, -1) for y in self.split(x))  # [B, H, D, T]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        att = (q @ k.transpose(-2, -1)) * self.temperature  # [B, H, D, D]
        return self.merge((att.softmax(dim=-1) @ v).transpose(-2, -1))


class CosineAttention(_Heads):
    """SwinV2-cr: cosine attention with a learned per-head logit scale, clamped and exponentiated."""

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(N_HEADS, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        att = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        att = att * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        return self.merge(att.softmax(dim=-1) @ v)


class Block(nn.Module):
    def __init__(self, attn: nn.Module, p: float = 0.0) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.attn = attn
        self.fc1, self.fc2 = nn.Linear(D_MODEL, 2 * D_MODEL), nn.Linear(2 * D_MODEL, D_MODEL)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class Stack(nn.Module):
    """Two pre-norm blocks around ``make_attention()`` attentions."""

    def __init__(self, make_attention: Callable[[], nn.Module], p: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(make_attention(), p) for _ in range(2))
        self.ln = nn.LayerNorm(D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.ln(x)


class MaskArgsStack(nn.Module):
    """``forward(x, *masks)``: one boolean key mask ``[B, T]`` per layer, passed as varargs."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Heads() for _ in range(2))

    def forward(self, x: torch.Tensor, *masks: torch.Tensor) -> torch.Tensor:
        for layer, keep in zip(self.layers, masks):
            q, k, v = layer.split(x)
            att = (q @ k.transpose(-2, -1)) * HEAD_DIM**-0.5
            att = att.masked_fill(~keep[:, None, None, :], float("-inf"))
            x = x + layer.merge(att.softmax(dim=-1) @ v)
        return x


def stack(make_attention: Callable[[], nn.Module], p: float = 0.0, seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack(make_attention, p).eval()


def hidden(t: int = 16, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, t, D_MODEL, generator=torch.Generator().manual_seed(seed))
