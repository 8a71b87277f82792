"""Plain-data descriptions of the attention and FFN sites found in a model's graph.

A site is what a detector read off the captured graph: enough to rebuild the computation with another
implementation (the ``"sdpa"`` target is the proof that the description is right) and handles to the
host's weights by their qualified parameter names, so targets can copy them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

MaskKind = Literal["none", "causal", "padding", "bias"]


@dataclass(frozen=True)
class ProjectionRef:
    """A linear projection of the host, named by parameter FQNs.

    ``rows`` selects the slice of the weight's output rows that belongs to this projection when the
    host fuses several projections into one Linear (a fused qkv, a fused gate/up).
    """

    weight: str
    bias: str | None = None
    rows: tuple[int, int] | None = None
    transposed: bool = False  # weight stored as [in, out] (GPT-2 Conv1D); rows then index columns

    @property
    def fused(self) -> bool:
        return self.rows is not None


@dataclass(frozen=True)
class Site:
    """Common fields of every detected site.

    ``name`` is stable across runs: the owning module's qualified name, ``:``, and the index of the
    site among that module's sites of the same kind (``"model.layers.0.self_attn:0"``).
    """

    kind: Literal["attention", "ffn"]
    name: str
    module: str  # qualified name of the innermost module that owns the site ("" for the root)
    module_type: str  # class name of that module


@dataclass(frozen=True)
class AttentionSite(Site):
    """A softmax attention: ``softmax(scale * q kᵀ + bias) v`` over per-head tensors.

    Shapes use the head layout ``q: [B, H, Tq, D]``, ``k, v: [B, Hkv, Tk, D]``.
    """

    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    value_dim: int = 0
    scale: float = 1.0
    causal: bool = False
    window: int | None = None  # keys visible to a query: i - window < j <= i
    mask: MaskKind = "none"
    cross: bool = False
    rope: bool = False
    qk_norm: bool = False
    dropout: float = 0.0
    softcap: float | None = None
    q_proj: ProjectionRef | None = None
    k_proj: ProjectionRef | None = None
    v_proj: ProjectionRef | None = None
    o_proj: ProjectionRef | None = None
    form: str = ""  # how the source spelled it, for reports: "sdpa", "matmul-softmax", "mha", ...
    notes: tuple[str, ...] = field(default_factory=tuple)
    refused: str | None = None  # why no target may replace it (a form detection cannot describe exactly)

    @property
    def gqa_groups(self) -> int:
        return self.num_heads // max(self.num_kv_heads, 1)


@dataclass(frozen=True)
class FFNSite(Site):
    """A position-wise feed-forward block: ``down(act(up(x)) [* gate(x)])``."""

    activation: str = ""  # "gelu", "gelu_tanh", "relu", "silu", "tanh", "other"
    gated: bool = False
    hidden_size: int = 0
    model_dim: int = 0
    up_proj: ProjectionRef | None = None
    gate_proj: ProjectionRef | None = None  # the branch that goes through the activation when gated
    down_proj: ProjectionRef | None = None
    form: str = ""
