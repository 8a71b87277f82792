"""What one attention site costs under each candidate, from the cores' own accounting.

A candidate core reports ``flops_per_token(context)`` and ``state_bytes(context)``; the original
attention costs what dense softmax attention over its keys costs (the FLOPs of the ``sdpa`` target's
computation) and holds a full key/value cache, counted as the cores count their state (fp32).
Prefill cost per token is the mean of the per-token cost over the prompt's positions (sampled on a
grid). The rest of the model (every ``nn.Linear``: projections, FFNs, the LM head) costs
``2 * weights`` FLOPs per token and holds no state.

``cost_fn`` of :func:`swapformer.planner.auto_plan` takes any function with :data:`CostFn`'s
signature, so that measured per-layer times can replace this FLOP model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import nn

from swapformer.errors import InputError
from swapformer.sites import AttentionSite
from swapformer.targets.base import TargetModule
from swapformer.targets.reference import STATE_ELEMENT_BYTES, sdpa_flops_per_token

# (site, candidate core or None for the original, budget kind, context) -> cost in the budget's unit
CostFn = Callable[[AttentionSite, "TargetModule | None", str, int], float]
PREFILL_GRID = 65  # positions sampled to average a prefill's per-token cost


def flop_cost(site: AttentionSite, core: TargetModule | None, kind: str, context: int) -> float:
    """The cost of ``core`` (None: the original attention) at ``site`` for a budget of ``kind``."""
    if kind == "state":
        held = core.state_bytes(context) if core is not None else None
        return float(held if held is not None else original_state_bytes(site, context))
    if kind == "decode":
        return _flops(site, core, context)
    positions = np.unique(np.linspace(1, context, min(PREFILL_GRID, context)).round().astype(int))
    return float(np.mean([_flops(site, core, int(t)) for t in positions]))


def _flops(site: AttentionSite, core: TargetModule | None, context: int) -> float:
    counted = core.flops_per_token(context) if core is not None else None
    if counted is not None:
        return float(counted)
    visible = min(context, site.window) if site.window else context
    return float(sdpa_flops_per_token(site.num_heads, site.head_dim, site.value_dim or site.head_dim, visible))


def original_state_bytes(site: AttentionSite, context: int) -> int:
    """The key/value cache of the original attention after ``context`` tokens (fp32)."""
    rows = min(context, site.window) if site.window else context
    kv_heads = site.num_kv_heads or site.num_heads
    return rows * kv_heads * (site.head_dim + (site.value_dim or site.head_dim)) * STATE_ELEMENT_BYTES


def fixed_cost(model: nn.Module, kind: str) -> float:
    """The cost of everything but attention cores: ``2 * weights`` FLOPs of the ``nn.Linear`` layers per
    token (decode and prefill alike), no state."""
    if kind == "state":
        return 0.0
    return float(2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)))


def model_cost(student: nn.Module, teacher: nn.Module, kind: str, context: int,
               cost_fn: CostFn = flop_cost) -> tuple[float, float]:
    """``(cost, original cost)`` of a rewritten model (any plan or uniform target) in ``cost_fn``'s
    unit: its replaced attention sites at their cores' cost, every other attention site as the
    original, plus the rest of ``teacher`` (``cost_fn.fixed_cost`` when it has one, else
    :func:`fixed_cost`). A decode or prefill speed-up is ``original / cost``.

    Raises:
        InputError: ``student`` was not made by swapformer.
    """
    report = getattr(student, "swapformer_report", None)
    if report is None:
        raise InputError("model_cost needs a model made by swapformer.rewrite (it has no swapformer_report)")
    fixed = getattr(cost_fn, "fixed_cost", fixed_cost)(teacher, kind)
    cores = {r.site.name: student.get_submodule(r.core_name) for r in report.replaced}
    attention = [s for s in report.sites if s.kind == "attention"]
    original = fixed + sum(cost_fn(s, None, kind, context) for s in attention)
    cost = fixed + sum(cost_fn(s, cores.get(s.name), kind, context) for s in attention)
    return cost, original
