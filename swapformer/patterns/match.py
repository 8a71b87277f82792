"""Matcher primitives shared by the attention and FFN detectors.

A detector returns a :class:`Match` (the nodes it consumed, the values it read) or a falsy
:class:`NoMatch` carrying the reason, rendered lazily, in the style of Inductor's ``FailedMatch``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from swapformer.patterns.ops import INPLACE, arg, canonical, is_scalar


class NoMatch:
    """Why a candidate is not a site. Falsy, so ``if not match:`` reads naturally."""

    def __init__(self, fmt: str, *args: Any) -> None:
        self.fmt = fmt
        self.args = args

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.fmt % self.args if self.args else self.fmt

    __repr__ = __str__


@dataclass
class MaskStep:
    """One elementwise op between the q·kᵀ product and the softmax.

    ``kind``: ``scale`` (multiply by ``value``), ``add`` (add tensor ``node``), ``fill`` (set to ``value``
    where bool ``node`` is True), ``keep`` (keep where bool ``node`` is True, else ``value``), ``view``
    (reshape like ``node``: the scores are viewed in another head layout for masking).
    """

    kind: str
    node: fx.Node | None = None
    value: float = 0.0


@dataclass
class Graph:
    """A captured graph with its probe values and helpers to read them."""

    gm: fx.GraphModule
    values: dict[str, Any] = field(default_factory=dict)
    user_inputs: frozenset[str] = frozenset()  # placeholder names fed by the caller
    param_names: dict[str, str] = field(default_factory=dict)  # placeholder name -> parameter FQN (Dynamo)

    def op(self, node: Any) -> str | None:
        return canonical(node, self.gm) if isinstance(node, fx.Node) else None

    def functional_op(self, node: Any) -> str | None:
        """Like :meth:`op`, but an in-place op that only rebinds a tensor nothing else reads
        (``scores *= s`` right after the product) reads as its functional twin."""
        op = self.op(node)
        if op in INPLACE and overwrites_private(node):
            return INPLACE[op]
        return op

    def value(self, node: Any) -> Any:
        return self.values.get(node.name) if isinstance(node, fx.Node) else node

    def shape(self, node: Any) -> tuple[int, ...] | None:
        v = self.value(node)
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None

    def param_name(self, node: Any) -> str | None:
        """The FQN of a parameter or buffer node: a ``get_attr``, or a Dynamo-lifted placeholder."""
        if not isinstance(node, fx.Node):
            return None
        if node.op == "get_attr":
            return node.target
        return self.param_names.get(node.name)

    def scalar(self, node: Any) -> float | None:
        """A Python number, or a one-element tensor computed from constants only: a buffer, a literal,
        ``torch.full([], c)``. Never a parameter (learned: its value today is not a constant) nor
        anything read from an input or a symbolic size."""
        if is_scalar(node):
            return float(node)
        if not isinstance(node, fx.Node):
            return None
        v = self.value(node)
        if not isinstance(v, torch.Tensor) or v.numel() != 1 or isinstance(v, torch.nn.Parameter):
            return None
        if self.param_name(node) is not None or self._is_constant(node):
            return float(v.item())
        return None

    def _is_constant(self, node: fx.Node) -> bool:
        return not (self.depends_on_input(node) or self.depends_on_parameter(node) or self.depends_on_size(node))

    def depends_on_input(self, node: fx.Node, limit: int = 2000) -> bool:
        """Whether ``node``'s value is data-dependent on a caller input (not only on its shape)."""
        return self._reaches(node, lambda n: n.op == "placeholder" and n.name in self.user_inputs, limit)

    def depends_on_parameter(self, node: fx.Node, limit: int = 2000) -> bool:
        """Whether ``node`` is computed from an ``nn.Parameter``: learned, whatever its value today."""
        return self._reaches(node, self.is_parameter, limit)

    def depends_on_size(self, node: fx.Node, limit: int = 2000) -> bool:
        """Whether ``node`` reads a symbolic size (its value may change with the input's shape)."""
        return self._reaches(node, _reads_size, limit, through_sizes=True)

    def is_parameter(self, node: fx.Node) -> bool:
        return self.param_name(node) is not None and isinstance(self.value(node), torch.nn.Parameter)

    def _reaches(self, node: fx.Node, hit: Any, limit: int, through_sizes: bool = False) -> bool:
        seen: set[fx.Node] = set()
        stack = [node]
        while stack and len(seen) < limit:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if hit(n):
                return True
            if not through_sizes and _reads_size(n):
                continue  # a size, not data
            stack.extend(n.all_input_nodes)
        return bool(stack)  # ran out of budget: assume it does


# ops that return a new tensor (never a view or an alias of an input): overwriting one is private
_FRESH = frozenset({"matmul", "baddbmm", "einsum", "mul", "div", "add", "sub", "neg", "masked_fill",
                    "where", "tanh"})


