"""Masks described for every length, never from one example.

A fixed mask (built from sizes, buffers and constants, not from the caller's data) may equal "causal"
or "no mask" at the example length and something else at another: a sliding window wider than the
example, a chunked-local or a band mask. The probe run sees one length only, so before a mask is
dropped in favour of a plain causal / windowed / unmasked core it is rebuilt from the graph's own
construction at other lengths: the nodes that compute it are re-run with every symbolic size that the
score shape depends on set to each candidate length (export's symbolic shapes say which sizes those are
and which lengths the model accepts). Only a pattern that holds at every length that could be built is
kept; otherwise the mask stays an explicit tensor computed by the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import sympy
import torch
import torch.fx as fx

from swapformer.patterns.match import Graph

log = logging.getLogger(__name__)

NEG_LARGE = -1e4  # fills at or below this are masks: exp() of them underflows to 0 in the softmax
# other lengths to rebuild a fixed mask at: small ones, around powers of two (chunk sizes, windows)
CANDIDATE_LENGTHS = (2, 3, 5, 7, 17, 33, 63, 65, 100, 129, 257, 513, 1025, 2049, 4097)

Pattern = tuple[bool, int | None]  # (causal, window); (False, None) is "no mask"


def keep_pattern(tq: int, tk: int, causal: bool, window: int | None) -> torch.Tensor:
    """Bool ``[Tq, Tk]``, True where a query may attend: bottom-right aligned like the cores."""
    if not causal:
        return torch.ones(tq, tk, dtype=torch.bool)
    i = torch.arange(tq)[:, None] + (tk - tq)
    j = torch.arange(tk)[None, :]
    keep = j <= i
    return keep & (i - j < window) if window is not None else keep


def pattern_of(bias: torch.Tensor, tq: int, tk: int) -> Pattern | None:
    """The (causal, window) a pure ``-inf``/0 mask is *exactly*, or None (values, holes, per-head)."""
    masked = bias <= NEG_LARGE
    if bool((bias.masked_fill(masked, 0) != 0).any()):
        return None
    if masked.dim() < 2 or masked.shape[-2:] not in ((tq, tk), (1, tk), (tq, 1), (1, 1)):
        return (False, None) if not bool(masked.any()) else None
    planes = masked.expand(*masked.shape[:-2], tq, tk).reshape(-1, tq, tk)
    if not bool((planes == planes[:1]).all()):
        return None
    keep = ~planes[0]
    if bool(keep.all()):
        return False, None
    if torch.equal(keep, keep_pattern(tq, tk, True, None)):
        return True, None
    i = torch.arange(tq)[:, None] + (tk - tq)
    j = torch.arange(tk)[None, :]
    reach = int((i - j).expand_as(keep).masked_fill(~keep, -1).max())
    window = reach + 1
    return (True, window) if torch.equal(keep, keep_pattern(tq, tk, True, window)) else None


def symbolic_shape(node: Any) -> tuple[Any, ...] | None:
    """The shape of ``node`` with symbolic sizes (export's ``val`` or Dynamo's ``example_value``)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val", node.meta.get("example_value"))
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _expr(size: Any) -> sympy.Expr:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def same_size(a: Any, b: Any) -> bool:
    """Whether two (possibly symbolic) sizes are equal for every input the graph accepts."""
    return bool(sympy.simplify(_expr(a) - _expr(b)) == 0)


def _shape_env(sizes: tuple[Any, ...]) -> Any:
    return next((s.node.shape_env for s in sizes if isinstance(s, torch.SymInt)), None)


def length_assignments(sizes: tuple[Any, ...]) -> Iterator[dict[sympy.Symbol, int]]:
    """Values for the free symbols of ``sizes`` (the score's Tq, Tk), within the ranges export proved."""
    symbols = sorted({s for size in sizes for s in _expr(size).free_symbols}, key=str)
    env = _shape_env(sizes)
    for length in sorted({*CANDIDATE_LENGTHS, *_upper_bounds(env, symbols)}):
        subs = {sym: length + 3 * n for n, sym in enumerate(symbols)}
        if env is None or all(_in_range(env, sym, v) for sym, v in subs.items()):
            yield subs


def _upper_bounds(env: Any, symbols: list[sympy.Symbol]) -> list[int]:
    """The longest lengths the model accepts (a buffer of 32 positions: 32), where export proved one:
    a window wider than every candidate below it is only visible there."""
    if env is None:
        return []
    uppers = [env.var_to_range[s].upper for s in symbols if s in env.var_to_range]
    return [int(u) - 3 * n for n, u in enumerate(uppers) if getattr(u, "is_Integer", False)]


def _in_range(env: Any, sym: sympy.Symbol, value: int) -> bool:
    vr = env.var_to_range.get(sym)
    return vr is None or bool(vr.lower <= value <= vr.upper)


def size_at(size: Any, subs: dict[sympy.Symbol, int]) -> int:
    return int(_expr(size).xreplace(subs))


class AtLength:
    """Re-runs the nodes that compute a fixed mask with the symbolic sizes set to other values.

    Only for nodes that do not depend on the caller's data: placeholders and attributes read their
    probe value, sizes come from ``subs``, everything else is called again.
    """

    def __init__(self, g: Graph, subs: dict[sympy.Symbol, int]) -> None:
        self.g, self.subs = g, subs
        self.cache: dict[fx.Node, Any] = {}

    def value(self, node: Any) -> Any:
        return fx.node.map_aggregate(node, self._one)

    def _one(self, node: Any) -> Any:
        if not isinstance(node, fx.Node):
            return node
        if node not in self.cache:
            self.cache[node] = self._compute(node)
        return self.cache[node]

    def _compute(self, node: fx.Node) -> Any:
        meta = node.meta.get("val", node.meta.get("example_value"))
        if isinstance(meta, torch.SymInt):
            return size_at(meta, self.subs)
        if node.op in ("placeholder", "get_attr"):
            return self.g.value(node)
        args, kwargs = self.value(node.args), self.value(node.kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.g.gm.get_submodule(node.target)(*args, **kwargs)
        raise ValueError(f"cannot re-run {node.op} node {node.name}")


__all__ = ["AtLength", "keep_pattern", "length_assignments", "pattern_of", "same_size", "symbolic_shape"]
