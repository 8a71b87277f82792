"""What a calibration run returns, and its errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from swapformer.errors import SwapformerError


class CalibrationDiverged(SwapformerError, RuntimeError):
    """The loss or the gradients stayed non-finite after every allowed rollback."""


@dataclass
class StageResult:
    """One stage of a calibration run.

    ``losses`` holds the (rank-averaged) loss of every completed step of this run and
    ``step_seconds`` its wall time; a stage resumed from a checkpoint lists only the steps run after
    the resume. ``site_losses`` (transfer) is the
    mean per-site MSE over the last ``log_every`` steps, by site name. ``passes``: the passes over
    the training sequences made by the end of the stage (counted from the run's first stage; above 1
    rows repeat).
    """

    kind: str
    train: str
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    lr: float = 0.0
    trainable_parameters: int = 0
    rollbacks: int = 0
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    site_losses: dict[str, float] = field(default_factory=dict)
    skipped: str = ""
    passes: float = 0.0

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def describe(self) -> str:
        if self.skipped:
            return f"{self.kind} ({self.train}): skipped, {self.skipped}"
        first = f"{self.first_loss:.4g}" if self.first_loss is not None else "-"
        last = f"{self.last_loss:.4g}" if self.last_loss is not None else "-"
        return (f"{self.kind} ({self.train}, {self.trainable_parameters:,} params): {self.steps} steps, "
                f"{self.tokens:,} tokens, {self.seconds:.1f} s, loss {first} -> {last}"
                + (f", {self.rollbacks} rollbacks" if self.rollbacks else "")
                + (f", {self.passes:.2f} passes over the data (rows repeat)" if self.passes > 1 else ""))


@dataclass
class CalibrationResult:
    """The calibrated model and what it took.

    ``model`` is the student (the same object, adapters merged) unless ``merge_lora=False`` left it
    wrapped in a peft model. ``tokens`` counts the training tokens of the steps this run completed
    (all ranks). ``heldout`` holds the held-out sequences; ``eval_perplexity`` is the student's on
    them after calibration (``None`` when not evaluated).
    """

    model: nn.Module
    stages: list[StageResult]
    tokens: int
    seconds: float
    heldout: torch.Tensor
    eval_perplexity: float | None = None
    resumed_from_step: int | None = None

    def summary(self) -> str:
        lines = [s.describe() for s in self.stages]
        lines.append(f"total: {self.tokens:,} tokens in {self.seconds:.1f} s"
                     + (f", resumed at step {self.resumed_from_step}" if self.resumed_from_step else ""))
        if self.eval_perplexity is not None:
            lines.append(f"held-out perplexity: {self.eval_perplexity:.3f}")
        return "\n".join(lines)
