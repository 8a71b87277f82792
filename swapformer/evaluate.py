"""The perplexity functions under their former import path; their home is :mod:`swapformer.measure`."""

from swapformer.measure.quality import (
    QualityReport,
    QualityRow,
    call_model,
    forward_logits,
    heldout_sequences,
    model_device,
    perplexity,
    quality_report,
    sequence_nll,
)

__all__ = [
    "QualityReport", "QualityRow", "call_model", "forward_logits", "heldout_sequences", "model_device",
    "perplexity", "quality_report", "sequence_nll",
]
