"""Side-by-side measurement of an original and a converted model: prefill and decode speed, perplexity.

``swapformer bench`` and the zoo runner both measure through :func:`bench_speed` and
:func:`bench_perplexity`; :class:`BenchSettings` says how much to measure.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swapformer.checkpoint import build_inputs
from swapformer.errors import InputError
from swapformer.loading.offline import CORPORA, corpus_tokens
from swapformer.measure.quality import quality_report
from swapformer.measure.speed import decode_seconds, timed
from swapformer.rewriter.hf import is_hf_model


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """How much to measure.

    Args:
        seq_len: prefill / perplexity sequence length.
        batch_size: batch size.
        repeats: timed rounds per model.
        decode_tokens: tokens to decode per round (0: no decode timing).
        corpus: perplexity corpus name or text file/folder.
        ppl_batches: perplexity batches (0: no perplexity).
        progress: show a progress bar on stderr.
    """

    seq_len: int = 128
    batch_size: int = 1
    repeats: int = 3
    decode_tokens: int = 16
    corpus: str = "shakespeare"
    ppl_batches: int = 4
    progress: bool = True


@dataclasses.dataclass
class BenchRow:
    """One measured quantity for the original and the converted model."""

    metric: str
    original: float | None
    converted: float | None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.original or self.converted is None:
            return None
        return self.converted / self.original


class _NoBar:
    """Stands in for a tqdm bar when tqdm is not installed."""

    def __init__(self, iterable: Iterable[Any] = (), total: int = 0, **_: Any) -> None:
        self.iterable, self.total, self.n = iterable, total, 0

    def __iter__(self) -> Any:
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_description_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(iterable: Iterable[Any] = (), *, enabled: bool, **kwargs: Any) -> Any:
    """A tqdm bar on stderr (a silent stand-in when disabled or when tqdm is not installed)."""
    try:
        from tqdm import tqdm  # optional (the calib extra): a silent stand-in without it
    except ImportError:
        return _NoBar(iterable, **kwargs)
    return tqdm(iterable, file=sys.stderr, disable=not enabled, **kwargs)


def check_corpus(corpus: str) -> None:
    """Raise :class:`InputError` unless ``corpus`` is a known corpus name or an existing path."""
    if corpus not in CORPORA and not Path(corpus).exists():
        raise InputError(f"corpus {corpus!r} is neither a known corpus ({', '.join(CORPORA)}) nor a file")


def corpus_data(corpus: str, tokenizer: Any, purpose: str) -> Any:
    """Token documents of a named corpus, or the path of a text file/folder (tokenized later)."""
    check_corpus(corpus)
    if tokenizer is None:
        raise InputError(f"{purpose} on a corpus needs a tokenizer, and MODEL has none")
    return corpus_tokens(corpus, tokenizer) if corpus in CORPORA else Path(corpus)


def _bench_inputs(model: nn.Module, recipe: dict[str, Any], settings: BenchSettings) -> tuple[Any, int]:
    """Prefill inputs and their token count: random ids for LMs, else the recorded example inputs."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (settings.batch_size, settings.seq_len), generator=gen)
        if getattr(config, "is_encoder_decoder", False):  # T5-style: the same ids on both sides
            return {"input_ids": ids, "decoder_input_ids": ids}, ids.numel()
        return {"input_ids": ids}, ids.numel()
    spec = recipe["rewrite"]["example_inputs"]
    inputs = build_inputs(spec, model)
    first = next((t for t in [*inputs[0], *inputs[1].values()] if isinstance(t, torch.Tensor)), None)
    tokens = 1 if first is None else (int(first.shape[0] * first.shape[1]) if first.dim() >= 2 else first.numel())
    return inputs, tokens


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        kwargs = {"use_cache": False} if is_hf_model(model) else {}
        return model(**inputs, **kwargs)
    args, kwargs = inputs
    return model(*args, **kwargs)


@torch.no_grad()
def bench_speed(models: dict[str, nn.Module], recipe: dict[str, Any], settings: BenchSettings) -> list[BenchRow]:
    """Prefill tokens/s and decode ms/token, measured in alternating rounds (medians)."""
    inputs, tokens = _bench_inputs(models["original"], recipe, settings)
    decodes = all(_can_decode(m) for m in models.values()) and settings.decode_tokens > 0
    prefill: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    for m in models.values():
        _call(m, inputs)  # warm-up
    for _ in progress_bar(range(settings.repeats), enabled=settings.progress, desc="timing", total=settings.repeats):
        for name, m in models.items():
            prefill[name].append(timed(lambda m=m: _call(m, inputs)))
            if decodes:
                decode[name].append(decode_seconds(m, inputs["input_ids"], settings.decode_tokens))
    rate = {n: tokens / statistics.median(v) for n, v in prefill.items()}
    rows = [BenchRow(f"prefill tokens/s ({tokens} tokens)", rate["original"], rate["converted"])]
    if decodes:
        ms = {n: 1000 * statistics.median(v) for n, v in decode.items()}
        rows.append(BenchRow(f"decode ms/token ({settings.decode_tokens} tokens)", ms["original"], ms["converted"]))
    else:
        rows.append(BenchRow("decode ms/token", None, None, "n/a: no KV-cache generation"))
    return rows


def _can_decode(model: nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    return bool(is_hf_model(model) and callable(can) and can())


def bench_perplexity(models: dict[str, nn.Module], tokenizer: Any, settings: BenchSettings) -> list[BenchRow]:
    """Perplexity of both models on the same held-out sequences (a row saying why when skipped)."""
    label = f"perplexity ({Path(settings.corpus).name})"
    if settings.ppl_batches <= 0:
        return []
    if tokenizer is None:
        return [BenchRow(label, None, None, "n/a: MODEL has no tokenizer")]
    data = corpus_data(settings.corpus, tokenizer, "perplexity")
    try:
        report = quality_report(models, data, seq_len=settings.seq_len, batch_size=max(settings.batch_size, 1),
                                max_batches=settings.ppl_batches, tokenizer=tokenizer)
    except InputError as e:
        return [BenchRow(label, None, None, f"n/a: {e}")]
    ppl = {r.name: r.perplexity for r in report.rows}
    return [BenchRow(f"{label}, {report.rows[0].tokens} tokens", ppl["original"], ppl["converted"])]


def format_rows(rows: Iterable[BenchRow]) -> str:
    """A plain-text table: metric, original, converted, converted/original."""
    fmt = lambda v: "-" if v is None else f"{v:.4g}"
    table = [("metric", "original", "converted", "converted/original")]
    for r in rows:
        table.append((r.metric, fmt(r.original), fmt(r.converted), r.note or fmt(r.ratio)))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
