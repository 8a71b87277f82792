"""What a matched attention's scores amount to: GQA head repeats, and the mask its score steps add.

Writing the steps between the q·kᵀ product and the softmax as ``f(x) = a·x + f(0)``, ``b = f(0)`` is
the additive mask. It is classified (none / causal / window / padding / bias) from the probe values,
and a fixed mask that looks causal or windowed is rebuilt from the graph at the other lengths the
capture allows before it is dropped in favour of the core's own causal or window flags.
"""

from __future__ import annotations

import itertools
import logging
import math

import torch
import torch.fx as fx

from swapformer.patterns.masks import (
    NEG_LARGE,
    AtLength,
    keep_pattern,
    length_assignments,
    pattern_of,
    size_at,
)
from swapformer.patterns.match import SINK_NOTE, AttentionMatch, Graph, MaskStep, scalar_operand

log = logging.getLogger(__name__)
_MAX_MASK_ELEMENTS = 2**25  # Tq·Tk above which a fixed mask is not rebuilt at a candidate length


def describe(g: Graph, m: AttentionMatch) -> None:
    """Fill in GQA, the mask classification and the hidden input of a match."""
    if m.kv_repeat == 1 and not m.k_transposed:
        _peel_gqa(g, m)
    bias = mask_values(g, m)
    # with views the bias is built full-size in the view's layout and reshaped back to the scores'
    if bias is not None and not (bias.numel() == math.prod(m.score_shape) if has_views(m)
                                 else broadcasts_to(bias.shape, m.score_shape)):
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
    if m.sink is not None:
        # the core attends over one more key: the mask goes in the bias, not in causal/window flags
        m.causal, m.window, m.drop_mask, m.mask_kind = False, None, False, "bias"
        m.notes.append(SINK_NOTE)
    if m.causal_flag and not m.steps:
        m.mask_kind, m.causal = "causal", True
    elif m.causal_flag:
        m.causal = True


def broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
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
