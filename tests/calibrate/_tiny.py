"""A tiny causal LM and a hand-made "rewritten" student for calibration tests (no rewriter needed).

The teacher runs exact softmax attention (``SdpaAttention``) in each block. The student is a deep
copy whose attention cores are :class:`TinyLinearCore` (linear attention with a learnable per-head
feature map: new parameters) and, optionally, whose MLPs are :class:`TinyLowRankFFN` cores; it
carries a hand-made ``swapformer_report`` like the one ``swapformer.rewrite`` attaches.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from torch import nn

from swapformer.rewriter.report import Replacement, RewriteReport
from swapformer.sites import AttentionSite, FFNSite, ProjectionRef
from swapformer.targets.base import TargetModule
from swapformer.targets.sdpa import SdpaAttention

VOCAB, D, HEADS, LAYERS = 64, 32, 4, 2


class TinyLinearCore(TargetModule):
    """Causal linear attention, φ(x) = softmax(x W_h) over features (Hedgehog-like)."""

    site_kind = "attention"

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        eye = torch.eye(head_dim).expand(heads, head_dim, head_dim)
        self.feature = nn.Parameter(eye + 0.05 * torch.randn(heads, head_dim, head_dim))
        self.poison: set[int] | None = None  # forward-call indices that return NaN (fault injection)
        self.calls = 0

    def forward(self, q, k, v, bias=None, *, hidden=None):
        fq = torch.softmax(torch.einsum("bhtd,hde->bhte", q, self.feature), dim=-1)
        fk = torch.softmax(torch.einsum("bhtd,hde->bhte", k, self.feature), dim=-1)
        t = q.shape[-2]
        a = (fq @ fk.transpose(-1, -2)) * torch.ones(t, t, device=q.device).tril()
        out = (a / a.sum(-1, keepdim=True)) @ v
        if self.poison is not None and self.calls in self.poison:
            out = out * float("nan")
        self.calls += 1
        return out


class TinyLowRankFFN(TargetModule):
    """An FFN replacement with new parameters: x ↦ gelu(x A) B."""

    site_kind = "ffn"

    def __init__(self, d: int, rank: int = 8) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(d, rank) / d**0.5)
        self.b = nn.Parameter(torch.zeros(rank, d))

    def forward(self, x):
        return F.gelu(x @ self.a) @ self.b


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.core: nn.Module = SdpaAttention(heads, heads, (d // heads) ** -0.5, causal=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp: nn.Module = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        a = self.core(split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)), None, hidden=h)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = VOCAB, d: int = D, heads: int = HEADS, layers: int = LAYERS) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _attention_site(i: int) -> AttentionSite:
    p = f"blocks.{i}"
    return AttentionSite(
        kind="attention", name=f"{p}:0", module=p, module_type="Block", num_heads=HEADS,
        num_kv_heads=HEADS, head_dim=D // HEADS, value_dim=D // HEADS, scale=(D // HEADS) ** -0.5,
        causal=True, mask="causal", q_proj=ProjectionRef(f"{p}.q_proj.weight"),
        k_proj=ProjectionRef(f"{p}.k_proj.weight"), v_proj=ProjectionRef(f"{p}.v_proj.weight"),
        o_proj=ProjectionRef(f"{p}.o_proj.weight"), form="sdpa",
    )


def _ffn_site(i: int) -> FFNSite:
    p = f"blocks.{i}.mlp"
    return FFNSite(
        kind="ffn", name=f"{p}:0", module=p, module_type="Sequential", activation="gelu",
        hidden_size=4 * D, model_dim=D, up_proj=ProjectionRef(f"{p}.0.weight", f"{p}.0.bias"),
        down_proj=ProjectionRef(f"{p}.2.weight", f"{p}.2.bias"), form="linear-act-linear",
    )


def make_pair(seed: int = 0, *, ffn: bool = False) -> tuple[TinyLM, TinyLM]:
    """(student, teacher): the student has linear-attention cores (and low-rank FFN cores)."""
    torch.manual_seed(seed)
    teacher = TinyLM().eval()
    student = copy.deepcopy(teacher)
    report = RewriteReport(target="tiny")
    for i, block in enumerate(student.blocks):
        block.core = TinyLinearCore(HEADS, D // HEADS)
        site = _attention_site(i)
        report.sites.append(site)
        report.replaced.append(Replacement(site, "tiny", "TinyLinearCore", f"blocks.{i}.core", "module"))
        if ffn:
            block.mlp = TinyLowRankFFN(D)
            site = _ffn_site(i)
            report.sites.append(site)
            report.replaced.append(Replacement(site, "tiny", "TinyLowRankFFN", f"blocks.{i}.mlp", "module"))
    student.swapformer_report = report
    return student, teacher


def token_data(n_docs: int = 24, length: int = 100, seed: int = 0) -> list[torch.Tensor]:
    """Documents from a fixed random bigram chain, so there is structure to learn."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(0, VOCAB, (VOCAB, 3), generator=gen)
    docs = []
    for _ in range(n_docs):
        tok = int(torch.randint(0, VOCAB, (1,), generator=gen))
        doc = [tok]
        for _ in range(length - 1):
            tok = int(table[tok, int(torch.randint(0, 3, (1,), generator=gen))])
            doc.append(tok)
        docs.append(torch.tensor(doc))
    return docs


def job() -> dict:
    """Factory for ``python -m swapformer.calibrate --job tests/calibrate/_tiny.py:job``."""
    student, teacher = make_pair(int(os.environ.get("TINY_SEED", "0")))
    return {"student": student, "teacher": teacher, "data": token_data()}
