"""Measurement, in one place: speed and memory of converted models next to their originals
(:mod:`.speed`), quality as token-weighted perplexity and the in-context recall probe (:mod:`.quality`), and the side-by-side bench
that ``swapformer bench`` and the zoo runner both call (:mod:`.bench`, imported by name: it reads
checkpoints and corpora, which the two modules above do not need).
"""

from swapformer.measure.quality import (
    QualityReport,
    QualityRow,
    call_model,
    forward_logits,
    heldout_sequences,
    model_device,
    perplexity,
    quality_report,
    recall_nll,
    sequence_nll,
)
from swapformer.measure.speed import (
    Speed,
    compare_speed,
    decode_seconds,
    kv_cache_bytes,
    prefill_and_decode,
    state_bytes,
    timed,
)

__all__ = [
    "QualityReport", "QualityRow", "Speed", "call_model", "compare_speed", "decode_seconds", "forward_logits",
    "heldout_sequences", "kv_cache_bytes", "model_device", "perplexity", "prefill_and_decode",
    "quality_report", "recall_nll", "sequence_nll", "state_bytes", "timed",
]
