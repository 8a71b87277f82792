"""What replacing one site with one candidate costs in quality, measured on calibration data.

Two measures (``AutoOptions.quality``): ``"error"`` (the default, below) and ``"perplexity"``
(:func:`single_site_loss_deltas`: the calibration loss with only that one site replaced, minus the
original's; one rewrite and one full forward per site and candidate, ~20x the cost of ``"error"`` on
a 30-layer model). ``benchmarks/pareto_smollm2.py`` measured both on SmolLM2-135M (RESULTS.md, issue
16): their layer rankings agree only loosely (Spearman ~0.4); with keep-or-``window=64`` the loss
change gave a far better plan, but with ``window`` 64 and 512 as candidates its single-layer
changes on 1,024 calibration tokens were below the noise for many layers (0 after clamping), the
plan put the cheapest window there, and the error measure's plan was better on held-out text. The
error measure is kept as the default: 20x cheaper and stable.

The ``"error"`` measure is the cheapest one that compares sites: the model rewritten to a candidate runs on the
calibration batches with the attention-transfer hooks of :mod:`swapformer.calibrate.transfer`
(without a cache, teacher-forced: every core gets the original model's own layer inputs, and every later layer sees
the original's outputs), and each site's error is its output MSE over the variance of the original
attention output, averaged over the batches (a normalised per-layer error, 0 = exact). With
``transfer_steps`` the candidate's new parameters first take that many Adam steps on the same loss.
Every site a candidate can serve is measured in the same forward passes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from swapformer.calibrate.transfer import TransferHooks
from swapformer.errors import InputError
from swapformer.measure.quality import call_model, forward_logits, sequence_nll
from swapformer.rewriter.report import Replacement
from swapformer.sites import Site

log = logging.getLogger(__name__)


def calibration_batches(data: Any) -> tuple[torch.Tensor, ...]:
    """The batches of ``calibration_data``: one ``[B, T]`` tensor of input ids, or a sequence of such
    tensors.

    Raises:
        InputError: no batches, or a batch that is not a 2-D integer tensor.
    """
    batches = (data,) if isinstance(data, torch.Tensor) else tuple(data)
    if not batches:
        raise InputError("calibration_data holds no batches")
    bad = [b for b in batches if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.is_floating_point()]
    if bad:
        what = type(bad[0]).__name__ if not isinstance(bad[0], torch.Tensor) else f"a {bad[0].dim()}-D {bad[0].dtype} tensor"
        raise InputError(f"calibration batches must be [batch, tokens] tensors of input ids, got {what}")
    return batches


def site_errors(student: nn.Module, teacher: nn.Module, batches: Sequence[Any], *, transfer_steps: int = 0,
                lr: float = 1e-3) -> dict[str, float]:
    """Each replaced site's normalised output error (see the module docstring); ``student`` is a
    rewritten copy that this function owns (its new parameters train when ``transfer_steps > 0``)."""
    replaced: list[Replacement] = list(student.swapformer_report.replaced)
    if not replaced:
        return {}
    student.eval()
    with TransferHooks(student, replaced, teacher, normalize=True, init_cores=True) as hooks:
        if transfer_steps:
            _transfer(student, replaced, hooks, batches, transfer_steps, lr)
        totals = dict.fromkeys((r.site.name for r in replaced), 0.0)
        with torch.no_grad():
            for batch in batches:
                for name, loss in hooks.run(_forward(student, batch)).items():
                    totals[name] += float(loss) / len(batches)
    return totals


def _transfer(student: nn.Module, replaced: list[Replacement], hooks: TransferHooks, batches: Sequence[Any],
              steps: int, lr: float) -> None:
    """A few Adam steps of attention transfer on the cores' new parameters (all else frozen)."""
    for p in student.parameters():
        p.requires_grad_(False)
    params = [p for r in replaced for p in student.get_submodule(r.core_name).new_parameters()]
    for p in params:
        p.requires_grad_(True)
    if not params:
        return
    optimizer = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        losses = hooks.run(_forward(student, batches[step % len(batches)]))
        optimizer.zero_grad(set_to_none=True)
        loss = torch.stack(list(losses.values())).sum()
        if loss.requires_grad:
            loss.backward()
            optimizer.step()


def _forward(model: nn.Module, batch: torch.Tensor) -> Callable[[], Any]:
    """One full forward without a cache: a cached call may run its core in pieces, and each piece
    would then be held to the attention of that piece alone."""
    return lambda: call_model(model, batch)


def mean_nll(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Mean next-token NLL (nats/token) of ``model`` over ``batches``, without a cache."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            total += float(sequence_nll(forward_logits(model, batch), batch))
            count += batch.shape[0] * (batch.shape[1] - 1)
    return total / count


def single_site_loss_deltas(analysis: Any, config: Any, sites: Sequence[Site], batches: Sequence[torch.Tensor],
                            baseline: float) -> dict[str, float]:
    """Per site, the calibration NLL (nats/token) of the model with only that site replaced by
    ``config``, minus ``baseline`` (the original's), at least 0: the loss a site costs on its own, one
    rewrite and one full forward per site. Sites ``config`` cannot serve are left out."""
    deltas = {}
    for site in sites:
        student = analysis.rewrite(config, filter_fn=lambda s, name=site.name: s.name == name, verify=False)
        if student.swapformer_report.replaced:
            # a loss that drops is calibration-text noise, not a gain to trade for cost: 0, so that among
            # harmless candidates the selection takes the cheapest
            deltas[site.name] = max(0.0, mean_nll(student.eval(), batches) - baseline)
        del student
    return deltas
