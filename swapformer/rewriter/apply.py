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

from swapformer.patterns.attention import AttentionMatch, has_mask, temperatures, top_left_keep
from swapformer.patterns.ffn import FFNMatch
from swapformer.patterns.match import Graph, MaskStep, overwrites_private
from swapformer.patterns.ops import arg, canonical

_TUPLE_DROPOUTS = frozenset({torch.ops.aten.native_dropout.default})  # return (out, mask): left alone


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


def _top_left(b: torch.Tensor, q: torch.Tensor, k: torch.Tensor, fill: float) -> torch.Tensor:
    keep = top_left_keep(q.shape[-2], k.shape[-2], b.device)
    return torch.where(keep, b, torch.tensor(fill, dtype=b.dtype, device=b.device))


def _apply_step(graph: fx.Graph, b: fx.Node, step: MaskStep, qk: tuple[fx.Node, fx.Node]) -> fx.Node:
    if step.kind == "keep-top-left":
        return graph.call_function(_top_left, (b, *qk, step.value))
    if step.kind == "view":
        shape = step.node.args[1] if isinstance(step.node.args[1], (list, tuple)) else step.node.args[1:]
        return graph.call_function(torch.reshape, (b, tuple(shape)))
    if step.kind == "scale":
        return graph.call_function(operator.mul, (b, step.value))
    if step.kind == "temp":
        return graph.call_function(operator.mul, (b, step.node))
    if step.kind == "add":
        return graph.call_function(operator.add, (b, step.node if step.node is not None else step.value))
    if step.kind == "sub":
        return graph.call_function(operator.sub, (b, step.node))
    if step.kind == "fill":
        return graph.call_function(torch.masked_fill, (b, step.node, step.value))
    return graph.call_function(torch.where, (step.node, b, step.value))


def _with_sink_column(b: torch.Tensor, q: torch.Tensor, k: torch.Tensor, sink: torch.Tensor
                      ) -> torch.Tensor:
    # the bias over every key, then the sink logit as the score of one more key
    full = b.expand(*q.shape[:-1], k.shape[-2])
    return torch.cat([full, sink.to(b.dtype).expand(*q.shape[:-1], 1)], dim=-1)


def _zero_row(x: torch.Tensor) -> torch.Tensor:
    """``x`` with one more position of zeros along the keys: the sink's key and (zero) value."""
    return torch.cat([x, x.new_zeros((*x.shape[:-2], 1, x.shape[-1]))], dim=-2)


def _bias(graph: fx.Graph, m: AttentionMatch, qk: tuple[fx.Node, fx.Node]) -> fx.Node | None:
    if m.sink is not None:
        b = _mask_bias(graph, m, qk) if has_mask(m) else graph.call_function(_scalar_zero, (m.q, m.score_dtype))
        return graph.call_function(_with_sink_column, (b, *qk, m.sink))
    if m.drop_mask or not has_mask(m):
        return None
    return _mask_bias(graph, m, qk)


def _mask_bias(graph: fx.Graph, m: AttentionMatch, qk: tuple[fx.Node, fx.Node]) -> fx.Node:
    views = any(s.kind == "view" for s in m.steps)
    if views:
        b = graph.call_function(_scores_zero, (m.q, m.k, m.k_transposed, m.score_dtype))
    else:
        b = graph.call_function(_scalar_zero, (m.q, m.score_dtype))
    for step in m.steps:
        b = _apply_step(graph, b, step, qk)
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
        for temperature in temperatures(m):  # read live from the graph: it follows training
            q = graph.call_function(operator.mul, (q, temperature))
        k = graph.call_function(torch.transpose, (m.k, -2, -1)) if m.k_transposed else m.k
        k = _permute(graph, k, m.k_perm)
        v = _permute(graph, m.v, m.v_perm)
        kwargs = {"hidden": m.hidden} if m.hidden is not None else {}
        bias = _bias(graph, m, (q, k))
        if m.sink is not None:
            k, v = graph.call_function(_zero_row, (k,)), graph.call_function(_zero_row, (v,))
        out = graph.call_module(name, (q, k, v, bias), kwargs)
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


_METADATA_ASSERTS = frozenset({torch.ops.aten._assert_tensor_metadata.default})


_INPLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift,
})


def writes_in_place(node: fx.Node) -> bool:
    """Whether ``node`` writes into one of its operands (``x.add_(1)``, ``x += 1``, ``aten.copy_``)."""
    if node.op == "call_method":
        return isinstance(node.target, str) and node.target.endswith("_") and not node.target.startswith("_")
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_OPERATORS:
        return True
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _is_impure(node: fx.Node) -> bool:
    # Random ops (dropout, the replaced SDPA call with its dropout_p) have no effect once nothing reads
    # their result; FX keeps them by default and with them the whole old QKᵀ -> softmax chain. So is an
    # in-place op on an intermediate only it reads (``scores += bias`` of a replaced site). Any other
    # in-place op stays even when nothing reads its result: FX would drop ``x.add_(1)`` on a buffer or
    # an input (a BatchNorm's ``num_batches_tracked`` in Dynamo's and symbolic_trace's graphs).
    if not node.users and writes_in_place(node):
        return not overwrites_private(node)
    return node.is_impure(impure_random=False)


def _dead_asserts(graph: fx.Graph) -> list[fx.Node]:
    """Metadata asserts (export's ``.to()`` checks) on values nothing else reads any more."""
    dead = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _METADATA_ASSERTS and node.args:
            checked = node.args[0]
            if isinstance(checked, fx.Node) and all(u.target in _METADATA_ASSERTS for u in checked.users):
                dead.append(node)
    return dead


def remove_dead_code(graph: fx.Graph) -> None:
    """Dead-code elimination that also drops unread random ops and asserts on dead values."""
    changed = True
    while changed:
        changed = graph.eliminate_dead_code(is_impure_node=_is_impure)
        for node in _dead_asserts(graph):
            graph.erase_node(node)
            changed = True


def _dropout_args(node: fx.Node) -> tuple[fx.Node, float] | None:
    """(input, p) of a functional dropout node whose training flag was fixed when it was traced."""
    if node.op != "call_function" or canonical(node) != "dropout" or node.target in _TUPLE_DROPOUTS:
        return None
    p = arg(node, 1, "p", 0.5)
    x = node.args[0] if node.args else node.kwargs.get("input")
    return (x, float(p)) if isinstance(x, fx.Node) and isinstance(p, (int, float)) else None


def follow_training_mode(gm: fx.GraphModule) -> fx.GraphModule:
    """Make every functional dropout of a captured graph follow ``gm.train()`` / ``gm.eval()``.

    Capture freezes the mode of the moment into each dropout call (``aten.dropout(x, p, train)``), so a
    model rewritten in train mode would stay random after ``.eval()`` and one rewritten in eval mode
    would lose its dropout in ``.train()``. Each becomes an ``nn.Dropout(p)`` submodule; ``p = 0`` ones
    are identities and go.
    """
    for node in list(gm.graph.nodes):
        found = _dropout_args(node)
        if found is None:
            continue
        x, p = found
        if p == 0.0:
            node.replace_all_uses_with(x)
        else:
            name = f"swapformer_dropouts.{node.name}"
            gm.add_submodule(name, nn.Dropout(p))
            with gm.graph.inserting_before(node):
                node.replace_all_uses_with(gm.graph.call_module(name, (x,)))
        gm.graph.erase_node(node)
    return gm


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    remove_dead_code(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm
