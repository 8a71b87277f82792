"""``target="auto"``: measure every candidate at every attention site, then choose under the budget.

Per attention site the candidates are: keep the original, ``window`` at a few sizes, and the learned
hybrid targets with their default options. Each candidate gets a cost from the cores' own accounting
(:mod:`~swapformer.planner.costs`) and a quality cost measured on the user's calibration data
(:mod:`~swapformer.planner.quality`); :func:`~swapformer.planner.select.choose` then picks the plan of
least total quality cost whose cost meets the budget. Nothing is trained for the plan itself.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from swapformer.errors import ConfigError, InputError
from swapformer.planner.budget import Budget
from swapformer.planner.costs import CostFn, fixed_cost, flop_cost
from swapformer.planner.quality import (
    calibration_batches,
    mean_nll,
    single_site_loss_deltas,
    site_errors,
)
from swapformer.planner.select import DEFAULT_RESOLUTION, choose
from swapformer.rewriter.plan import Plan, PlanChoice, target_label
from swapformer.sites import Site
from swapformer.targets.base import TargetConfig, resolve_target

log = logging.getLogger(__name__)
DEFAULT_WINDOWS = (128, 512, 2048)
HYBRIDS = ("fastweight", "elita", "cat")
QUALITY_MEASURES = ("error", "perplexity")


def default_candidates(windows: Sequence[int] = DEFAULT_WINDOWS) -> tuple[TargetConfig, ...]:
    """``window`` at each size in ``windows``, then each learned hybrid with its default options."""
    return (*(resolve_target("window", window=w) for w in windows), *(resolve_target(h) for h in HYBRIDS))


@dataclass(frozen=True)
class AutoOptions:
    """The planner's options, checked before the model is captured.

    Args:
        budget: a :class:`Budget` or its spelling (``"decode@32768=3"``).
        calibration_data: a ``[B, T]`` tensor of input ids or a sequence of them; measure with
            sequences longer than the largest window.
        candidates: target names or configs to choose from besides keeping the original (default:
            :func:`default_candidates`).
        transfer_steps: Adam steps of attention transfer per candidate before measuring (0: none;
            the "error" measure only).
        transfer_lr: their learning rate.
        resolution: units of the discretised budget in the selection.
        cost_fn: the cost model (default: the cores' FLOP/state accounting); see also
            :class:`~swapformer.planner.timing.MeasuredCost` (each core's step, timed alone) and
            :class:`~swapformer.planner.timing.ModelTimedCost` (the whole model's decode step per
            candidate, split per layer: the cost model whose decode budgets hold when the speed
            benchmark measures the plan; benchmarks/RESULTS.md, issue 16).
        quality: the quality measure, ``"error"`` (the default: each site's teacher-forced output
            error, all sites in one forward per candidate) or ``"perplexity"`` (the calibration loss
            change when only that site is replaced, one forward per site and candidate, ~20x the
            cost; better when few, very lossy candidates compete with keeping a layer, noisier when
            cheap candidates differ little; benchmarks/RESULTS.md, issue 16); see
            :mod:`~swapformer.planner.quality`.

    Raises:
        ConfigError: no or a bad budget, no calibration data, an unknown option or candidate.
    """

    budget: Budget
    calibration_data: tuple[Any, ...]
    candidates: tuple[TargetConfig, ...] = dataclasses.field(default_factory=default_candidates)
    transfer_steps: int = 0
    transfer_lr: float = 1e-3
    resolution: int = DEFAULT_RESOLUTION
    cost_fn: CostFn = flop_cost
    quality: str = "error"

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> AutoOptions:
        """The options ``rewrite(model, "auto", **options)`` was given, checked."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"target 'auto' has no option(s) {unknown}; its options are {sorted(known)}")
        if options.get("budget") is None:
            raise ConfigError("target 'auto' needs budget=... (e.g. swapformer.Budget.decode(3, context=32768) "
                              "or 'decode@32768=3')")
        if options.get("calibration_data") is None:
            raise ConfigError("target 'auto' needs calibration_data=... (a few batches of input ids) to "
                              "measure what each candidate costs in quality")
        budget = options["budget"]
        values = dict(options, budget=budget if isinstance(budget, Budget) else Budget.parse(budget))
        values["calibration_data"] = calibration_batches(options["calibration_data"])
        if "candidates" in options:
            values["candidates"] = tuple(resolve_target(c) for c in options["candidates"])
        return cls(**values)

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ConfigError("target 'auto' needs at least one candidate besides keeping the original")
        if isinstance(self.transfer_steps, bool) or not isinstance(self.transfer_steps, int) or self.transfer_steps < 0:
            raise ConfigError(f"transfer_steps must be an int >= 0, got {self.transfer_steps!r}")
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 1:
            raise ConfigError(f"resolution must be an int >= 1, got {self.resolution!r}")
        if self.quality not in QUALITY_MEASURES:
            raise ConfigError(f"quality must be one of {', '.join(QUALITY_MEASURES)}, got {self.quality!r}")
        labels = [target_label(c) for c in self.candidates]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"candidates must differ, got {labels}")


@dataclass
class Measured:
    """Per planned site, each option's ``(label, config or None, quality cost, cost)``; keep first."""

    sites: list[Site]
    options: dict[str, list[tuple[str, TargetConfig | None, float, float]]]
    fixed: float  # the cost of everything the plan does not choose for
    unit: str = ""  # the costs' unit ("": the budget's own)


def auto_plan(analysis: Any, options: AutoOptions, filter_fn: Any = None) -> Plan:
    """The plan of least total quality cost that meets ``options.budget`` (see the module docstring).

    Args:
        analysis: a :class:`swapformer.rewriter.api.Analysis` of the model.
        options: the checked planner options.
        filter_fn: sites it rejects are kept and not planned.

    Raises:
        ConfigError: no plan meets the budget (the message says what the cheapest plan reaches).
        InputError: the model has no attention site to plan.
    """
    return select_plan(measure(analysis, options, filter_fn), options.budget, options.resolution)


def select_plan(measured: Measured, budget: Budget, resolution: int = DEFAULT_RESOLUTION) -> Plan:
    """The plan of least total quality cost in ``measured`` that meets ``budget`` (whose kind and
    context must be those ``measured`` was costed at).

    Raises:
        ConfigError: no plan meets the budget (the message says what the cheapest plan reaches).
    """
    groups = [measured.options[s.name] for s in measured.sites]
    original = sum(g[0][3] for g in groups)
    capacity = budget.capacity(measured.fixed, original)
    picks = choose([[o[2] for o in g] for g in groups], [[o[3] for o in g] for g in groups], capacity,
                   resolution=resolution)
    if picks is None:
        cheapest = budget.achieved(measured.fixed, sum(min(o[3] for o in g) for g in groups), original)
        raise ConfigError(f"no plan meets the budget {budget.describe()}: replacing every site by its "
                          f"cheapest candidate gives {budget.describe(cheapest).split(', plan ')[1]}")
    planned = sum(g[j][3] for g, j in zip(groups, picks))
    quality = sum(g[j][2] for g, j in zip(groups, picks))
    replaced = sum(j != 0 for j in picks)
    summary = (f"{budget.describe(budget.achieved(measured.fixed, planned, original))}; "
               f"{replaced} of {len(groups)} sites replaced, total quality cost {quality:.3g}")
    log.info("auto plan: %s", summary)
    unit = measured.unit or budget.unit
    choices = tuple(PlanChoice(s.name, g[j][1], _reason(g, j, budget, unit))
                    for s, g, j in zip(measured.sites, groups, picks))
    return Plan(choices, label="auto", summary=summary)


def measure(analysis: Any, options: AutoOptions, filter_fn: Any = None) -> Measured:
    """Rewrite to each candidate once, and read every served site's quality cost and cost."""
    budget, cost_fn = options.budget, options.cost_fn
    sites = [s for s in analysis.sites if s.kind == "attention" and (filter_fn is None or filter_fn(s))]
    if not sites:
        raise InputError("target 'auto' found no attention site to plan")
    _bind(cost_fn, analysis)
    _warn_short_data(options)
    planned = {s.name for s in sites}
    table = {s.name: [("keep", None, 0.0, cost_fn(s, None, budget.kind, budget.context))] for s in sites}
    baseline = mean_nll(analysis.model, options.calibration_data) if options.quality == "perplexity" else 0.0
    for config in options.candidates:
        label = target_label(config)
        student = analysis.rewrite(config, filter_fn=lambda s: s.name in planned, verify=False)
        served = [r.site for r in student.swapformer_report.replaced]
        if options.quality == "perplexity":
            errors = single_site_loss_deltas(analysis, config, served, options.calibration_data, baseline)
        else:
            errors = site_errors(student, analysis.model, options.calibration_data,
                                 transfer_steps=options.transfer_steps, lr=options.transfer_lr)
        for rep in student.swapformer_report.replaced:
            error = errors.get(rep.site.name, math.nan)
            if not math.isfinite(error):
                log.warning("%s at %s gives a non-finite output error: not a candidate there", label, rep.site.name)
                continue
            core = student.get_submodule(rep.core_name)
            table[rep.site.name].append((label, config, error, cost_fn(rep.site, core, budget.kind, budget.context)))
        log.info("auto: measured %s at %d sites", label, len(student.swapformer_report.replaced))
        del student
    return Measured(sites, table, _fixed(analysis, planned, budget, cost_fn), _unit(cost_fn, budget))


def recost(analysis: Any, measured: Measured, budget: Budget, cost_fn: CostFn) -> Measured:
    """``measured`` with every option's cost taken again by ``cost_fn`` at ``budget``'s kind and
    context, the quality costs kept: one rewrite per candidate, no quality measurement (e.g. to plan
    under :class:`~swapformer.planner.timing.MeasuredCost` and under :func:`flop_cost` alike)."""
    _bind(cost_fn, analysis)
    planned = {s.name for s in measured.sites}
    configs = {o[0]: o[1] for options in measured.options.values() for o in options[1:]}
    cores: dict[str, dict[str, Any]] = {}
    for label, config in configs.items():
        student = analysis.rewrite(config, filter_fn=lambda s: s.name in planned, verify=False)
        cores[label] = {r.site.name: student.get_submodule(r.core_name) for r in student.swapformer_report.replaced}
    table = {s.name: [(label, config, quality,
                       cost_fn(s, cores[label][s.name] if config is not None else None, budget.kind, budget.context))
                      for label, config, quality, _ in measured.options[s.name]] for s in measured.sites}
    return Measured(measured.sites, table, _fixed(analysis, planned, budget, cost_fn), _unit(cost_fn, budget))


def _unit(cost_fn: CostFn, budget: Budget) -> str:
    """What the costs count: a timed cost model's ``time_unit`` for speed budgets, else the budget's."""
    return budget.unit if budget.kind == "state" else getattr(cost_fn, "time_unit", budget.unit)


def _bind(cost_fn: CostFn, analysis: Any) -> None:
    """Give a cost model that times the model itself (``bind``, e.g. ModelTimedCost) the analysis."""
    bind = getattr(cost_fn, "bind", None)
    if bind is not None:
        bind(analysis)


def _fixed(analysis: Any, planned: set[str], budget: Budget, cost_fn: CostFn) -> float:
    """The cost of the rest of the model and of the attention sites not planned (as they are)."""
    others = [s for s in analysis.sites if s.kind == "attention" and s.name not in planned]
    rest = getattr(cost_fn, "fixed_cost", fixed_cost)(analysis.model, budget.kind)
    return rest + sum(cost_fn(s, None, budget.kind, budget.context) for s in others)


def _warn_short_data(options: AutoOptions) -> None:
    lengths = [b.shape[-1] for b in options.calibration_data if hasattr(b, "shape")]
    windows = [getattr(c, "window", 0) or getattr(c, "local_window", 0) or 0 for c in options.candidates]
    if lengths and max(windows, default=0) >= min(lengths):
        log.warning("calibration sequences of %d tokens cannot tell windows of %d tokens or more from the "
                    "original: use longer sequences", min(lengths), min(w for w in windows if w >= min(lengths)))


def _reason(group: list[tuple[str, TargetConfig | None, float, float]], pick: int, budget: Budget,
            unit: str) -> str:
    """The chosen option's numbers next to keeping the original."""
    _, _, quality, cost = group[pick]
    keep_cost = group[0][3]
    numbers = f"quality cost {quality:.3g}, cost {cost:.3g} {unit} at {budget.context}"
    if pick == 0:
        best = min(group[1:], key=lambda o: o[3], default=None)
        alt = f"; cheapest candidate {best[0]}: quality cost {best[2]:.3g}, cost {best[3]:.3g}" if best else ""
        return f"{numbers}{alt}"
    return f"{numbers} (keep: {keep_cost:.3g})"
