"""A per-site plan: which target config serves which site, and why.

A :class:`Plan` is what ``rewrite(model, plan)`` takes instead of one target for every site. Each
:class:`PlanChoice` names a site by its site name (``"model.layers.0.self_attn:0"``) or by its
module (``"model.layers.0.self_attn"``, every site inside it). A site the plan does not name, or
names with ``target=None``, keeps its original computation and is reported as skipped, ``"kept by the
plan"``. Plans are written by hand (:meth:`Plan.of`) or by the planner (``target="auto"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from swapformer.errors import InputError
from swapformer.sites import Site
from swapformer.targets.base import TargetConfig, resolve_target

KEPT = "kept by the plan"


@dataclass(frozen=True)
class PlanChoice:
    """One site's choice: ``target`` (None: keep the original) and the reason it was chosen."""

    site: str
    target: TargetConfig | None
    reason: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not self.site:
            raise InputError(f"a plan names sites by their (module) name, got {self.site!r}")
        if self.target is not None and not isinstance(self.target, TargetConfig):
            raise InputError(f"plan entry {self.site!r}: target must be a TargetConfig or None, "
                             f"got {type(self.target).__name__}")

    @property
    def label(self) -> str:
        """``"keep"`` or the target with its non-default options, e.g. ``"window(window=64)"``."""
        return "keep" if self.target is None else target_label(self.target)


@dataclass(frozen=True)
class Plan:
    """Per-site target choices (see the module docstring).

    Args:
        choices: one :class:`PlanChoice` per named site or module (names must be distinct).
        label: how reports name the plan (``"auto"`` for the planner's plans).
        summary: one line about the whole plan (the planner writes its budget and totals here).
    """

    choices: tuple[PlanChoice, ...]
    label: str = "plan"
    summary: str = ""
    _by_name: dict[str, PlanChoice] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        choices = tuple(self.choices)
        bad = [c for c in choices if not isinstance(c, PlanChoice)]
        if bad:
            raise InputError(f"plan choices must be PlanChoice, got {type(bad[0]).__name__}")
        names = [c.site for c in choices]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InputError(f"the plan names these sites more than once: {repeated}")
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "_by_name", {c.site: c for c in choices})

    @classmethod
    def of(cls, targets: Mapping[str, str | TargetConfig | None], **plan_fields: Any) -> Plan:
        """A plan from ``{site or module name: target name, config or None}``.

        Raises:
            UnknownTargetError, ConfigError: a target that does not resolve.
        """
        return cls(tuple(PlanChoice(name, None if t is None else resolve_target(t))
                         for name, t in targets.items()), **plan_fields)

    def choice_for(self, site: Site) -> PlanChoice | None:
        """The choice naming ``site`` (by site name first, then by module), or None."""
        return self._by_name.get(site.name) or self._by_name.get(site.module)

    def check_names(self, sites: list[Site]) -> None:
        """Refuse names that match no detected site.

        Raises:
            InputError: naming the unknown entries and a few of the site names there are.
        """
        known = {s.name for s in sites} | {s.module for s in sites}
        unknown = [c.site for c in self.choices if c.site not in known]
        if unknown:
            shown = ", ".join(s.name for s in sites[:4]) + (" ..." if len(sites) > 4 else "")
            raise InputError(f"the plan names sites the model does not have: {unknown}; "
                             f"its sites are {shown or 'none'}")

    def representative(self) -> TargetConfig | None:
        """The plan's first inexact target (else its first target): what verification holds the
        whole rewrite to (exact only when every chosen target is exact)."""
        targets = [c.target for c in self.choices if c.target is not None]
        return next((t for t in targets if not t.exact), targets[0] if targets else None)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "summary": self.summary,
                "choices": [{"site": c.site, "target": None if c.target is None else c.target.to_dict(),
                             "reason": c.reason} for c in self.choices]}


def target_label(config: TargetConfig) -> str:
    """The target name with the options that differ from its defaults."""
    default = type(config)()
    changed = [f"{k}={v}" for k, v in config.to_dict().items() if getattr(default, k, v) != v and k != "target"]
    return f"{config.name}({', '.join(changed)})" if changed else config.name
