"""The attention and FFN grammars: one sentence (:class:`AttentionChoices`, :class:`FFNChoices`)
builds one small module (:func:`attention_program`, :func:`ffn_program`) with the site fields detection
must report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _seeded_module(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build with a fixed seed without touching the global RNG; norm gains drawn around 1."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
        for m in module.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None:
                nn.init.normal_(m.weight, 1.0, 0.1)
    return module.eval()


@dataclass
class Program:
    """A generated module with its example inputs and the site fields detection must report."""

    choices: Any
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    expected: dict[str, Any]

    def __repr__(self) -> str:
        return f"Program({self.choices!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # hypothesis prints drawn values with this hook; keep weights and tensors out of reports
        printer.text(repr(self))


# attention grammar

PROJECTIONS = ("separate", "fused-split", "fused-chunk", "fused-unbind")
SCALE_PLACEMENTS = ("scores-mul", "scores-div", "q-mul", "split-sqrt")
MASKS = ("none", "tril-buffer", "additive-triu", "bool-where", "sdpa-causal", "window", "wide-window",
         "chunked", "band")
SCORE_MODS = ("none", "temperature", "softcap", "manual-softmax", "sink")
_EXPLICIT_MASKS = ("chunked", "band")  # no causal/window pattern: passed to the core as a tensor
HEAD_LAYOUTS = ("view-transpose", "reshape-permute", "einsum")
GQA_FORMS = ("none", "repeat-interleave", "expand-reshape")
SOFTMAX_DTYPES = ("same", "fp32-cast")
EXTRAS = ("none", "rope", "qk-norm", "both")
_MAX_LEN = 32


@dataclass(frozen=True)
class AttentionChoices:
    """One sentence of the attention grammar (see :func:`attention_programs` for the options)."""

    projection: str = "separate"
    scale_at: str = "scores-mul"
    mask: str = "none"
    heads: str = "view-transpose"
    gqa: str = "none"
    softmax: str = "same"
    extras: str = "none"
    score_mod: str = "none"
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 8
    scale: float = 8**-0.5
    window: int | None = None
    bias: bool = True
    seq_len: int = 8
    batch: int = 2
    seed: int = 0

    def expected(self) -> dict[str, Any]:
        sink = self.score_mod == "sink"  # the core attends over one more key: the mask is a bias
        causal = self.mask not in ("none", "band") and not sink
        explicit = self.mask in _EXPLICIT_MASKS or sink
        return {
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "value_dim": self.head_dim,
            "scale": self.scale,
            "causal": causal,
            "window": self.window if self.mask in ("window", "wide-window") and not sink else None,
            "mask": "bias" if explicit else ("causal" if causal else "none"),
            "softcap": _SOFTCAP if self.score_mod == "softcap" else None,
            "cross": False,
            "rope": self.extras in ("rope", "both"),
            "qk_norm": self.extras in ("qk-norm", "both"),
            "dropout": 0.0,
        }


_SOFTCAP = 5.0


def fixed_keep(choices: AttentionChoices, t: int, device: torch.device | None = None) -> torch.Tensor | None:
    """Bool ``[t, t]`` (True = attend) of the grammar's fixed masks, built from the length; None: none."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    if choices.mask == "none":
        return None
    if choices.mask == "band":
        return (i - j).abs() < choices.window
    if choices.mask == "chunked":
        return (j <= i) & (i // choices.window == j // choices.window)
    if choices.mask in ("window", "wide-window"):
        return (j <= i) & (i - j < choices.window)
    return j <= i


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GrammarAttention(nn.Module):
    """Self-attention spelled the way its :class:`AttentionChoices` say; ``x: [B, T, H * D]``."""

    def __init__(self, choices: AttentionChoices) -> None:
        super().__init__()
        c = self.choices = choices
        self.d_q, self.d_kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.n_rep, self.inv_scale = c.num_heads // c.num_kv_heads, 1.0 / c.scale
        if c.projection == "separate":
            self.q_proj = nn.Linear(self.d_q, self.d_q, bias=c.bias)
            self.k_proj = nn.Linear(self.d_q, self.d_kv, bias=c.bias)
            self.v_proj = nn.Linear(self.d_q, self.d_kv, bias=c.bias)
        else:
            self.qkv = nn.Linear(self.d_q, self.d_q + 2 * self.d_kv, bias=c.bias)
        self.o_proj = nn.Linear(self.d_q, self.d_q, bias=c.bias)
        if c.extras in ("qk-norm", "both"):
            self.q_norm, self.k_norm = (
                nn.RMSNorm(c.head_dim, eps=1e-6),
                nn.RMSNorm(c.head_dim, eps=1e-6),
            )
        if c.extras in ("rope", "both"):
            inv_freq = 1.0 / 10000 ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim)
            freqs = torch.outer(torch.arange(_MAX_LEN).float(), inv_freq).repeat(1, 2)
            self.register_buffer("cos", freqs.cos(), persistent=False)
            self.register_buffer("sin", freqs.sin(), persistent=False)
        if c.mask == "tril-buffer":
            self.register_buffer("bias", torch.tril(torch.ones(_MAX_LEN, _MAX_LEN))[None, None])
        if c.score_mod == "temperature":  # XCiT / SwinV2-cr: a learned per-head factor on the scores
            self.temperature = nn.Parameter(torch.linspace(0.5, 2.0, c.num_heads).view(c.num_heads, 1, 1))
        if c.score_mod == "sink":  # gpt-oss: a learned per-head logit as one more softmax column
            self.sinks = nn.Parameter(torch.linspace(-1.0, 1.0, c.num_heads))

    def _project(self, x: torch.Tensor) -> Sequence[torch.Tensor]:
        c = self.choices
        if c.projection == "separate":
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        qkv = self.qkv(x)
        if c.projection == "fused-split":
            return qkv.split([self.d_q, self.d_kv, self.d_kv], dim=-1)
        if c.projection == "fused-chunk":
            return qkv.chunk(3, dim=-1)
        return qkv.reshape(x.shape[0], x.shape[1], 3, c.num_heads, c.head_dim).unbind(2)

    def _split_heads(self, y: torch.Tensor, n: int) -> torch.Tensor:
        shape = (y.shape[0], y.shape[1], n, self.choices.head_dim)
        return y.reshape(shape) if self.choices.heads == "reshape-permute" else y.view(shape)

    def _rope(self, y: torch.Tensor) -> torch.Tensor:
        t = y.shape[1]
        return y * self.cos[:t, None, :] + _rotate_half(y) * self.sin[:t, None, :]

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as ``[B, T, heads, D]`` after qk-norm and RoPE (also read by ``reference``)."""
        c = self.choices
        q, k, v = self._project(x)
        q, k = self._split_heads(q, c.num_heads), self._split_heads(k, c.num_kv_heads)
        v = self._split_heads(v, c.num_kv_heads)
        if c.extras in ("qk-norm", "both"):
            q, k = self.q_norm(q), self.k_norm(k)
        if c.extras in ("rope", "both"):
            q, k = self._rope(q), self._rope(k)
        return q, k, v

    def _layout(self, y: torch.Tensor) -> torch.Tensor:
        if self.choices.heads == "view-transpose":
            return y.transpose(1, 2)
        if self.choices.heads == "reshape-permute":
            return y.permute(0, 2, 1, 3)
        return y

    def _repeat(self, y: torch.Tensor) -> torch.Tensor:
        form, dim = self.choices.gqa, 2 if self.choices.heads == "einsum" else 1
        if form == "repeat-interleave":
            return y.repeat_interleave(self.n_rep, dim=dim)
        if form == "expand-reshape":
            shape = list(y.shape)
            expanded = y.unsqueeze(dim + 1).expand(*shape[: dim + 1], self.n_rep, *shape[dim + 1 :])
            shape[dim] *= self.n_rep
            return expanded.reshape(shape)
        return y

    def _prescale(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.choices.scale_at == "q-mul":
            return q * self.choices.scale, k
        if self.choices.scale_at == "split-sqrt":
            root = math.sqrt(self.choices.scale)
            return q * root, k * root
        return q, k

    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        c = self.choices
        if c.heads == "einsum":
            s = torch.einsum("bqhd,bkhd->bhqk", q, k)
        elif c.heads == "reshape-permute":
            s = torch.matmul(q, k.transpose(-1, -2))
        else:
            s = q @ k.transpose(-2, -1)
        if c.scale_at == "scores-mul":
            return s * c.scale
        if c.scale_at == "scores-div":
            return s / self.inv_scale
        return s

    def _mask(self, s: torch.Tensor) -> torch.Tensor:
        mask, t = self.choices.mask, s.shape[-1]
        if mask == "tril-buffer":
            return s.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        if mask == "additive-triu":
            return s + torch.triu(
                torch.full((t, t), float("-inf"), device=s.device, dtype=s.dtype), 1
            )
        if mask == "bool-where":
            keep = torch.ones(t, t, dtype=torch.bool, device=s.device).tril()
            return torch.where(keep, s, torch.finfo(s.dtype).min)
        if mask in ("window", "wide-window", "chunked", "band"):
            return s.masked_fill(~fixed_keep(self.choices, t, s.device), float("-inf"))
        return s

    def _modify(self, s: torch.Tensor) -> torch.Tensor:
        if self.choices.score_mod == "temperature":
            return s * self.temperature
        if self.choices.score_mod == "softcap":  # Gemma 2
            return _SOFTCAP * torch.tanh(s / _SOFTCAP)
        return s

    def _softmax(self, s: torch.Tensor) -> torch.Tensor:
        if self.choices.score_mod == "sink":
            b, h, t, _ = s.shape
            logits = torch.cat([s, self.sinks.reshape(1, -1, 1, 1).expand(b, h, t, 1).to(s.dtype)], dim=-1)
            logits = logits - logits.max(dim=-1, keepdim=True).values
            return logits.softmax(dim=-1)[..., :-1]
        if self.choices.score_mod == "manual-softmax":
            e = (s - s.amax(dim=-1, keepdim=True)).exp()
            return e / e.sum(dim=-1, keepdim=True)
        if self.choices.softmax == "fp32-cast":
            return F.softmax(s, dim=-1, dtype=torch.float32).to(s.dtype)
        return s.softmax(dim=-1)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention on the per-head layout; returns ``[B, T, H, D]``."""
        c = self.choices
        if c.mask == "sdpa-causal":
            if c.heads == "einsum":
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            scale = 1.0 if c.scale_at in ("q-mul", "split-sqrt") else c.scale
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(
                1, 2
            )
        p = self._softmax(self._mask(self._modify(self._scores(q, k))))
        if c.heads == "einsum":
            return torch.einsum("bhqk,bkhd->bqhd", p, v)
        return (p @ v).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (self._layout(y) for y in self.heads(x))
        q, k = self._prescale(q, self._repeat(k))
        out = self._core(q, k, self._repeat(v))
        return self.o_proj(out.reshape(b, t, self.d_q))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same attention as one SDPA call built from ``choices.expected()``."""
        want, (b, t, _) = self.choices.expected(), x.shape
        q, k, v = (y.transpose(1, 2) for y in self.heads(x))
        keep = fixed_keep(self.choices, t)
        if self.choices.score_mod == "temperature":
            q = q * self.temperature
        gqa = want["num_kv_heads"] != want["num_heads"]
        if self.choices.score_mod == "sink":  # one more key with zero value and the sink as its score
            k, v = (torch.cat([y, y.new_zeros(*y.shape[:2], 1, y.shape[-1])], dim=2) for y in (k, v))
            bias = torch.zeros(t, t) if keep is None else torch.zeros(t, t).masked_fill(~keep, float("-inf"))
            sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, q.shape[1], t, 1)
            keep = torch.cat([bias.expand(b, q.shape[1], t, t), sinks], dim=-1)
        if self.choices.score_mod == "softcap":  # no SDPA form: written out
            k, v = (y.repeat_interleave(q.shape[1] // y.shape[1], dim=1) for y in (k, v))
            s = _SOFTCAP * torch.tanh(q @ k.transpose(-2, -1) * want["scale"] / _SOFTCAP)
            s = s if keep is None else s.masked_fill(~keep, float("-inf"))
            out = s.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, scale=want["scale"], enable_gqa=gqa
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.d_q))


def attention_program(choices: AttentionChoices) -> Program:
    """Build the module and example input of one attention-grammar sentence.

    Args:
        choices: the sentence.

    Returns:
        A :class:`Program`: an eval-mode module, ``(x,)`` with ``x: [batch, seq_len, H * D]``, and
        the attention-site fields detection must report.
    """
    module = _seeded_module(lambda: GrammarAttention(choices), choices.seed)
    gen = torch.Generator().manual_seed(choices.seed)
    x = torch.randn(choices.batch, choices.seq_len, module.d_q, generator=gen)
    return Program(choices, module, (x,), choices.expected())


# FFN grammar

FFN_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
FFN_SPELLINGS = ("module", "functional", "manual")
FFN_GATINGS = ("none", "separate", "fused-chunk")

_ACT_MODULES: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}
_ACT_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
_ACT_MANUAL: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    ),
    "relu": torch.relu,
    "silu": lambda x: x * torch.sigmoid(x),
}


@dataclass(frozen=True)
class FFNChoices:
    """One sentence of the FFN grammar (see :func:`ffn_programs` for the options)."""

    activation: str = "gelu"
    spelling: str = "module"
    gating: str = "none"
    gate_first: bool = True
    sequential: bool = False
    bias: bool = True
    model_dim: int = 16
    hidden_size: int = 32
    seq_len: int = 8
    batch: int = 2
    seed: int = 0

    def expected(self) -> dict[str, Any]:
        return {
            "activation": self.activation,
            "gated": self.gating != "none",
            "hidden_size": self.hidden_size,
            "model_dim": self.model_dim,
        }


class GrammarFFN(nn.Module):
    """A feed-forward block spelled the way its :class:`FFNChoices` say."""

    def __init__(self, choices: FFNChoices) -> None:
        super().__init__()
        c = self.choices = choices
        d, f = c.model_dim, c.hidden_size
        if c.sequential:
            act = _ACT_MODULES[c.activation]()
            self.net = nn.Sequential(
                nn.Linear(d, f, bias=c.bias), act, nn.Linear(f, d, bias=c.bias)
            )
            return
        if c.gating == "fused-chunk":
            self.gate_up = nn.Linear(d, 2 * f, bias=c.bias)
        else:
            self.up = nn.Linear(d, f, bias=c.bias)
        if c.gating == "separate":
            self.gate = nn.Linear(d, f, bias=c.bias)
        self.down = nn.Linear(f, d, bias=c.bias)
        if c.spelling == "module":
            self.act = _ACT_MODULES[c.activation]()
        else:
            self.act_fn = (_ACT_FUNCTIONS if c.spelling == "functional" else _ACT_MANUAL)[
                c.activation
            ]

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) if self.choices.spelling == "module" else self.act_fn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.choices
        if c.sequential:
            return self.net(x)
        if c.gating == "none":
            return self.down(self._act(self.up(x)))
        if c.gating == "separate":
            return self.down(self._act(self.gate(x)) * self.up(x))
        first, second = self.gate_up(x).chunk(2, dim=-1)
        gate, up = (first, second) if c.gate_first else (second, first)
        return self.down(self._act(gate) * up)

    def _weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None] | None]:
        """``(weight, bias)`` of the up, gate (``None`` when ungated) and down projections."""
        c, lin = self.choices, lambda m: (m.weight, m.bias)
        if c.sequential:
            return {"up": lin(self.net[0]), "gate": None, "down": lin(self.net[2])}
        if c.gating != "fused-chunk":
            gate = lin(self.gate) if c.gating == "separate" else None
            return {"up": lin(self.up), "gate": gate, "down": lin(self.down)}
        w, b, f = self.gate_up.weight, self.gate_up.bias, c.hidden_size
        halves = [(w[:f], None if b is None else b[:f]), (w[f:], None if b is None else b[f:])]
        gate, up = halves if c.gate_first else halves[::-1]
        return {"up": up, "gate": gate, "down": lin(self.down)}

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same FFN from plain ``F.linear`` calls and the canonical activation."""
        w, act = self._weights(), _ACT_FUNCTIONS[self.choices.activation]
        if w["gate"] is None:
            hidden = act(F.linear(x, *w["up"]))
        else:
            hidden = act(F.linear(x, *w["gate"])) * F.linear(x, *w["up"])
        return F.linear(hidden, *w["down"])


def ffn_program(choices: FFNChoices) -> Program:
    """Build the module and example input of one FFN-grammar sentence.

    Args:
        choices: the sentence.

    Returns:
        A :class:`Program`: an eval-mode module, ``(x,)`` with ``x: [batch, seq_len, model_dim]``,
        and the FFN-site fields detection must report.
    """
    module = _seeded_module(lambda: GrammarFFN(choices), choices.seed)
    gen = torch.Generator().manual_seed(choices.seed)
    x = torch.randn(choices.batch, choices.seq_len, choices.model_dim, generator=gen)
    return Program(choices, module, (x,), choices.expected())
