"""Hypothesis strategies: tensors (:func:`input_tensors`) and grammar sentences
(:func:`attention_programs`, :func:`ffn_programs`).

hypothesis is imported when a strategy is built, so importing this module works without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from swapformer.testing import models as grammar
from swapformer.testing.models import (
    AttentionChoices,
    FFNChoices,
    Program,
    attention_program,
    ffn_program,
)

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

_GQA_PROJECTIONS = ("separate", "fused-split")  # chunk/unbind need equal q, k, v widths


def _strategies() -> Any:
    try:
        from hypothesis import strategies
    except ImportError as err:  # pragma: no cover - depends on the environment
        message = "swapformer.testing strategies need hypothesis: pip install 'swapformer[dev]'"
        raise ImportError(message) from err
    return strategies


def input_tensors(
    shape: Sequence[int] | SearchStrategy[Sequence[int]],
    dtype: torch.dtype = torch.float32,
    *,
    low: float | None = None,
    high: float | None = None,
) -> SearchStrategy[torch.Tensor]:
    """A hypothesis strategy for tensors of one shape and dtype.

    Elements come from a seeded torch generator (hypothesis draws the seed and a magnitude), so
    large tensors stay cheap and failures reproduce.

    Args:
        shape: the shape, or a strategy drawing shapes.
        dtype: floating (normal × a drawn scale in {0.1, 1, 4}, or uniform in ``[low, high)`` when
            both are given), integer (uniform in ``[low or 0, high or 100)``) or ``torch.bool``.
        low: lower bound, see ``dtype``.
        high: upper bound, see ``dtype``.

    Returns:
        A strategy drawing ``torch.Tensor`` values.
    """
    st = _strategies()
    shapes = shape if isinstance(shape, st.SearchStrategy) else st.just(tuple(shape))

    @st.composite
    def tensors(draw: Callable[[Any], Any]) -> torch.Tensor:
        dims = tuple(draw(shapes))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        if dtype == torch.bool:
            return torch.rand(dims, generator=gen) < 0.5
        if not dtype.is_floating_point:
            lo, hi = int(low or 0), int(high or 100)
            return torch.randint(lo, hi, dims, generator=gen, dtype=dtype)
        if low is not None and high is not None:
            return (torch.rand(dims, generator=gen) * (high - low) + low).to(dtype)
        scale = draw(st.sampled_from([0.1, 1.0, 4.0]))
        return (torch.randn(dims, generator=gen) * scale).to(dtype)

    return tensors()


_WINDOWS = {"window": (2, 4), "wide-window": (13, 24), "chunked": (3, 12), "band": (3, 16)}


def _options(name: str, given: Sequence[str], allowed: Sequence[str]) -> list[str]:
    unknown = sorted(set(given) - set(allowed))
    if unknown or not given:
        raise ValueError(f"{name} must be a non-empty subset of {list(allowed)}, got {list(given)}")
    return list(given)


def attention_programs(
    *,
    projections: Sequence[str] = grammar.PROJECTIONS,
    scale_placements: Sequence[str] = grammar.SCALE_PLACEMENTS,
    masks: Sequence[str] = grammar.MASKS,
    head_layouts: Sequence[str] = grammar.HEAD_LAYOUTS,
    gqa: Sequence[str] = grammar.GQA_FORMS,
    softmax_dtypes: Sequence[str] = grammar.SOFTMAX_DTYPES,
    extras: Sequence[str] = grammar.EXTRAS,
    score_mods: Sequence[str] = ("none",),
) -> SearchStrategy[Program]:
    """A hypothesis strategy for single-attention modules drawn from a grammar of spellings.

    Each keyword restricts one axis of the grammar (defaults: every option):

    * ``projections``: ``separate`` q/k/v Linears, or one fused Linear cut by ``fused-split``,
      ``fused-chunk`` or ``fused-unbind`` (reshape to ``[B, T, 3, H, D]`` then ``unbind``).
    * ``scale_placements``: ``scores-mul``, ``scores-div`` (by ``1/scale``), ``q-mul`` (q scaled
      before the product) or ``split-sqrt`` (√scale on q and on k).
    * ``masks``: ``none``, ``tril-buffer`` (sliced registered tril + ``masked_fill``),
      ``additive-triu`` (``triu(-inf)`` added), ``bool-where`` (``torch.where`` with ``finfo.min``),
      ``sdpa-causal`` (``F.scaled_dot_product_attention(is_causal=True)``) or ``window`` (causal
      sliding window).
    * ``head_layouts``: ``view-transpose`` with ``@``, ``reshape-permute`` with ``torch.matmul``, or
      ``einsum`` (``bqhd,bkhd->bhqk``, heads never transposed).
    * ``gqa``: ``none``, ``repeat-interleave`` or ``expand-reshape`` (GQA and MQA; only with the
      ``separate`` and ``fused-split`` projections).
    * ``softmax_dtypes``: ``same`` or ``fp32-cast`` (softmax in float32, cast back).
    * ``extras``: ``none``, ``rope`` (half-split RoPE), ``qk-norm`` (per-head RMSNorm) or ``both``.
    * ``score_mods`` (default ``none`` only): ``temperature`` (a learned per-head ``[H, 1, 1]``
      factor), ``softcap`` (Gemma 2's ``c·tanh(s/c)``, which ``"sdpa"`` refuses) or
      ``manual-softmax`` (``exp(s - max) / sum``, not detected yet) or ``sink`` (gpt-oss: a learned
      per-head logit as one more softmax column, dropped before the value product).

    Masks ``wide-window`` (a window wider than the example), ``chunked`` (chunk-local causal) and
    ``band`` (``|i - j| < w``) look like plain causal or no mask at some lengths only.

    Sizes (heads, kv heads, head dim, scale, window, batch, length, bias, seed) are drawn too.

    Returns:
        A strategy drawing :class:`Program` values (``.module``, ``.example_inputs``,
        ``.expected``).

    Raises:
        ValueError: an option is unknown or an axis is empty.
    """
    st = _strategies()
    axes = {
        "projections": _options("projections", projections, grammar.PROJECTIONS),
        "scale_placements": _options("scale_placements", scale_placements, grammar.SCALE_PLACEMENTS),
        "masks": _options("masks", masks, grammar.MASKS),
        "head_layouts": _options("head_layouts", head_layouts, grammar.HEAD_LAYOUTS),
        "gqa": _options("gqa", gqa, grammar.GQA_FORMS),
        "softmax_dtypes": _options("softmax_dtypes", softmax_dtypes, grammar.SOFTMAX_DTYPES),
        "extras": _options("extras", extras, grammar.EXTRAS),
        "score_mods": _options("score_mods", score_mods, grammar.SCORE_MODS),
    }
    if "none" not in axes["gqa"]:
        axes["projections"] = [p for p in axes["projections"] if p in _GQA_PROJECTIONS]
        if not axes["projections"]:
            raise ValueError(f"GQA forms need one of the projections {list(_GQA_PROJECTIONS)}")

    @st.composite
    def programs(draw: Callable[[Any], Any]) -> Program:
        pick = lambda axis: draw(st.sampled_from(axes[axis]))
        projection = pick("projections")
        gqa_forms = [g for g in axes["gqa"] if g == "none" or projection in _GQA_PROJECTIONS]
        gqa_form = draw(st.sampled_from(gqa_forms))
        num_heads = draw(st.sampled_from([2, 4]))
        kv_options = [n for n in (1, 2) if n < num_heads] if gqa_form != "none" else [num_heads]
        head_dim = draw(st.sampled_from([4, 8, 16]))
        mask = pick("masks")
        choices = AttentionChoices(
            projection=projection,
            scale_at=pick("scale_placements"),
            mask=mask,
            heads=pick("head_layouts"),
            gqa=gqa_form,
            softmax=pick("softmax_dtypes"),
            extras=pick("extras"),
            score_mod=pick("score_mods") if mask != "sdpa-causal" else "none",
            num_heads=num_heads,
            num_kv_heads=draw(st.sampled_from(kv_options)),
            head_dim=head_dim,
            scale=draw(st.sampled_from([head_dim**-0.5, 0.1, 0.3])),
            window=draw(st.integers(*_WINDOWS[mask])) if mask in _WINDOWS else None,
            bias=draw(st.booleans()),
            seq_len=draw(st.integers(5, 12)),
            batch=draw(st.integers(1, 2)),
            seed=draw(st.integers(0, 2**16)),
        )
        return attention_program(choices)

    return programs()


def ffn_programs(
    *,
    activations: Sequence[str] = grammar.FFN_ACTIVATIONS,
    spellings: Sequence[str] = grammar.FFN_SPELLINGS,
    gatings: Sequence[str] = grammar.FFN_GATINGS,
) -> SearchStrategy[Program]:
    """A hypothesis strategy for single-FFN modules drawn from a grammar of spellings.

    * ``activations``: ``gelu``, ``gelu_tanh``, ``relu``, ``silu``.
    * ``spellings``: ``module`` (``nn.GELU()`` ...), ``functional`` (``F.gelu`` ...) or ``manual``
      (the erf / GPT-2 tanh formulas, ``x * sigmoid(x)``, ``torch.relu``).
    * ``gatings``: ``none`` (``down(act(up x))``, sometimes as an ``nn.Sequential``), ``separate``
      gate and up Linears, or one ``fused-chunk`` Linear with the activated half first or second.

    Model dim, hidden size, bias, batch, length and seed are drawn too.

    Returns:
        A strategy drawing :class:`Program` values (``.module``, ``.example_inputs``,
        ``.expected``).

    Raises:
        ValueError: an option is unknown or an axis is empty.
    """
    st = _strategies()
    acts = _options("activations", activations, grammar.FFN_ACTIVATIONS)
    spells = _options("spellings", spellings, grammar.FFN_SPELLINGS)
    gates = _options("gatings", gatings, grammar.FFN_GATINGS)

    @st.composite
    def programs(draw: Callable[[Any], Any]) -> Program:
        spelling, gating = draw(st.sampled_from(spells)), draw(st.sampled_from(gates))
        sequential = spelling == "module" and gating == "none" and draw(st.booleans())
        choices = FFNChoices(
            activation=draw(st.sampled_from(acts)),
            spelling=spelling,
            gating=gating,
            gate_first=draw(st.booleans()),
            sequential=sequential,
            bias=draw(st.booleans()),
            model_dim=draw(st.sampled_from([8, 16, 24])),
            hidden_size=draw(st.sampled_from([16, 32, 48])),
            seq_len=draw(st.integers(3, 10)),
            batch=draw(st.integers(1, 2)),
            seed=draw(st.integers(0, 2**16)),
        )
        return ffn_program(choices)

    return programs()
