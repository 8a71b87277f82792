"""Verify stage: the rewritten model runs on the example inputs, and exact targets match the original."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from swapformer.errors import VerificationError
from swapformer.rewriter.report import RewriteReport
from swapformer.targets.base import TargetConfig

EXACT_RTOL = 1e-5  # max |Δ| relative to the output's scale, fp32


def first_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model output (logits / last hidden state / a plain tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
            if item is not None:
                try:
                    return first_tensor(item)
                except TypeError:
                    continue
    raise TypeError(f"no tensor in model output of type {type(output).__name__}")


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, that divided by max(1, max |a|))."""
    diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    return diff, diff / max(1.0, float(a.double().abs().max()) if a.numel() else 0.0)


def verify_rewrite(rewritten: nn.Module, analysis: Any, report: RewriteReport, config: TargetConfig) -> None:
    captured = analysis.captured
    args, kwargs = analysis.args, analysis.kwargs or {}
    with torch.no_grad():
        out = rewritten(*args, **kwargs)
    if not report.replaced:
        return
    diff, rel = relative_diff(first_tensor(analysis.reference), first_tensor(out))
    report.max_abs_diff = diff
    if config.exact and rel > EXACT_RTOL:
        raise VerificationError(
            f"target {config.name!r} should reproduce the model exactly but max |Δ| = {diff:.3g} "
            f"(relative {rel:.3g} > {EXACT_RTOL}); capture {captured.strategy}; sites "
            + ", ".join(r.site.name for r in report.replaced)
        )
