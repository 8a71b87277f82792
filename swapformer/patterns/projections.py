"""Find the host's linear projections around a site, named by parameter FQNs.

From ``q``/``k``/``v`` the walk goes backwards through data movement and the position-wise ops that sit
between a projection and the product in real models (RoPE: mul/add/neg/cat; per-head norms: pow/mean/
rsqrt or fused norm ops) until it reaches a linear (``aten.linear``, ``F.linear``, an ``nn.Linear`` leaf,
or GPT-2's ``addmm`` with an ``[in, out]`` weight).
"""

from __future__ import annotations

import torch.fx as fx

from swapformer.patterns.match import Graph
from swapformer.patterns.ops import SHAPE_OPS
from swapformer.sites import ProjectionRef

_BETWEEN = SHAPE_OPS | frozenset({"mul", "add", "sub", "neg", "cat", "stack", "pow", "mean", "rsqrt",
                                  "sqrt", "div", "rms_norm", "layer_norm", "view_as_complex"})
_LINEAR = frozenset({"linear", "addmm"})


def _is_linear(g: Graph, node: fx.Node) -> bool:
    return g.op(node) in _LINEAR


def linear_parts(g: Graph, node: fx.Node) -> tuple[fx.Node, str | None, str | None, bool] | None:
    """(input node, weight FQN, bias FQN, transposed) of a linear node, None if weights are not params."""
    if node.op == "call_module":
        mod = g.gm.get_submodule(node.target)
        bias = f"{node.target}.bias" if getattr(mod, "bias", None) is not None else None
        return node.args[0], f"{node.target}.weight", bias, False
    if g.op(node) == "linear":
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return x, g.param_name(w), g.param_name(b), False
    bias, x, w = node.args[:3]  # addmm(bias, x, w) with w: [in, out]
    return _unview(g, x), g.param_name(w), g.param_name(bias), True


def _unview(g: Graph, node: fx.Node) -> fx.Node:
    while g.op(node) == "view" and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def find_projection(g: Graph, node: fx.Node, limit: int = 48) -> tuple[fx.Node, list[fx.Node]] | None:
    """The nearest linear feeding ``node`` and the nodes on the way (excluding the linear)."""
    frontier, seen, path = [node], set(), []
    while frontier and len(seen) < limit:
        cur = frontier.pop(0)
        if cur in seen:
            continue
        seen.add(cur)
        if _is_linear(g, cur):
            return cur, path
        path.append(cur)
        if g.op(cur) in _BETWEEN:
            frontier += cur.all_input_nodes
    return None


def projection_ref(g: Graph, linear: fx.Node, rows: tuple[int, int] | None) -> ProjectionRef | None:
    parts = linear_parts(g, linear)
    if parts is None or parts[1] is None:
        return None
    _, weight, bias, transposed = parts
    out_features = g.value(linear).shape[-1]
    if rows is not None and rows == (0, out_features):
        rows = None
    return ProjectionRef(weight=weight, bias=bias, rows=rows, transposed=transposed)


def path_flags(g: Graph, path: list[fx.Node]) -> tuple[bool, bool]:
    """(rope, qk_norm) from the ops between a projection and the product."""
    ops = {g.op(n) for n in path}
    rope = "view_as_complex" in ops or ("neg" in ops and "mul" in ops) or ("cat" in ops and "mul" in ops and "add" in ops)
    norm = bool(ops & {"rms_norm", "layer_norm", "rsqrt"})
    return rope, norm


def find_out_projection(g: Graph, out: fx.Node, limit: int = 12) -> ProjectionRef | None:
    """The linear that consumes the attention output after the heads are merged back."""
    node = out
    for _ in range(limit):
        users = list(node.users)
        linear = [u for u in users if _is_linear(g, u) and _input_of(g, u) is node]
        if linear:
            return projection_ref(g, linear[0], None)
        movers = [u for u in users if g.op(u) in SHAPE_OPS]
        if len(movers) != 1:
            return None
        node = movers[0]
    return None


def _input_of(g: Graph, linear: fx.Node) -> fx.Node:
    if linear.op == "call_module" or g.op(linear) == "linear":
        return linear.args[0]
    return linear.args[1]  # addmm(bias, x, w): x, possibly a view of ``node``; compared below


__all__ = ["find_out_projection", "find_projection", "linear_parts", "path_flags", "projection_ref"]
