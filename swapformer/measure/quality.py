"""Quality measurement: token-weighted perplexity over held-out packed sequences, and a small report.

Perplexity is ``exp(Σ NLL / Σ predicted tokens)`` over every next-token prediction of every
sequence (``seq_len - 1`` per sequence), computed in float32 whatever the model dtype. Sequences are
evaluated independently (no sliding context), which is what the calibration and the benchmark use.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from swapformer.errors import InputError
from swapformer.loading.data import TokenSplits, prepare


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _accepts_use_cache(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "use_cache" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def call_model(model: nn.Module, input_ids: torch.Tensor) -> Any:
    """``model(input_ids)``, with ``use_cache=False`` when the forward takes it (HF models)."""
    kwargs = {"use_cache": False} if _accepts_use_cache(model) else {}
    return model(input_ids, **kwargs)


def forward_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T, V]`` logits of a language model: a Hugging Face model (``.logits``, called with
    ``use_cache=False``), a model returning logits, or a tuple whose first item is the logits.

    Raises:
        InputError: the output has no logits.
    """
    out = call_model(model, input_ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        raise InputError(
            f"expected [B, T, vocab] logits from {type(model).__name__}, got {type(out).__name__}"
        )
    return out


def sequence_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood (float32 scalar) of ``input_ids`` under ``logits``."""
    pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    target = input_ids[:, 1:].reshape(-1)
    return F.cross_entropy(pred, target, reduction="sum")


@torch.no_grad()
def recall_nll(model: nn.Module, length: int, samples: int, vocab: int, seed: int = 0) -> float:
    """In-context recall: mean NLL (nats/token) on the second copy of ``samples`` random ``length``-token
    sequences repeated twice (ids drawn from ``100 .. vocab − 1``, seeded by ``seed + length``).

    A model that attends to the first copy predicts the second almost perfectly; a window narrower
    than ``length`` cannot, and scores about as badly as on random text.
    """
    if length < 1 or samples < 1 or vocab <= 100:
        raise InputError(f"recall needs length >= 1, samples >= 1 and vocab > 100; got {length}, {samples}, {vocab}")
    g = torch.Generator().manual_seed(seed + length)
    x = torch.randint(100, vocab, (samples, length), generator=g)
    ids = torch.cat([x, x], dim=1).to(model_device(model))
    logits = forward_logits(model, ids)[:, length - 1 : 2 * length - 1]
    return float(F.cross_entropy(logits.flatten(0, 1).float(), ids[:, length:].flatten()))


@torch.no_grad()
def perplexity(
    model: nn.Module,
    data: Any,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    tokenizer: Any = None,
) -> float:
    """Token-weighted perplexity of a causal LM over packed sequences.

    Args:
        model: anything :func:`forward_logits` understands; run in eval mode (its mode is restored).
        data: a ``[N, seq_len]`` token tensor, a :class:`~swapformer.loading.data.TokenSplits` (its held-out
            part is used), or any data form :func:`~swapformer.loading.data.prepare` packs.
        seq_len: sequence length (tokens per window).
        batch_size: sequences per forward pass.
        max_batches: evaluate at most this many batches (the first ones, in corpus order).
        tokenizer: needed when ``data`` is text.

    Returns:
        ``exp(mean NLL per predicted token)``.

    Raises:
        InputError: no sequences to evaluate.
    """
    seqs = heldout_sequences(data, seq_len=seq_len, tokenizer=tokenizer)
    if max_batches is not None:
        seqs = seqs[: max_batches * batch_size]
    if seqs.shape[0] == 0:
        raise InputError("no sequences to evaluate")
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, count = 0.0, 0
    try:
        for start in range(0, seqs.shape[0], batch_size):
            batch = seqs[start : start + batch_size].to(device)
            total += float(sequence_nll(forward_logits(model, batch), batch))
            count += batch.shape[0] * (batch.shape[1] - 1)
    finally:
        model.train(was_training)
    return math.exp(total / count)


def heldout_sequences(data: Any, *, seq_len: int, tokenizer: Any = None) -> torch.Tensor:
    """The ``[N, seq_len]`` sequences to evaluate on: the held-out part of a
    :class:`~swapformer.loading.data.TokenSplits`, else all of ``data`` packed."""
    if isinstance(data, TokenSplits):
        if data.seq_len != seq_len:
            raise InputError(f"data is packed to {data.seq_len} tokens, not {seq_len}")
        return data.heldout
    return prepare(data, seq_len=seq_len, tokenizer=tokenizer).train


@dataclass
class QualityRow:
    """One model's perplexity, and its ratio to the reference row (the first one)."""

    name: str
    perplexity: float
    ratio: float
    tokens: int
    seconds: float
    notes: str = ""


@dataclass
class QualityReport:
    """Perplexities of several models on the same sequences; ``to_markdown()`` renders a table."""

    rows: list[QualityRow] = field(default_factory=list)

    def to_markdown(self) -> str:
        lines = [
            "| model | perplexity | × reference | eval tokens | eval s | notes |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {r.perplexity:.2f} | {r.ratio:.3f} | {r.tokens} | {r.seconds:.1f} | {r.notes} |"
            )
        return "\n".join(lines)


def quality_report(
    models: Mapping[str, nn.Module],
    data: Any,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    tokenizer: Any = None,
) -> QualityReport:
    """Perplexity of each model on the same held-out sequences; the first model is the reference."""
    seqs = heldout_sequences(data, seq_len=seq_len, tokenizer=tokenizer)
    if max_batches is not None:
        seqs = seqs[: max_batches * batch_size]
    report = QualityReport()
    for name, model in models.items():
        t0 = time.perf_counter()
        ppl = perplexity(model, seqs, seq_len=seq_len, batch_size=batch_size)
        ref = report.rows[0].perplexity if report.rows else ppl
        tokens = int(seqs.shape[0] * (seq_len - 1))
        report.rows.append(QualityRow(name, ppl, ppl / ref, tokens, time.perf_counter() - t0))
    return report
