"""Attention detection by dataflow semantics.

An attention core is ``P·V`` where ``P = softmax(f(Q·Kᵀ))`` over the last dim and ``f`` is a chain of
elementwise steps that is affine in the scores: multiplication by scalars (the scale, wherever it was
written), additive tensors (masks, ALiBi), and fills of masked positions with a very negative value.
Writing ``f(x) = a·x + f(0)`` gives the SDPA form ``softmax(a·QKᵀ + b)·V`` with ``b = f(0)``, whatever
the order and spelling of the steps. Scales on ``q`` or ``k`` before the product, casts around the
softmax, dropout on the probabilities, transposes of ``k`` and GQA head repeats are peeled off.

``F.scaled_dot_product_attention`` nodes are sites directly. Everything is read from the graph plus
the probe values of one run on the example inputs (shapes, constant masks, GQA repeats).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from swapformer.patterns.masks import (
    NEG_LARGE,
    AtLength,
    keep_pattern,
    length_assignments,
    pattern_of,
    same_size,
    size_at,
    symbolic_shape,
)
from swapformer.patterns.match import (
    Graph,
    MaskStep,
    NoMatch,
    is_last_two_swap,
    scalar_operand,
)
from swapformer.patterns.ops import arg
from swapformer.patterns.projections import find_out_projection, find_projection, path_flags

log = logging.getLogger(__name__)
_MAX_MASK_ELEMENTS = 2**25  # Tq·Tk above which a fixed mask is not rebuilt at a candidate length
_PASS_PROBS = frozenset({"to", "dropout", "identity", "view"})
_PRODUCTS = frozenset({"matmul", "einsum", "baddbmm"})


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
    back = _back_to_product(g, sm.args[0], m)
    if not back:
        return back
    return _read_qk(g, m, back)


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
                and 0 < len(shape) <= len(target) and shape[-1] == 1 and _broadcasts_to(shape, target)
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


def describe(g: Graph, m: AttentionMatch) -> None:
    """Fill in GQA, the mask classification and the hidden input of a match."""
    if m.kv_repeat == 1 and not m.k_transposed:
        _peel_gqa(g, m)
    bias = mask_values(g, m)
    # with views the bias is built full-size in the view's layout and reshaped back to the scores'
    if bias is not None and not (bias.numel() == math.prod(m.score_shape) if has_views(m)
                                 else _broadcasts_to(bias.shape, m.score_shape)):
        m.refused = (f"the terms added to the scores have shape {tuple(bias.shape)}, larger than the "
                     f"q·kᵀ product {m.score_shape}: the product found is not the one attended")
        return
    depends = any(s.node is not None and g.depends_on_input(s.node) for s in m.steps)
    learned = any(s.node is not None and g.depends_on_parameter(s.node) for s in m.steps if s.kind != "temp")
    learned = learned or _mask_then_temperature(m)
    m.mask_kind, m.causal, m.window = classify_mask(bias, m, depends)
    if learned and m.mask_kind in ("causal", "none"):
        # a parameter is never a constant: a zero-initialised bias table is trained later
        m.mask_kind, m.window = "bias", None
        m.notes.append("the mask holds learned parameters: passed to the core as computed by the graph")
    m.drop_mask = bias is not None and not depends and not learned and m.mask_kind in ("causal", "none")
    if m.drop_mask and not _pattern_holds_at_every_length(g, m):
        m.drop_mask, m.mask_kind, m.window = False, "bias", None
    if temperatures(m):
        m.notes.append("learned temperature on the scores: the core gets q multiplied by it")
    if m.causal_flag and not m.steps:
        m.mask_kind, m.causal = "causal", True
    elif m.causal_flag:
        m.causal = True


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(target)))


def _pattern_holds_at_every_length(g: Graph, m: AttentionMatch) -> bool:
    """Whether the fixed mask is the causal/window/no-mask pattern at every length it can be built at;
    on success the description is widened to the one that fits all (a window wider than the example)."""
    sizes = m.score_sizes
    if sizes is None or not any(isinstance(s, torch.SymInt) for s in sizes) or has_views(m):
        return sizes is None or not has_views(m)  # static graph: it runs at the example length only
    seen = [(m.score_shape[-2], m.score_shape[-1], (m.causal, m.window))]
    for subs in length_assignments(sizes):
        tq, tk = size_at(sizes[0], subs), size_at(sizes[1], subs)
        if tq * tk > _MAX_MASK_ELEMENTS:
            continue
        bias = _bias_at(g, m, subs, tq, tk)
        if bias is None:
            continue
        pattern = pattern_of(bias, tq, tk)
        if pattern is None:
            m.notes.append(f"the fixed mask is no causal/window pattern at length {tq}x{tk}: passed explicitly")
            return False
        seen.append((tq, tk, pattern))
    if len(seen) == 1:
        m.notes.append("the fixed mask could not be rebuilt at another length: passed explicitly")
        return False
    return _widest_fit(m, seen)


def _widest_fit(m: AttentionMatch, seen: list[tuple[int, int, tuple[bool, int | None]]]) -> bool:
    for candidate in sorted({p for _, _, p in seen}, key=lambda p: (p[0], p[1] is not None, p[1] or 0)):
        if all(torch.equal(keep_pattern(tq, tk, *candidate), keep_pattern(tq, tk, *p)) for tq, tk, p in seen):
            m.causal, m.window = candidate
            m.mask_kind = "causal" if candidate[0] else "none"
            return True
    m.notes.append("the fixed mask is a different pattern at different lengths: passed explicitly")
    return False


def _bias_at(g: Graph, m: AttentionMatch, subs: dict, tq: int, tk: int) -> torch.Tensor | None:
    """``f(0)`` rebuilt with the symbolic sizes set by ``subs``; None where the model cannot run."""
    at = AtLength(g, subs)
    b = torch.zeros((), dtype=m.score_dtype)
    try:
        for step in m.steps:
            operand = (tq, tk) if step.kind == "keep-top-left" else at.value(step.node)
            b = apply_step(step, b, operand)
        torch.broadcast_shapes(b.shape, (*m.score_shape[:-2], tq, tk))
    except Exception:  # the model itself cannot run at this length (a buffer too short, a guard)
        log.debug("mask of %s not rebuilt at %s", m.anchor.name, subs, exc_info=True)
        return None
    return b


def _peel_gqa(g: Graph, m: AttentionMatch) -> None:
    """Find the un-repeated K/V behind a head-wise repeat (repeat_kv, repeat_interleave, expand)."""
    q, k, v = (_canonical(g, n, p) for n, p in ((m.q, m.q_perm), (m.k, m.k_perm), (m.v, m.v_perm)))
    if any(t is None or t.dim() != 4 for t in (q, k, v)) or k.shape[1] != q.shape[1]:
        return
    heads = q.shape[1]
    skip = set(m.bypass)
    k_src, v_src = _repeat_source(g, m.k, k, heads, skip), _repeat_source(g, m.v, v, heads, skip)
    if k_src is None or v_src is None or k_src[2] != v_src[2]:
        return
    m.kv_repeat = heads // k_src[2]
    (m.k, m.k_perm, _), (m.v, m.v_perm, _) = k_src, v_src


def _canonical(g: Graph, node: fx.Node, perm: list[int] | None) -> torch.Tensor | None:
    value = g.value(node)
    if not isinstance(value, torch.Tensor):
        return None
    return value.permute(perm) if perm else value


_GQA_OPS = frozenset({"view", "expand", "unsqueeze", "identity", "slice", "repeat_interleave", "getitem",
                      "transpose", "permute"})


def _repeat_source(g: Graph, node: fx.Node, full: torch.Tensor, heads: int, bypassed: set[fx.Node]
                   ) -> tuple[fx.Node, list[int] | None, int] | None:
    """(source node, permutation to [B, Hkv, T, D], Hkv) of a tensor that ``full`` repeats head-wise.

    ``full`` is the repeated tensor in the [B, H, T, D] layout. The source may sit in another layout
    (repeated before the heads were transposed into place): every dim order is tried, numerically.
    """
    cur, factor = node, 1.0
    for _ in range(6):
        if cur in bypassed:  # a scale the splice removes anyway (already counted in the site's scale)
            cur, c = scalar_operand(g, cur)
            factor *= c
        elif g.op(cur) in _GQA_OPS and isinstance(cur.args[0], fx.Node):
            cur = cur.args[0]
        else:
            return None
        value = g.value(cur)
        if not isinstance(value, torch.Tensor) or value.dim() != 4:
            continue
        for perm in itertools.permutations(range(4)):
            cand = value.permute(perm)
            hk = cand.shape[1]
            if hk >= heads or heads % hk or (cand.shape[0], *cand.shape[2:]) != (full.shape[0], *full.shape[2:]):
                continue
            repeated = cand.repeat_interleave(heads // hk, dim=1)
            if torch.equal(repeated, full) or (factor != 1.0 and torch.allclose(repeated * factor, full)):
                return cur, (None if list(perm) == [0, 1, 2, 3] else list(perm)), hk
    return None


def mask_values(g: Graph, m: AttentionMatch) -> torch.Tensor | None:
    """``b = f(0)``: the additive mask the steps amount to, evaluated on the probe values."""
    if not has_mask(m):
        return None
    b = torch.zeros(m.score_shape if has_views(m) else (), dtype=m.score_dtype)
    for step in m.steps:
        operand = m.score_shape[-2:] if step.kind == "keep-top-left" else g.value(step.node)
        b = apply_step(step, b, operand)
    return b


def has_mask(m: AttentionMatch) -> bool:
    """Whether any step adds or fills (scales and temperatures alone leave f(0) = 0)."""
    return any(s.kind not in ("scale", "temp") for s in m.steps)


def _mask_then_temperature(m: AttentionMatch) -> bool:
    """A mask applied before a learned temperature is scaled by it (its -inf could flip sign)."""
    kinds = [s.kind for s in m.steps]  # in the order they are applied to the scores
    masks = [i for i, k in enumerate(kinds) if k not in ("scale", "temp")]
    return bool(masks) and "temp" in kinds[masks[0]:]


def temperatures(m: AttentionMatch) -> list[fx.Node]:
    """Tensors multiplying the scores: the splice multiplies q by them (``(t·q)·kᵀ = t·(q·kᵀ)``)."""
    return [s.node for s in m.steps if s.kind == "temp"]


def has_views(m: AttentionMatch) -> bool:
    return any(s.kind == "view" for s in m.steps)


def top_left_keep(tq: int, tk: int, device: torch.device | None = None) -> torch.Tensor:
    """SDPA's ``is_causal`` mask: query ``i`` sees keys ``j <= i`` (aligned top-left)."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril()


