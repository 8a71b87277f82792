"""Attention detection by dataflow semantics.

An attention core is ``P·V`` where ``P = softmax(f(Q·Kᵀ))`` over the last dim and ``f`` is a chain of
elementwise steps that is affine in the scores: multiplication by scalars (the scale, wherever it was
written), additive tensors (masks, ALiBi), and fills of masked positions with a very negative value.
Writing ``f(x) = a·x + f(0)`` gives the SDPA form ``softmax(a·QKᵀ + b)·V`` with ``b = f(0)``, whatever
the order and spelling of the steps. Scales on ``q`` or ``k`` before the product, casts around the
softmax, dropout on the probabilities, transposes of ``k`` and GQA head repeats are peeled off.

``F.scaled_dot_product_attention`` nodes are sites directly. Everything is read from the graph plus
the probe values of one run on the example inputs (shapes, constant masks, GQA repeats).

This module finds the cores and reads their operands; :mod:`swapformer.patterns.describe` says what a
match's score steps amount to (GQA, mask kind, causal, window at every length).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.fx as fx

from swapformer.patterns.describe import (
    broadcasts_to,
    describe,
    has_mask,
    has_views,
    mask_values,
    temperatures,
    top_left_keep,
)
from swapformer.patterns.masks import NEG_LARGE, same_size, symbolic_shape
from swapformer.patterns.match import (
    SINK_NOTE,
    AttentionMatch,
    Graph,
    MaskStep,
    NoMatch,
    is_last_two_swap,
    module_path,
    owner_module,
    scalar_operand,
)
from swapformer.patterns.ops import arg
from swapformer.patterns.projections import find_out_projection, find_projection, path_flags

log = logging.getLogger(__name__)
_PASS_PROBS = frozenset({"to", "dropout", "identity", "view", "slice"})
_PRODUCTS = frozenset({"matmul", "einsum", "baddbmm"})


def find_attention(g: Graph) -> list[AttentionMatch | tuple[fx.Node, NoMatch]]:
    """Every softmax and SDPA node, as a match or with the reason it is not attention."""
    out: list[AttentionMatch | tuple[fx.Node, NoMatch]] = []
    for node in g.gm.graph.nodes:
        op = g.op(node)
        if op == "softmax":
            m = match_softmax_attention(g, node)
        elif op == "sdpa":
            m = match_sdpa(g, node)
        else:
            continue
        if m:
            describe(g, m)
        out.append(m if m else (node, m))
    return out


def _softmax_dim_ok(g: Graph, node: fx.Node) -> bool:
    dim = arg(node, 1, "dim", -1)
    shape = g.shape(node.args[0])
    return shape is not None and isinstance(dim, int) and dim % len(shape) == len(shape) - 1


def match_softmax_attention(g: Graph, sm: fx.Node) -> AttentionMatch | NoMatch:
    if not _softmax_dim_ok(g, sm):
        return NoMatch("softmax %s is not over the last dim", sm.name)
    found = _forward_to_pv(g, sm)
    if not found:
        return found
    pv, (dropout, active) = found
    m = AttentionMatch(anchor=sm, output=pv, q=sm, k=sm, v=sm, dropout=dropout, dropout_active=active,
                       form="matmul-softmax")
    if len(sm.users) > 1:
        m.notes.append("attention probabilities are also used elsewhere (returned weights); kept for them")
    if (err := _read_pv(g, m, pv)) is not None:
        return err
    scores = _peel_sink(g, sm, m)
    if isinstance(scores, NoMatch):
        return scores
    back = _back_to_product(g, scores, m)
    if not back:
        return back
    return _read_qk(g, m, back)


def _peel_sink(g: Graph, sm: fx.Node, m: AttentionMatch) -> fx.Node | NoMatch:
    """gpt-oss: ``softmax(cat([scores, sink], -1) - shift)[..., :-1] @ v`` with one sink logit per
    head as the extra column; the shift is constant along the keys (the row max), so the softmax is
    the same without it. Returns the scores node the product walk starts from (the softmax input
    when there is no sink column)."""
    node = sm.args[0]
    cut = _column_cuts(g, sm, m.output)
    shifted = node
    if g.op(node) == "sub" and isinstance(node.args[1], fx.Node) and _last_size(g, node.args[1]) == 1:
        shifted = node.args[0]
    tensors = arg(shifted, 0, "tensors") if g.op(shifted) == "cat" else None
    dim = arg(shifted, 1, "dim", 0)
    rank = len(g.shape(shifted) or ())
    is_sink = (tensors is not None and len(tensors) == 2 and isinstance(dim, int) and rank > 0
               and dim % rank == rank - 1 and _last_size(g, tensors[1]) == 1)
    if not is_sink:
        if cut:
            return NoMatch("the probabilities of softmax %s lose key columns at %s before the value "
                           "product", sm.name, cut[0].name)
        return node
    if len(cut) != 1 or not _is_head_slice(g, cut[0]):
        return NoMatch("softmax %s runs over an extra score column that is not dropped exactly before "
                       "the value product", sm.name)
    m.sink = tensors[1]
    return tensors[0]


def _last_size(g: Graph, node: object) -> int | None:
    shape = g.shape(node) if isinstance(node, fx.Node) else None
    return shape[-1] if shape else None


def _column_cuts(g: Graph, sm: fx.Node, pv: fx.Node) -> list[fx.Node]:
    """The nodes between the softmax and the value product that change the number of key columns."""
    node = pv.args[0] if g.op(pv) == "matmul" else einsum_operands(pv)[0]
    cuts = []
    while isinstance(node, fx.Node) and node is not sm and node.args:
        after, before = _last_size(g, node), _last_size(g, node.args[0])
        if isinstance(after, int) and isinstance(before, int) and after != before:
            cuts.append(node)
        node = node.args[0]
    return cuts


def _is_head_slice(g: Graph, node: fx.Node) -> bool:
    """``[..., :-1]``: ``aten.slice(x, -1, 0, end)`` or ``x[..., :-1]`` keeping all but the last column."""
    if g.op(node) not in ("slice", "getitem") or _last_size(g, node) != _last_size(g, node.args[0]) - 1:
        return False
    rank = len(g.shape(node.args[0]))
    if g.op(node) == "slice":
        dim, start, step = arg(node, 1, "dim", 0), arg(node, 2, "start", None), arg(node, 4, "step", 1)
        return isinstance(dim, int) and dim % rank == rank - 1 and start in (None, 0) and step == 1
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    last, before = index[-1], index[:-1]
    leading = all(i is Ellipsis or i == slice(None) for i in before) and (
        Ellipsis in before or len(before) == rank - 1)
    return isinstance(last, slice) and last.start in (None, 0) and last.step in (None, 1) and leading


def _forward_to_pv(g: Graph, sm: fx.Node) -> tuple[fx.Node, tuple[float, bool]] | NoMatch:
    """The probs·values product fed by the softmax through casts, dropout and views."""
    found = _products_after(g, sm, (0.0, False), depth=6)
    if len(found) != 1:
        return NoMatch("softmax %s feeds %d value products, not one", sm.name, len(found))
    return found[0]


def _products_after(g: Graph, node: fx.Node, dropout: tuple[float, bool], depth: int
                    ) -> list[tuple[fx.Node, tuple[float, bool]]]:
    out: list[tuple[fx.Node, float]] = []
    for user in node.users:
        op = g.op(user)
        if op == "matmul" and user.args[0] is node or op == "einsum" and einsum_operands(user)[0] is node:
            out.append((user, dropout))
        elif depth > 0 and (op in _PASS_PROBS or op == "getitem"):
            p = (_dropout_p(g, user), _dropout_runs(g, user)) if op == "dropout" else dropout
            out += _products_after(g, user, p, depth - 1)
    return out


def _dropout_p(g: Graph, node: fx.Node) -> float:
    if node.op == "call_module":
        return float(g.gm.get_submodule(node.target).p)
    p = arg(node, 1, "p", 0.5)
    return float(p) if isinstance(p, (int, float)) else 0.0


def _dropout_runs(g: Graph, node: fx.Node) -> bool:
    """Whether a dropout node is active (its training flag; eval-mode dropouts stay in some graphs)."""
    if node.op == "call_module":
        return g.gm.get_submodule(node.target).training
    return arg(node, 2, "train", node.kwargs.get("training", True)) is not False


def _read_pv(g: Graph, m: AttentionMatch, pv: fx.Node) -> NoMatch | None:
    if g.op(pv) == "matmul":
        m.v = pv.args[1]
        return None
    spec = _einsum_spec(pv)
    if spec is None:
        return NoMatch("einsum %s is not a two-operand contraction", pv.name)
    (p_idx, v_idx), out_idx = spec
    # P: batch + [q, k]; V: batch + [k, d] in some order; output: batch + q + d in some order.
    batch, q_i, k_i = p_idx[:-2], p_idx[-2], p_idx[-1]
    d_i = [c for c in v_idx if c not in p_idx]
    if len(d_i) != 1 or set(v_idx) != set(batch) | {k_i, d_i[0]} or set(out_idx) != set(batch) | {q_i, d_i[0]}:
        return NoMatch("einsum %s is not probs·values", pv.name)
    m.v = einsum_operands(pv)[1]
    m.v_perm = [v_idx.index(c) for c in [*batch, k_i, d_i[0]]]
    canon = [*batch, q_i, d_i[0]]
    m.out_perm = [canon.index(c) for c in out_idx]
    return None


def einsum_operands(node: fx.Node) -> list:
    """ATen passes einsum operands as one list; torch-level graphs (Dynamo) as separate arguments."""
    return list(node.args[1]) if isinstance(node.args[1], (list, tuple)) else list(node.args[1:])


def _einsum_spec(node: fx.Node) -> tuple[tuple[str, str], str] | None:
    eq, operands = node.args[0], einsum_operands(node)
    if not isinstance(eq, str) or len(operands) != 2 or "->" not in eq or "..." in eq:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    a, b = lhs.split(",")
    return (a, b), out


def _is_large_negative(g: Graph, value: object) -> float | None:
    if isinstance(value, (int, float)):
        return float(value) if value <= NEG_LARGE else None
    v = g.value(value)
    if isinstance(v, torch.Tensor) and v.numel() > 0 and v.is_floating_point():
        top = float(v.max())
        return top if top <= NEG_LARGE else None
    return None


def _reaches_product(g: Graph, node: object, depth: int = 12) -> bool:
    if not isinstance(node, fx.Node) or depth == 0:
        return False
    op = g.functional_op(node)
    if op in _PRODUCTS:
        return True
    if op in ("to", "mul", "div", "masked_fill", "identity", "tanh", "view"):
        return _reaches_product(g, node.args[0], depth - 1)
    if op in ("add", "sub", "where"):
        return any(_reaches_product(g, a, depth - 1) for a in node.args[:3])
    return False


def _back_to_product(g: Graph, node: fx.Node, m: AttentionMatch) -> fx.Node | NoMatch:
    """Walk from the softmax input back to the q·kᵀ product, recording the steps (outermost first)."""
    steps: list[MaskStep] = []
    came_from: fx.Node | None = None
    for _ in range(24):
        op = g.functional_op(node)
        if _mutated_in_place(g, node, rebound_by=came_from):
            # training IR keeps in-place ops (``attn[..., sp:, sp:] = ...``): the dataflow would lie
            return NoMatch("the scores are modified in place at %s before the softmax", node.name)
        if op in _PRODUCTS:
            m.score_dtype = g.value(node).dtype
            m.score_shape = tuple(g.value(node).shape)
            sym = symbolic_shape(node)
            m.score_sizes = sym[-2:] if sym is not None else None
            m.steps = list(reversed(steps))
            return node
        nxt = _peel_score_step(g, node, op, steps, m)
        if isinstance(nxt, NoMatch):
            return nxt
        node, came_from = nxt, node
    return NoMatch("no q·kᵀ product found before softmax %s", m.anchor.name)


_VIEWS = frozenset({"view", "transpose", "permute", "slice", "select", "getitem", "unsqueeze", "squeeze",
                    "expand", "identity"})


def _mutated_in_place(g: Graph, node: fx.Node, depth: int = 4, rebound_by: fx.Node | None = None) -> bool:
    """Whether an in-place op writes into ``node`` or a view of it (other than ``rebound_by``, the
    in-place step of the chain that overwrites ``node`` as its only reader: ``scores += bias``)."""
    for user in node.users:
        if user is rebound_by and g.functional_op(user) != g.op(user):
            continue
        schema = getattr(user.target, "_schema", None)
        if schema is not None and schema.is_mutable and user.args and user.args[0] is node:
            return True
        if user.op == "call_method" and str(user.target).endswith("_") and user.args[0] is node:
            return True
        if depth and g.op(user) in _VIEWS and _mutated_in_place(g, user, depth - 1):
            return True
    return False


def _peel_score_step(g: Graph, node: fx.Node, op: str | None, steps: list[MaskStep],
                     m: AttentionMatch) -> fx.Node | NoMatch:
    if op in ("to", "identity"):
        return node.args[0]
    if op == "view":  # Bloom: [B*H, T, T] scores viewed as [B, H, T, T] for masking
        steps.append(MaskStep("view", node))
        return node.args[0]
    if (softcap := _softcap(g, node)) is not None:
        m.softcap, inner = softcap
        return inner
    if (sc := scalar_operand(g, node)) is not None:
        steps.append(MaskStep("scale", value=sc[1]))
        return sc[0]
    if op in ("add", "sub"):
        a, b = node.args[0], node.args[1]
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1:
            return NoMatch("%s with alpha=%s between scores and softmax", node.name, alpha)
        sign = -1.0 if op == "sub" else 1.0
        if _reaches_product(g, a) and _reaches_product(g, b):
            content = _content_product(g, a, b)
            if content is None or (content is b and op == "sub"):
                return NoMatch("%s combines two q·kᵀ-like products that both read the input "
                               "(content plus positional terms): not one product", node.name)
            if content is b:
                a, b = b, a  # TUPE: the positional product is written first
        if _reaches_product(g, a):
            steps.append(MaskStep("add", b if isinstance(b, fx.Node) else None, value=sign * _num(b)))
            if sign < 0 and isinstance(b, fx.Node):
                steps[-1] = MaskStep("sub", b)
            return a
        if op == "add" and _reaches_product(g, b):
            steps.append(MaskStep("add", a if isinstance(a, fx.Node) else None, value=_num(a)))
            return b
    if op == "masked_fill":
        fill = _is_large_negative(g, node.args[2])
        if fill is None:
            return NoMatch("masked_fill %s fills with a value that is not a mask", node.name)
        steps.append(MaskStep("fill", node.args[1], fill))
        return node.args[0]
    if op == "where" and len(node.args) == 3:
        cond, a, b = node.args
        if _reaches_product(g, a) and (fill := _is_large_negative(g, b)) is not None:
            steps.append(MaskStep("keep", cond, fill))
            return a
        if _reaches_product(g, b) and (fill := _is_large_negative(g, a)) is not None:
            steps.append(MaskStep("fill", cond, fill))
            return b
    if op == "mul" and (temp := _temperature(g, node)) is not None:
        steps.append(MaskStep("temp", temp[1]))
        return temp[0]
    return NoMatch("%s (%s) between the scores and the softmax is not a scale, bias or mask",
                   node.name, op or node.target)


def _temperature(g: Graph, node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``scores * t`` with ``t`` constant along the keys and free of the input: a per-head (or
    per-query) learned temperature (XCiT, EdgeNeXt, SwinV2-cr). (scores, t) or None."""
    for scores, t in (node.args[:2], node.args[1::-1]):
        shape, target = g.shape(t), g.shape(scores)
        if (isinstance(t, fx.Node) and shape is not None and target is not None and _reaches_product(g, scores)
                and 0 < len(shape) <= len(target) and shape[-1] == 1 and broadcasts_to(shape, target)
                and not g.depends_on_input(t)):
            return scores, t
    return None


