"""Match stage: run the detectors on a captured graph and turn matches into :class:`Site` records."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch.fx as fx

from swapformer.patterns.attention import AttentionMatch, find_attention, module_path, owner_module
from swapformer.patterns.ffn import FFNMatch, find_ffn
from swapformer.patterns.match import Graph, NoMatch
from swapformer.patterns.projections import (
    _unview,
    find_out_projection,
    find_projection,
    linear_parts,
    path_flags,
    projection_ref,
)
from swapformer.rewriter.capture import Captured
from swapformer.sites import AttentionSite, FFNSite, ProjectionRef, Site


@dataclass
class Detection:
    graph: Graph
    sites: list[Site] = field(default_factory=list)
    matches: dict[str, AttentionMatch | FFNMatch] = field(default_factory=dict)  # site name -> match
    misses: list[tuple[str, str]] = field(default_factory=list)  # (node, reason) softmax/sdpa not attention
    # attention that cannot be described exactly: reported as skipped with the reason, never replaced
    refused: list[AttentionSite] = field(default_factory=list)


def detect(captured: Captured, kinds: tuple[str, ...]) -> Detection:
    names = captured.param_names
    user_inputs = frozenset(n.name for n in captured.gm.graph.nodes if n.op == "placeholder" and n.name not in names)
    g = Graph(captured.gm, captured.values, user_inputs, dict(names))
    det = Detection(g)
    counters: dict[str, int] = defaultdict(int)
    if "attention" in kinds:
        for m in find_attention(g):
            if isinstance(m, tuple):
                det.misses.append((m[0].name, str(m[1])))
                continue
            site = attention_site(g, m, counters)
            if site.refused:
                det.refused.append(site)
            else:
                _add(det, site, m)
    if "ffn" in kinds:
        for f in find_ffn(g):
            _add(det, ffn_site(g, f, counters), f)
    return det


def _add(det: Detection, site: Site, match: AttentionMatch | FFNMatch) -> None:
    det.sites.append(site)
    det.matches[site.name] = match


def _name(counters: dict[str, int], kind: str, module: str) -> str:
    # one counter per module across kinds, so names are unique (attention sites are numbered first)
    index = counters[module]
    counters[module] += 1
    return f"{module}:{index}" if module else f"<root>:{index}"


def _owner(node: fx.Node, fallback: ProjectionRef | None) -> tuple[str, str]:
    owner = owner_module(node)
    if owner is not None:
        return owner
    if fallback is not None:
        return fallback.weight.rsplit(".", 2)[0] if fallback.weight.count(".") >= 2 else "", ""
    return "", ""


def attention_site(g: Graph, m: AttentionMatch, counters: dict) -> AttentionSite:
    q_shape, k_shape, v_shape = g.shape(m.q), g.shape(m.k), g.shape(m.v)
    q_shape = _permuted(q_shape, m.q_perm)
    k_shape = _permuted(k_shape, m.k_perm)
    head_dim = q_shape[-1]
    found = {role: find_projection(g, node) for role, node in (("q", m.q), ("k", m.k), ("v", m.v))}
    heads = q_shape[-3] if len(q_shape) >= 4 else _heads_from_projection(g, found, head_dim)
    if len(q_shape) == 3 and m.refused is None:
        m.refused = _folded_heads_problem(g, found, q_shape, heads)
    kv_heads = heads // m.kv_repeat if len(q_shape) >= 4 and m.kv_repeat > 1 else (
        k_shape[-3] if len(k_shape) >= 4 and not m.k_transposed else heads)
    refs = _projection_refs(g, found, heads, kv_heads, head_dim, v_shape[-1])
    rope, qk_norm = path_flags(g, found["q"][1]) if found["q"] else (False, False)
    m.hidden = linear_parts(g, found["q"][0])[0] if found["q"] else None
    module, module_type = _owner(m.anchor, refs.get("q"))
    return AttentionSite(
        kind="attention", name=_name(counters, "attention", module), module=module, module_type=module_type,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, value_dim=v_shape[-1],
        scale=m.scale, causal=m.causal, window=m.window, mask=m.mask_kind,
        cross=_is_cross(g, found), rope=rope, qk_norm=qk_norm, dropout=m.dropout, softcap=m.softcap,
        q_proj=refs.get("q"), k_proj=refs.get("k"), v_proj=refs.get("v"),
        o_proj=find_out_projection(g, m.output), form=m.form, notes=tuple(m.notes), refused=m.refused,
    )


def _permuted(shape: tuple[int, ...], perm: list[int] | None) -> tuple[int, ...]:
    return tuple(shape[p] for p in perm) if perm else shape


def _heads_from_projection(g: Graph, found: dict, head_dim: int) -> int:
    """Heads folded into the batch dim (3-D bmm attention): read them off the q projection's width."""
    if found["q"] is None:
        return 1
    shared = sum(1 for f in found.values() if f is not None and f[0] is found["q"][0])
    return max(g.shape(found["q"][0])[-1] // (head_dim * shared), 1)


def _folded_heads_problem(g: Graph, found: dict, q_shape: tuple[int, ...], heads: int) -> str | None:
    """3-D attention must fold the heads into the batch, ``[B*H, T, D]``; legacy GPTBigCode MQA folds
    them into the query length instead (``[B, T*H, D]`` against one shared ``[B, T, D]`` key)."""
    if found["q"] is None or heads == 1:
        return None
    x = g.shape(_unview(g, linear_parts(g, found["q"][0])[0]))
    if x is None or len(x) != 3:
        return None
    if (q_shape[0], q_shape[1]) in ((x[0] * heads, x[1]), (x[1] * heads, x[0])):  # [B, T, d] or [T, B, d]
        return None
    return (f"3-D attention with q {tuple(q_shape)} from a {tuple(x)} input and {heads} heads of the "
            "projection: the heads are not folded into the batch (folded into the query length?)")


def _projection_refs(g: Graph, found: dict, heads: int, kv_heads: int, head_dim: int,
                     value_dim: int) -> dict[str, ProjectionRef]:
    linears = {role: f[0] for role, f in found.items() if f is not None}
    widths = {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * value_dim}
    refs: dict[str, ProjectionRef] = {}
    for role, linear in linears.items():
        shared = [r for r in ("q", "k", "v") if linears.get(r) is linear]
        start = sum(widths[r] for r in shared[: shared.index(role)])
        rows = (start, start + widths[role]) if len(shared) > 1 else None
        ref = projection_ref(g, linear, rows)
        if ref is not None:
            refs[role] = ref
    return refs


def _is_cross(g: Graph, found: dict) -> bool:
    """Cross attention: keys are projected from another tensor than queries."""
    if found["q"] is None or found["k"] is None:
        return False
    q_in = _unview(g, linear_parts(g, found["q"][0])[0])
    k_in = _unview(g, linear_parts(g, found["k"][0])[0])
    return q_in is not k_in


def ffn_site(g: Graph, f: FFNMatch, counters: dict) -> FFNSite:
    up = projection_ref(g, f.up, f.up_rows)
    gate = projection_ref(g, f.gate, f.gate_rows) if f.gate is not None else None
    down = projection_ref(g, f.down, None)
    module = _common_owner(f.up, f.down) or _owner(f.down, down)
    return FFNSite(
        kind="ffn", name=_name(counters, "ffn", module[0]), module=module[0], module_type=module[1],
        activation=f.activation, gated=f.gate is not None, hidden_size=f.hidden_size,
        model_dim=g.shape(f.x)[-1], up_proj=up, gate_proj=gate, down_proj=down,
        form="gated" if f.gate is not None else "mlp",
    )


def _common_owner(a: fx.Node, b: fx.Node) -> tuple[str, str] | None:
    sa, sb = a.meta.get("nn_module_stack"), b.meta.get("nn_module_stack")
    if not sa or not sb:
        return None
    common = [k for k in sa if k in sb]
    if not common:
        return "", ""  # siblings directly under the root module
    path, cls = sa[common[-1]]
    cls_name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
    return module_path(str(path)), cls_name


__all__ = ["Detection", "NoMatch", "detect"]