def apply_step(step: MaskStep, b: torch.Tensor, operand: object) -> torch.Tensor:
    if step.kind == "keep-top-left":
        return torch.where(top_left_keep(*operand, b.device), b, torch.tensor(step.value, dtype=b.dtype))
    if step.kind == "view":
        return b.reshape(operand.shape)
    if step.kind == "scale":
        return b * step.value
    if step.kind == "temp":
        return b * operand
    if step.kind == "add":
        return b + (operand if operand is not None else step.value)
    if step.kind == "sub":
        return b - operand
    if step.kind == "fill":
        return b.masked_fill(operand, step.value)
    return torch.where(operand, b, torch.tensor(step.value, dtype=b.dtype))  # keep


def classify_mask(bias: torch.Tensor | None, m: AttentionMatch, depends: bool) -> tuple[str, bool, int | None]:
    if bias is None:
        return "none", False, None
    masked = bias <= NEG_LARGE
    finite = bias.masked_fill(masked, 0)
    if finite.abs().max() > 0:
        return "bias", _is_causal(masked), None
    if masked.dim() < 2 or not masked.any():
        return ("padding" if depends else "none"), False, None
    causal = _is_causal(masked)
    if depends:
        return "padding", causal, _window(masked) if causal else None
    pattern = pattern_of(bias, *m.score_shape[-2:])
    if pattern is None:  # holes below the diagonal, per-head patterns: an explicit mask
        return "bias", causal, None
    return ("causal" if pattern[0] else "none"), pattern[0], pattern[1]


def _is_causal(masked: torch.Tensor) -> bool:
    tq, tk = masked.shape[-2:]
    upper = torch.ones(tq, tk, dtype=torch.bool).triu(tk - tq + 1)
    return bool(masked[..., upper].all()) and tq > 1


def _window(masked: torch.Tensor) -> int | None:
    tq, tk = masked.shape[-2:]
    allowed = ~masked
    keep_cols = allowed.any(dim=-2, keepdim=True)
    i = torch.arange(tq)[:, None] + (tk - tq)
    j = torch.arange(tk)[None, :]
    dist = (i - j).expand_as(allowed)
    reach = dist.masked_fill(~allowed, -1).max()
    w = int(reach) + 1
    if w >= tk:
        return None
    band = (j <= i) & (i - j < w)
    return w if bool(((band & keep_cols) == allowed).all()) else None


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


__all__ = ["AttentionMatch", "find_attention", "find_out_projection", "find_projection", "path_flags"]
