"""Side-by-side speed and memory measurements of an original and its converted models.

Timings alternate between the models round by round and report medians, so machine noise hits all of
them alike; ratios are the number to read, not absolute times.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def rss_mib() -> float:
    """This process's resident memory in MiB (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def max_rss_mib() -> float:
    """The kernel's high-water mark of this process's resident memory in MiB (``ru_maxrss``, KiB on
    Linux): the peak since the process started, or since the last :func:`reset_max_rss`.

    Exact where :class:`PeakRss` samples (a peak shorter than its period can fall between samples).
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_max_rss() -> bool:
    """Restart the high-water mark of :func:`max_rss_mib` at the current resident memory (Linux ≥ 4.0:
    ``5`` written to ``/proc/self/clear_refs`` resets ``VmHWM``, which ``ru_maxrss`` reads); False
    where the kernel does not allow it (the mark then still counts from the process start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def release_freed_memory() -> bool:
    """Hand the pages glibc keeps after frees back to the OS (``malloc_trim(0)``), so that a resident
    memory figure taken next counts live memory, not what earlier work (loading, a rewrite's dropped
    copies) left in the heap; False where the C library has no ``malloc_trim`` (not glibc)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


class PeakRss(threading.Thread):
    """Samples this process's resident memory every 5 ms until ``running`` is cleared; ``peak`` is the
    largest sample (a whole-process figure: what ``ru_maxrss`` gives, but for one stretch of a run)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = rss_mib(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.005)


@dataclass
class Speed:
    prefill_tokens_per_s: float
    decode_ms_per_token: float | None


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def decode_seconds(model: nn.Module, input_ids: torch.Tensor, steps: int) -> float:
    """Mean seconds per greedy decode step with the model's cache, after a prefill of ``input_ids``."""
    return prefill_and_decode(model, input_ids, steps)[1]


@torch.no_grad()
def prefill_and_decode(model: nn.Module, input_ids: torch.Tensor, steps: int) -> tuple[float, float]:
    """(seconds of a cached prefill of ``input_ids``, mean seconds per following greedy decode step).

    Encoder-decoder models (``config.is_encoder_decoder``) get ``input_ids`` on both sides for the
    prefill; decode steps then reuse the encoder's output and extend the decoder side.
    """
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    start = time.perf_counter()
    if encoder_decoder:
        out = model(input_ids=input_ids, decoder_input_ids=input_ids, use_cache=True)
        step_inputs = {"encoder_outputs": (out.encoder_last_hidden_state,)}
    else:
        out = model(input_ids=input_ids, use_cache=True)
        step_inputs = {}
    prefill = time.perf_counter() - start
    token_name = "decoder_input_ids" if encoder_decoder else "input_ids"
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(**{token_name: token}, **step_inputs, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return prefill, (time.perf_counter() - start) / max(steps, 1)


@torch.no_grad()
def compare_speed(models: Mapping[str, nn.Module], input_ids: torch.Tensor, *, decode_steps: int = 8,
                  rounds: int = 2) -> dict[str, Speed]:
    """Prefill tokens/s and decode ms/token of each causal LM (with its cache), in alternating rounds."""
    prefill: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    for m in models.values():
        prefill_and_decode(m, input_ids[:, :8], 1)  # warm-up
    for _ in range(rounds):
        for name, m in models.items():
            p, d = prefill_and_decode(m, input_ids, decode_steps)
            prefill[name].append(p)
            decode[name].append(d)
    tokens = input_ids.numel()
    return {
        name: Speed(tokens / statistics.median(prefill[name]),
                    1000 * statistics.median(decode[name]) if decode_steps else None)
        for name in models
    }


def kv_cache_bytes(model: nn.Module, context: int, batch: int = 1) -> int:
    """Bytes of a dense KV cache for ``context`` tokens of a Hugging Face decoder."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * batch * heads * head_dim * context * itemsize


def state_bytes(model: nn.Module, context: int) -> int | None:
    """Decode-state bytes of a converted model: the sum over its cores (None if a core cannot say)."""
    report = getattr(model, "swapformer_report", None)
    if report is None:
        return None
    total = 0
    for rep in report.replaced:
        size = model.get_submodule(rep.core_name).state_bytes(context)
        if size is None:
            return None
        total += int(size)
    return total