def overwrites_private(node: fx.Node, depth: int = 8) -> bool:
    """Whether an in-place op overwrites a fresh intermediate tensor that it alone reads (not a view,
    an input or a buffer: writing into those is seen elsewhere)."""
    target = node.args[0] if node.args else None
    if not isinstance(target, fx.Node) or len(target.users) != 1 or depth == 0:
        return False
    op = canonical(target)
    if op in INPLACE:
        return overwrites_private(target, depth - 1)
    return op in _FRESH


def _reads_size(node: fx.Node) -> bool:
    return node.op == "call_function" and "sym_size" in str(node.target)


def scalar_operand(g: Graph, node: fx.Node) -> tuple[fx.Node, float] | None:
    """For ``x * c``, ``c * x`` or ``x / c`` with scalar ``c``: (x, factor)."""
    op = g.functional_op(node)
    if op not in ("mul", "div") or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if op == "mul":
        if isinstance(a, fx.Node) and g.scalar(b) is not None:
            return a, g.scalar(b)
        if isinstance(b, fx.Node) and g.scalar(a) is not None:
            return b, g.scalar(a)
        return None
    c = g.scalar(b)
    if isinstance(a, fx.Node) and c not in (None, 0.0):
        return a, 1.0 / c
    return None


def is_last_two_swap(g: Graph, node: fx.Node) -> fx.Node | None:
    """If ``node`` swaps the last two dims of its input (transpose/permute/.t/.mT), return the input."""
    op = g.op(node)
    src = node.args[0] if node.args else None
    shape = g.shape(src)
    if not isinstance(src, fx.Node) or shape is None:
        return None
    nd = len(shape)
    if op == "transpose":
        dims = {d % nd for d in (arg(node, 1, "dim0"), arg(node, 2, "dim1"))}
        return src if dims == {nd - 2, nd - 1} else None
    if op == "permute":
        perm = arg(node, 1, "dims")
        if not isinstance(perm, (list, tuple)):
            perm = node.args[1:]
        expect = list(range(nd - 2)) + [nd - 1, nd - 2]
        return src if [p % nd for p in perm] == expect else None
    if op == "t" and nd == 2:
        return src
    return None


@dataclass
class AttentionMatch:
    """A detected core plus what the rewriter needs to splice a replacement in."""

    anchor: fx.Node  # the softmax or sdpa node
    output: fx.Node  # the node whose value is the attention output
    q: fx.Node
    k: fx.Node
    v: fx.Node
    k_transposed: bool = False  # ``k`` holds Kᵀ: the splice transposes it back
    q_perm: list[int] | None = None
    k_perm: list[int] | None = None
    v_perm: list[int] | None = None
    out_perm: list[int] | None = None
    steps: list[MaskStep] = field(default_factory=list)
    scale: float = 1.0
    score_dtype: torch.dtype = torch.float32
    score_shape: tuple[int, ...] = ()  # of the q·kᵀ product (probe)
    score_sizes: tuple | None = None  # (Tq, Tk) of the scores, symbolic where the capture says so
    dropout: float = 0.0
    dropout_active: bool = False
    softcap: float | None = None
    causal_flag: bool = False  # sdpa is_causal=True
    kv_repeat: int = 1
    form: str = ""
    # filled by describe()
    mask_kind: str = "none"
    causal: bool = False
    window: int | None = None
    drop_mask: bool = False  # the mask is exactly causal/windowed and input-free: pass None instead
    hidden: fx.Node | None = None
    notes: list[str] = field(default_factory=list)
    refused: str | None = None  # attention, but not describable exactly: reported, never replaced
    bypass: list[fx.Node] = field(default_factory=list)  # scalar muls on q/k upstream of reshapes
    sink: fx.Node | None = None  # gpt-oss sink logits: the extra score column, ``[..., Tq, 1]``


SINK_NOTE = ("sink logits: an extra key with zero value whose score is the sink; the mask reaches the "
             "core as a bias over the keys plus that column")


_STACK_PATH = re.compile(r"^L\['self'\]\.?")
_STACK_INDEX = re.compile(r"\[(?:'(\w+)'|(\d+))\]")


def module_path(path: str) -> str:
    """``L['self'].layers[0].attn`` (Dynamo) or ``layers.0.attn`` (export) -> ``layers.0.attn``."""
    path = _STACK_PATH.sub("", path)
    path = _STACK_INDEX.sub(lambda m: "." + (m.group(1) or m.group(2)), path)
    parts = [p for p in path.split(".") if p and p not in ("_modules", "_parameters", "_buffers")]
    return ".".join(parts)


def owner_module(node: fx.Node) -> tuple[str, str] | None:
    """(qualified name, class name) of the innermost module that owns ``node``, from export metadata."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    cls_name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
    return module_path(str(path)), cls_name
