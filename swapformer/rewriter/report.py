"""The record of a rewrite: what was found, what replaced it, what was skipped and why."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from swapformer.rewriter.plan import Plan, target_label
from swapformer.sites import AttentionSite, FFNSite, Site
from swapformer.targets.base import TargetConfig


@dataclass
class Replacement:
    """A site that was (or, in a dry run, would be) replaced by ``core_type`` at ``core_name``.

    ``core_name`` is the qualified name of the replacement core inside the rewritten model, so
    ``model.get_submodule(core_name)`` returns it. ``config`` is the site's own target config (under a
    :class:`~swapformer.rewriter.plan.Plan` sites differ), ``reason`` the plan's reason for it.
    """

    site: Site
    target: str
    core_type: str
    core_name: str
    how: str  # "graph" (spliced into a GraphModule) or "module" (core swapped inside a module)
    config: TargetConfig | None = None
    reason: str = ""


@dataclass
class Skip:
    site: Site
    target: str
    reason: str


@dataclass
class CaptureAttempt:
    strategy: str
    ok: bool
    error: str = ""
    seconds: float = 0.0


@dataclass
class RewriteReport:
    """What :func:`swapformer.rewrite` / :func:`swapformer.explain` found and did.

    ``str(report)`` is a table; ``report.to_dict()`` is JSON-serialisable.
    """

    target: str
    capture: str = ""
    attempts: list[CaptureAttempt] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    replaced: list[Replacement] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    max_abs_diff: float | None = None  # of the verify step, when one ran
    verify_tolerance: float | None = None  # what an exact target's max_abs_diff was held to
    dry_run: bool = False
    plan: Plan | None = None  # the per-site plan, when the rewrite followed one

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(dataclasses.replace(self, plan=None))
        out["plan"] = None if self.plan is None else self.plan.to_dict()
        return out

    def __str__(self) -> str:
        return format_report(self)


def _describe(site: Site) -> str:
    if isinstance(site, AttentionSite):
        parts = [f"H={site.num_heads}", f"Hkv={site.num_kv_heads}", f"D={site.head_dim}"]
        parts.append(f"scale={site.scale:.4g}")
        parts.append(site.mask + (f"(w={site.window})" if site.window else ""))
        parts += [flag for flag, on in (("cross", site.cross), ("rope", site.rope), ("qk-norm", site.qk_norm)) if on]
        return f"{site.form}: " + " ".join(parts)
    if isinstance(site, FFNSite):
        gated = "gated " if site.gated else ""
        return f"{site.form}: {gated}{site.activation} F={site.hidden_size}"
    return ""


def format_report(report: RewriteReport) -> str:
    decided: dict[str, str] = {}
    for r in report.replaced:
        decided[r.site.name] = f"{'would replace' if report.dry_run else 'replaced'} by {_what(r, report)}"
    for s in report.skipped:
        decided[s.site.name] = f"skipped: {s.reason}"
    rows = [(s.name, s.kind, _describe(s), decided.get(s.name, "-")) for s in report.sites]
    header = ("site", "kind", "detected", f"target {report.target!r}")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    out = [f"capture: {report.capture or 'failed'}"]
    if report.plan is not None and report.plan.summary:
        out.append(f"plan: {report.plan.summary}")
    out += [line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
    out.append(f"{len(report.replaced)} replaced, {len(report.skipped)} skipped, {len(report.sites)} sites")
    if report.max_abs_diff is not None:
        bound = f" (tolerance {report.verify_tolerance:.3g})" if report.verify_tolerance is not None else ""
        out.append(f"verify: max |Δ| = {report.max_abs_diff:.3g}{bound}")
    return "\n".join(out)


def _what(r: Replacement, report: RewriteReport) -> str:
    """The core type; under a plan also the site's own target and the plan's reason."""
    if report.plan is None or r.config is None:
        return r.core_type
    return f"{target_label(r.config)} ({r.core_type})" + (f": {r.reason}" if r.reason else "")