def _content_product(g: Graph, a: fx.Node, b: fx.Node) -> fx.Node | None:
    """Of two summed score-like terms, the one computed from the input; the other, computed from
    parameters and sizes only (TUPE's positional ``pos_q · pos_kᵀ``), is an additive bias."""
    a_in, b_in = g.depends_on_input(a), g.depends_on_input(b)
    if a_in == b_in:
        return None
    return a if a_in else b


def _num(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


def _softcap(g: Graph, node: fx.Node) -> tuple[float, fx.Node] | None:
    """``c · tanh(x / c)``: logit soft-capping (Gemma 2)."""
    outer = scalar_operand(g, node)
    if outer is None or g.op(outer[0]) != "tanh":
        return None
    inner = scalar_operand(g, outer[0].args[0])
    if inner is None or not math.isclose(inner[1] * outer[1], 1.0, rel_tol=1e-6):
        return None
    return outer[1], inner[0]


def _read_qk(g: Graph, m: AttentionMatch, prod: fx.Node) -> AttentionMatch | NoMatch:
    op = g.op(prod)
    if op == "baddbmm":
        bias, a, b = prod.args[:3]
        beta, alpha = prod.kwargs.get("beta", 1), prod.kwargs.get("alpha", 1)
        if beta != 1:
            return NoMatch("baddbmm %s with beta=%s", prod.name, beta)
        m.steps = [MaskStep("scale", value=float(alpha)), MaskStep("add", bias), *m.steps]
        m.form = "baddbmm-softmax"
    elif op == "matmul":
        a, b = prod.args[0], prod.args[1]
    else:
        spec = _einsum_spec(prod)
        if spec is None:
            return NoMatch("einsum %s is not a two-operand contraction", prod.name)
        err = _read_qk_einsum(m, prod, spec)
        if err is not None:
            return err
        a, b = einsum_operands(prod)
        m.form = "einsum-softmax"
    m.q, m.k = a, b
    m.k_transposed = op != "einsum"
    m.scale = _peel_operand_scales(g, m) * math.prod(s.value for s in m.steps if s.kind == "scale")
    return m


def _peel_operand_scales(g: Graph, m: AttentionMatch) -> float:
    """Take scalar factors off q and k (next to the product or before their reshapes)."""
    q_scale, m.q = _peel_scales(g, m.q)
    k_scale, m.k, m.k_transposed = _peel_key(g, m.k, transposed=m.k_transposed)
    q_far, q_bypass = _upstream_scales(g, m.q)
    k_far, k_bypass = _upstream_scales(g, m.k)
    m.bypass = q_bypass + k_bypass
    return q_scale * k_scale * q_far * k_far


def _read_qk_einsum(m: AttentionMatch, prod: fx.Node, spec: tuple[tuple[str, str], str]) -> NoMatch | None:
    (qa, ka), out = spec
    batch, q_i, k_i = out[:-2], out[-2], out[-1]
    d = [c for c in qa if c in ka and c not in out]
    if len(d) != 1 or set(qa) != set(batch) | {q_i, d[0]} or set(ka) != set(batch) | {k_i, d[0]}:
        return NoMatch("einsum %s is not q·kᵀ", prod.name)
    m.q_perm = [qa.index(c) for c in [*batch, q_i, d[0]]]
    m.k_perm = [ka.index(c) for c in [*batch, k_i, d[0]]]
    return None


def _peel_scales(g: Graph, node: fx.Node) -> tuple[float, fx.Node]:
    factor = 1.0
    while (sc := scalar_operand(g, node)) is not None:
        factor *= sc[1]
        node = sc[0]
    return factor, node


_MOVES = frozenset({"view", "transpose", "permute", "identity", "unsqueeze", "squeeze", "flatten", "unflatten"})


def _upstream_scales(g: Graph, node: fx.Node) -> tuple[float, list[fx.Node]]:
    """Scalar multiplications applied to q or k before their head reshapes (``q_proj(x) * scale``).

    They commute with the reshapes, so the splice bypasses them and passes the scale to the core; only
    when every node on the way has no other user, so nothing else sees the change.
    """
    factor, bypass = 1.0, []
    for _ in range(12):
        if len(node.users) > 1:
            break
        if (sc := scalar_operand(g, node)) is not None:
            factor *= sc[1]
            bypass.append(node)
            node = sc[0]
        elif g.op(node) in _MOVES and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        else:
            break
    return factor, bypass


def _peel_key(g: Graph, node: fx.Node, transposed: bool) -> tuple[float, fx.Node, bool]:
    """Peel scales and the last-two-dims swap off the key operand; ``transposed`` = node holds Kᵀ."""
    factor = 1.0
    for _ in range(8):
        if (sc := scalar_operand(g, node)) is not None:
            factor *= sc[1]
            node = sc[0]
        elif transposed and (src := is_last_two_swap(g, node)) is not None:
            node, transposed = src, False
        elif g.op(node) == "identity":
            node = node.args[0]
        else:
            break
    return factor, node, transposed


def match_sdpa(g: Graph, node: fx.Node) -> AttentionMatch | NoMatch:
    q, k, v = (arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = arg(node, 3, "attn_mask")
    m = AttentionMatch(anchor=node, output=node, q=q, k=k, v=v, form="sdpa")
    m.dropout = float(arg(node, 4, "dropout_p", 0.0) or 0.0)
    m.dropout_active = m.dropout > 0
    m.causal_flag = bool(arg(node, 5, "is_causal", False))
    scale = node.kwargs.get("scale")
    m.scale = float(scale) if scale is not None else 1.0 / math.sqrt(g.shape(q)[-1])
    m.scale *= _peel_operand_scales(g, m)
    m.score_dtype = g.value(q).dtype
    m.score_shape = (*g.shape(q)[:-1], g.shape(k)[-2])
    q_sym, k_sym = symbolic_shape(q), symbolic_shape(k)
    m.score_sizes = (q_sym[-2], k_sym[-2]) if q_sym is not None and k_sym is not None else None
    if m.causal_flag and not _same_lengths(m):
        # PyTorch aligns is_causal top-left (query i sees keys j <= i); the cores align bottom-right.
        # Unless Tq == Tk for every input, spell the top-left mask out.
        m.steps = [MaskStep("keep-top-left", value=-math.inf)]
        m.notes.append("is_causal with Tq != Tk: PyTorch's top-left causal mask is passed explicitly")
    if isinstance(mask, fx.Node):
        is_bool = g.value(mask).dtype == torch.bool
        m.steps = [MaskStep("keep", mask, -math.inf) if is_bool else MaskStep("add", mask)]
    if node.kwargs.get("enable_gqa"):
        m.kv_repeat = g.shape(q)[-3] // g.shape(k)[-3]
    return m


def _same_lengths(m: AttentionMatch) -> bool:
    if m.score_sizes is None:
        return False  # no symbolic shapes (fx capture): Tq == Tk at the example proves nothing
    return same_size(*m.score_sizes)


__all__ = [
    "SINK_NOTE", "AttentionMatch", "describe", "find_attention", "find_out_projection", "find_projection",
    "has_mask", "has_views", "mask_values", "module_path", "owner_module", "path_flags", "temperatures",
    "top_left_keep",
]
