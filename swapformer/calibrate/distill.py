"""Stage 2, end-to-end distillation: the student's next-token distribution is pulled towards the
teacher's (KL over the logits, with a temperature), optionally plus the plain LM loss on the data."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token ``KL(teacher ‖ student)`` of the temperature-softened distributions, times T²
    (so gradients keep their scale across temperatures; Hinton et al.). Computed in float32."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``input_ids`` under ``logits`` (float32)."""
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, v), input_ids[:, 1:].reshape(-1))
