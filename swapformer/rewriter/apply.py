"""Apply stage for graph captures: splice replacement cores into a captured GraphModule.

An attention core is inserted as one ``call_module`` taking ``(q, k, v, bias)`` in the head layout; the
old product→softmax→product chain loses its users and is removed by dead-code elimination. An FFN core
replaces ``down(act(up(x)))`` by ``core(x)``.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
from torch import nn

from swapformer.patterns.attention import AttentionMatch
from swapformer.patterns.ffn import FFNMatch
from swapformer.patterns.match import Graph, MaskStep


def core_attr_name(site_name: str) -> str:
    return "swapformer_cores." + re.sub(r"[^0-9a-zA-Z_]", "_", site_name)


def scalar_input(mul: fx.Node) -> fx.Node:
    """The tensor operand of ``x * c`` / ``c * x`` / ``x / c``."""
    return next(a for a in mul.args if isinstance(a, fx.Node))


def _scalar_zero(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # 0-d and on the host tensor's device: broadcasting against the mask yields the mask's shape.
    return like.new_zeros((), dtype=dtype)


def _scores_zero(q: torch.Tensor, k: torch.Tensor, k_transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    # full-size zeros: the mask steps reshape the scores, so the bias must start at their shape
    tk = k.shape[-1] if k_transposed else k.shape[-2]
    return q.new_zeros((*q.shape[:-1], tk), dtype=dtype)


def _like_scores(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return b.reshape(*q.shape[:-1], b.shape[-1])


def _apply_step(graph: fx.Graph, b: fx.Node, step: MaskStep) -> fx.Node:
    if step.kind == "view":
        shape = step.node.args[1] if isinstance(step.node.args[1], (list, tuple)) else step.node.args[1:]
        return graph.call_function(torch.reshape, (b, tuple(shape)))
    if step.kind == "scale":
        return graph.call_function(operator.mul, (b, step.value))
    if step.kind == "add":
        return graph.call_function(operator.add, (b, step.node if step.node is not None else step.value))
    if step.kind == "sub":
        return graph.call_function(operator.sub, (b, step.node))
    if step.kind == "fill":
        return graph.call_function(torch.masked_fill, (b, step.node, step.value))
    return graph.call_function(torch.where, (step.node, b, step.value))


def _bias(graph: fx.Graph, m: AttentionMatch) -> fx.Node | None:
    if m.drop_mask or not any(s.kind != "scale" for s in m.steps):
        return None
    views = any(s.kind == "view" for s in m.steps)
    if views:
        b = graph.call_function(_scores_zero, (m.q, m.k, m.k_transposed, m.score_dtype))
    else:
        b = graph.call_function(_scalar_zero, (m.q, m.score_dtype))
    for step in m.steps:
        b = _apply_step(graph, b, step)
    return graph.call_function(_like_scores, (b, m.q)) if views else b


def _permute(graph: fx.Graph, node: fx.Node, perm: list[int] | None) -> fx.Node:
    if perm is None or perm == sorted(perm):
        return node
    return graph.call_function(torch.permute, (node, perm))


def splice_attention(gm: fx.GraphModule, g: Graph, m: AttentionMatch, name: str, core: nn.Module) -> None:
    gm.add_submodule(name, core)
    graph = gm.graph
    out_dtype = g.value(m.output).dtype
    for mul in m.bypass:  # the core applies the scale: feed it the unscaled q / k
        mul.replace_all_uses_with(scalar_input(mul))
    with graph.inserting_before(m.output):
        q = _permute(graph, m.q, m.q_perm)
        k = graph.call_function(torch.transpose, (m.k, -2, -1)) if m.k_transposed else m.k
        k = _permute(graph, k, m.k_perm)
        v = _permute(graph, m.v, m.v_perm)
        kwargs = {"hidden": m.hidden} if m.hidden is not None else {}
        out = graph.call_module(name, (q, k, v, _bias(graph, m)), kwargs)
        out = _permute(graph, out, m.out_perm)
        if out_dtype != g.value(m.q).dtype:
            out = graph.call_method("to", (out, out_dtype))
    m.output.replace_all_uses_with(out)


def splice_ffn(gm: fx.GraphModule, g: Graph, f: FFNMatch, name: str, core: nn.Module) -> None:
    gm.add_submodule(name, core)
    graph = gm.graph
    with graph.inserting_before(f.down):
        out = graph.call_module(name, (f.x,))
        if len(g.shape(f.down)) != len(g.shape(f.x)):  # GPT-2 Conv1D works on [B*T, d]
            out = graph.call_function(torch.flatten, (out, 0, -2))
    f.down.replace_all_uses_with(out)


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
