"""FFN detection: ``down(act(up(x)))`` and gated ``down(act(gate(x)) * up(x))``.

A candidate is every linear (the down projection). Walking back from its input through elementwise
ops only, the region must end at one or two linears fed by the same ``x`` (a fused gate/up linear is
one linear split by ``chunk``/``split``), contain a nonlinearity, and keep its intermediates to itself.
The activation is named from the ops in the region, so manual spellings (GPT-2's tanh formula,
``x * sigmoid(x)``) are recognised as well as ``F.gelu``/``F.silu``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from swapformer.patterns.match import Graph, NoMatch
from swapformer.patterns.ops import ACTIVATIONS, ELEMENTWISE_OPS, arg
from swapformer.patterns.projections import _is_linear, _unview, linear_parts

_REGION_OPS = ELEMENTWISE_OPS | frozenset({"getitem", "split", "chunk", "view"})


@dataclass
class FFNMatch:
    down: fx.Node
    x: fx.Node
    up: fx.Node
    gate: fx.Node | None = None
    gate_rows: tuple[int, int] | None = None
    up_rows: tuple[int, int] | None = None
    activation: str = ""
    hidden_size: int = 0
    region: set[fx.Node] = field(default_factory=set)


def find_ffn(g: Graph) -> list[FFNMatch]:
    matches = []
    for node in g.gm.graph.nodes:
        if _is_linear(g, node):
            m = match_ffn(g, node)
            if m:
                matches.append(m)
    return matches


def _region(g: Graph, start: fx.Node) -> tuple[set[fx.Node], list[fx.Node]] | NoMatch:
    region, sources, frontier = set(), [], [start]
    while frontier:
        node = frontier.pop()
        if node in region or node in sources:
            continue
        if _is_linear(g, node):
            sources.append(node)
            continue
        if g.op(node) not in _REGION_OPS:
            return NoMatch("%s (%s) is not elementwise", node.name, g.op(node) or node.target)
        region.add(node)
        frontier += node.all_input_nodes
        if len(region) > 40:
            return NoMatch("region too large")
    return region, sources


def match_ffn(g: Graph, down: fx.Node) -> FFNMatch | NoMatch:
    parts = linear_parts(g, down)
    if parts is None:
        return NoMatch("not a linear")
    found = _region(g, _unview_to(g, parts[0]))
    if not found:
        return found
    region, sources = found
    act = activation_name(g, region)
    if not region or not act or not 1 <= len(sources) <= 2:
        return NoMatch("no activation between two linears")
    inputs = {_unview(g, linear_parts(g, s)[0]) for s in sources}
    if len(inputs) != 1 or not _contained(region, sources, down):
        return NoMatch("sources differ or intermediates escape")
    x = inputs.pop()
    m = FFNMatch(down=down, x=x, up=sources[0], activation=act, region=region)
    return _assign_branches(g, m, sources)


def _unview_to(g: Graph, node: fx.Node) -> fx.Node:
    return _unview(g, node) if g.op(node) == "view" else node


def _contained(region: set[fx.Node], sources: list[fx.Node], down: fx.Node) -> bool:
    inside = region | {down}
    return all(set(n.users) <= inside for n in region | set(sources))


def _assign_branches(g: Graph, m: FFNMatch, sources: list[fx.Node]) -> FFNMatch | NoMatch:
    if len(sources) == 2:
        gate = next((s for s in sources if _feeds_activation(g, s, m.region)), sources[0])
        m.gate, m.up = gate, next(s for s in sources if s is not gate)
        m.hidden_size = g.shape(m.up)[-1]
        return m
    splits = [n for n in m.region if g.op(n) in ("chunk", "split")]
    width = g.shape(sources[0])[-1]
    if not splits:
        m.hidden_size = width
        return m
    pieces = [u for u in splits[0].users if g.op(u) == "getitem"]
    if len(pieces) != 2:
        return NoMatch("fused gate/up split into %d pieces", len(pieces))
    half = width // 2
    gate_piece = next((p for p in pieces if _piece_feeds_activation(g, p, m.region)), pieces[0])
    gate_idx = gate_piece.args[1]
    m.gate, m.hidden_size = sources[0], half
    m.gate_rows = (gate_idx * half, (gate_idx + 1) * half)
    m.up_rows = ((1 - gate_idx) * half, (2 - gate_idx) * half)
    return m


def _feeds_activation(g: Graph, source: fx.Node, region: set[fx.Node]) -> bool:
    return any(_piece_feeds_activation(g, u, region) for u in source.users if u in region)


def _piece_feeds_activation(g: Graph, node: fx.Node, region: set[fx.Node], depth: int = 6) -> bool:
    if g.op(node) in ACTIVATIONS:
        return True
    if depth == 0 or g.op(node) == "mul" and _is_gate_product(g, node, region):
        return False
    return any(_piece_feeds_activation(g, u, region, depth - 1) for u in node.users if u in region)


def _is_gate_product(g: Graph, node: fx.Node, region: set[fx.Node]) -> bool:
    """A mul of two region tensors that are not the same branch (x * sigmoid(x) is one branch)."""
    a, b = node.args[0], node.args[1]
    return isinstance(a, fx.Node) and isinstance(b, fx.Node) and g.op(a) not in ACTIVATIONS and g.op(b) not in ACTIVATIONS


def activation_name(g: Graph, region: set[fx.Node]) -> str:
    ops = {g.op(n) for n in region}
    if "gelu" in ops:
        gelu = next(n for n in region if g.op(n) == "gelu")
        return "gelu_tanh" if arg(gelu, 1, "approximate", "none") == "tanh" else "gelu"
    if "tanh" in ops and "pow" in ops:
        return "gelu_tanh"
    if "erf" in ops:
        return "gelu"
    if "silu" in ops or ("sigmoid" in ops and "mul" in ops):
        return "silu"
    if "relu" in ops:
        return "relu"
    if "tanh" in ops:
        return "tanh"
    if "sigmoid" in ops:
        return "sigmoid"
    return ""
