"""A cost model from measured times: seconds per token of each candidate core on this machine.

:class:`MeasuredCost` is a :data:`~swapformer.planner.costs.CostFn` (pass it as ``cost_fn=`` to
``target="auto"``) that times, on the site's own shapes and with ``threads`` CPU threads:

* ``decode``: one decoding step of the core (one query token) after its state has been filled by a
  prefill of synthetic keys/values (random, the site's head counts and dims): the whole context when
  the core's state grows with it (the cores' ``state_bytes`` accounting says so), else the shortest
  prefix after which the state no longer grows (a window's sinks + window, a hybrid's window + memory);
  the original attention: what a Hugging Face decode step does with a ``DynamicCache``: append the
  token's key and value to ``context`` cached rows by ``torch.cat`` (a copy of the whole cache, the
  larger part of the step at long contexts) and attend one query to them by
  ``scaled_dot_product_attention``;
* ``prefill``: the core's (or the original's) full causal forward over ``context`` tokens, per token;
  refused above ``max_prefill`` tokens, where a dense prefill takes minutes on a CPU;
* ``state``: bytes, as :func:`~swapformer.planner.costs.flop_cost` counts them (nothing to time).

The rest of the model (:meth:`MeasuredCost.fixed_cost`): for a causal LM whose forward takes
``input_ids`` and ``use_cache`` (Hugging Face's interface), the model's own forward timed at a short
context (a decode step after ``HOST_PROBE`` cached tokens; a ``PREFILL_ROWS``-token prefill, per
token), so norms, rotary, element-wise ops and per-layer Python are counted, with the attention at
that short context; any other model: every ``nn.Linear`` on one token (decode) or on ``PREFILL_ROWS``
tokens per token (prefill), which leaves those out.
Times are medians of ``repeats`` after a warm-up, cached per (core type, shapes, accounting, kind,
context): the 30 layers of one candidate are timed once.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import statistics
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from swapformer.errors import ConfigError, InputError
from swapformer.measure.speed import timed
from swapformer.planner.costs import flop_cost
from swapformer.sites import AttentionSite
from swapformer.targets.base import TargetModule

log = logging.getLogger(__name__)
PREFILL_ROWS = 256
HOST_PROBE = 16  # cached tokens before the decode steps that time the rest of a causal LM
STATE_PROBE = 4096  # a state the same size after this many tokens as after the context is bounded


class MeasuredCost:
    """Seconds per token, measured (see the module docstring).

    Args:
        threads: torch CPU threads while timing (restored after); None: the current
            ``torch.get_num_threads()``, as the model will run.
        repeats: timed calls per measurement (the median counts).
        max_prefill: the longest prefill timed.
    """

    time_unit = "s/token"

    def __init__(self, threads: int | None = None, repeats: int = 5, max_prefill: int = 8192) -> None:
        threads = torch.get_num_threads() if threads is None else threads
        if threads < 1 or repeats < 1:
            raise ConfigError(f"threads and repeats must be >= 1, got {threads}, {repeats}")
        self.threads, self.repeats, self.max_prefill = threads, repeats, max_prefill
        self._cache: dict[tuple, float] = {}

    def __repr__(self) -> str:
        return f"MeasuredCost(threads={self.threads}, repeats={self.repeats})"

    def __call__(self, site: AttentionSite, core: TargetModule | None, kind: str, context: int) -> float:
        if kind == "state":
            return flop_cost(site, core, kind, context)
        if kind == "prefill" and context > self.max_prefill:
            raise ConfigError(f"MeasuredCost times prefills up to {self.max_prefill} tokens, not {context}: "
                              "use flop_cost or a shorter budget context")
        key = (type(core).__name__, site.num_heads, site.num_kv_heads, site.head_dim, site.value_dim, site.window,
               None if core is None else (core.flops_per_token(context), core.state_bytes(context)), kind, context)
        if key not in self._cache:
            self._cache[key] = self._measure(site, core, kind, context)
        return self._cache[key]

    def fixed_cost(self, model: nn.Module, kind: str) -> float:
        """Seconds per token of ``model`` at a short context (a causal LM's own forward), else of its
        ``nn.Linear`` layers; 0 for a state budget (see the module docstring)."""
        if kind == "state":
            return 0.0
        if _is_causal_lm(model):
            with torch.no_grad(), _threads(self.threads):
                return self._host_seconds(model, kind)
        rows = 1 if kind == "decode" else PREFILL_ROWS
        total = 0.0
        with torch.no_grad(), _threads(self.threads):
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    x = torch.randn(rows, m.in_features, dtype=m.weight.dtype, device=m.weight.device)
                    total += self._time(lambda m=m, x=x: m(x)) / rows
        return total

    def _host_seconds(self, model: nn.Module, kind: str) -> float:
        """Seconds per token of a causal LM's own forward: a decode step after ``HOST_PROBE`` cached
        tokens (the cache grows by one token per timed step), or a ``PREFILL_ROWS``-token prefill."""
        device = next(model.parameters()).device
        ids = torch.randint(0, model.config.vocab_size, (1, PREFILL_ROWS), device=device)
        extra = {"logits_to_keep": 1} if "logits_to_keep" in _parameters(model) else {}
        if kind == "prefill":
            return self._time(lambda: model(input_ids=ids, use_cache=False, **extra)) / PREFILL_ROWS
        out = model(input_ids=ids[:, :HOST_PROBE], use_cache=True)
        keyword = "cache" if "cache" in _parameters(model) else "past_key_values"
        cache = getattr(out, "cache", None) or out.past_key_values
        return self._time(lambda: model(input_ids=ids[:, :1], use_cache=True, **{keyword: cache}))

    def _measure(self, site: AttentionSite, core: TargetModule | None, kind: str, context: int) -> float:
        with torch.no_grad(), _threads(self.threads):
            if kind == "prefill":
                q, k, v, hidden = _inputs(site, core, context)
                if core is None:
                    return self._time(lambda: _sdpa(site, q, k, v, causal=True)) / context
                return self._time(lambda: _call(core, q, k, v, hidden, None)) / context
            if core is None:
                q, k1, v1, _ = _inputs(site, None, 1)
                _, k, v, _ = _inputs(site, None, min(context, site.window or context) - 1)
                return self._time(lambda: _cached_step(site, q, k, v, k1, v1))
            state = _filled_state(site, core, context)
            q, k, v, hidden = _inputs(site, core, 1)
            return self._time(lambda: _call(core, q, k, v, hidden, state))

    def _time(self, fn: Callable[[], Any]) -> float:
        fn()  # warm-up
        return statistics.median(timed(fn) for _ in range(self.repeats))


def _filled_state(site: AttentionSite, core: TargetModule, context: int) -> dict:
    """The core's decoding state after a synthetic prefill as long as its state needs (see the module
    docstring)."""
    bounded = context > STATE_PROBE and core.state_bytes(STATE_PROBE) == core.state_bytes(context)
    length = STATE_PROBE if bounded else context
    q, k, v, hidden = _inputs(site, core, length)
    state: dict = {}
    _call(core, q, k, v, hidden, state)
    return state


def _inputs(site: AttentionSite, core: TargetModule | None, tokens: int) -> tuple:
    """Random ``q [1, H, T, D]``, ``k``/``v [1, Hkv, T, D]`` and, for cores that read it, the block
    input ``[1, T, width]``."""
    kv_heads = site.num_kv_heads or site.num_heads
    q = torch.randn(1, site.num_heads, tokens, site.head_dim)
    k = torch.randn(1, kv_heads, tokens, site.head_dim)
    v = torch.randn(1, kv_heads, tokens, site.value_dim or site.head_dim)
    hidden = torch.randn(1, tokens, _hidden_width(site, core)) if getattr(core, "needs_hidden", False) else None
    return q, k, v, hidden


def _hidden_width(site: AttentionSite, core: TargetModule | None) -> int:
    """The width of the block input a core reads: its ``d_model`` where it keeps one, else ``H * D``."""
    for m in core.modules() if core is not None else ():
        if isinstance(getattr(m, "d_model", None), int):
            return m.d_model
    return site.num_heads * site.head_dim


def _call(core: TargetModule, q, k, v, hidden, state: dict | None) -> torch.Tensor:
    kwargs = {"hidden": hidden} if hidden is not None else {}
    return core(q, k, v, state=state, **kwargs)


def _cached_step(site: AttentionSite, q, k, v, k_new, v_new) -> torch.Tensor:
    """One decode step of the original attention as a ``DynamicCache`` runs it: append, then attend."""
    return _sdpa(site, q, torch.cat([k, k_new], dim=-2), torch.cat([v, v_new], dim=-2), causal=False)


def _is_causal_lm(model: nn.Module) -> bool:
    """A model with Hugging Face's causal-LM interface: ``config.vocab_size`` and a forward taking
    ``input_ids`` and ``use_cache``."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return isinstance(vocab, int) and {"input_ids", "use_cache"} <= _parameters(model)


def _parameters(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _sdpa(site: AttentionSite, q, k, v, *, causal: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=site.scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class ModelTimedCost:
    """Seconds per decoded token of the whole model, timed through its own forward: the speed
    benchmark's measurement, split per layer.

    For each candidate (and for keeping the original) the model is rewritten with that candidate at
    every planned site, its cache filled, and ``steps`` greedy decode steps timed (median) through the
    model's Hugging Face forward, as ``generate()`` runs them. The original decodes from a
    ``DynamicCache`` of ``context`` random keys/values (decode time does not depend on the values); a
    candidate prefills random tokens, ``context`` of them where its state grows with the context, else
    ``state_probe`` (a bounded state is full by then). A site's cost is its share of the model's time:
    keeping it costs ``t_original / L`` (``L`` attention sites), a candidate that replaced ``n`` of
    them ``x`` with ``t_candidate = (L - n) * t_original / L + n * x``; the rest of the model is inside
    those shares (``fixed_cost`` is 0). A plan's time is then the sum of its sites' shares: exact for
    uniform plans, a linear interpolation between them for mixed ones, which assumes the sites are
    alike (e.g. SmolLM2's 30 identical layers).

    Unlike :class:`MeasuredCost` this counts what a micro-benchmark of the core misses (the host's
    cache copies, the replaced layer's own glue, the allocator), at the price of one rewrite and one
    cache fill per candidate. Decode budgets only; call :meth:`bind` with the model's analysis first
    (``target="auto"`` does).
    """

    time_unit = "s/token"

    def __init__(self, steps: int = 5, threads: int | None = None, state_probe: int = STATE_PROBE) -> None:
        threads = torch.get_num_threads() if threads is None else threads
        if steps < 1 or threads < 1 or state_probe < 1:
            raise ConfigError(f"steps, threads and state_probe must be >= 1, got {steps}, {threads}, {state_probe}")
        self.steps, self.threads, self.state_probe = steps, threads, state_probe
        self._analysis: Any = None
        self._seconds: dict[tuple, float] = {}

    def __repr__(self) -> str:
        return f"ModelTimedCost(steps={self.steps}, threads={self.threads})"

    def bind(self, analysis: Any) -> None:
        """Time on ``analysis.model`` (a causal LM with Hugging Face's interface).

        Raises:
            InputError: the model has no such interface.
        """
        if not _is_causal_lm(analysis.model):
            raise InputError(f"ModelTimedCost times a causal LM's decode steps; {type(analysis.model).__name__} "
                             "has no config.vocab_size or no forward(input_ids, use_cache)")
        self._analysis = analysis

    def fixed_cost(self, model: nn.Module, kind: str) -> float:
        return 0.0

    def __call__(self, site: AttentionSite, core: TargetModule | None, kind: str, context: int) -> float:
        if kind == "state":
            return flop_cost(site, core, kind, context)
        if kind != "decode":
            raise ConfigError(f"ModelTimedCost times decode steps, not {kind}: use MeasuredCost or flop_cost")
        if self._analysis is None:
            raise ConfigError("ModelTimedCost needs bind(analysis) before it is asked for a cost")
        layers = len(_attention(self._analysis))
        original = self._model_seconds(None, None, context)[0] / layers
        if core is None:
            return original
        total, replaced = self._model_seconds(_core_config(core), core, context)
        return (total - (layers - replaced) * original) / replaced

    def _model_seconds(self, config: Any, core: TargetModule | None, context: int) -> tuple[float, int]:
        """``(seconds per decode step, sites replaced)`` of the model rewritten to ``config`` (None: as is)."""
        from swapformer.rewriter.plan import target_label

        key = (None if config is None else target_label(config), context)
        if key not in self._seconds:
            self._seconds[key] = self._time_model(config, core, context)
        return self._seconds[key]

    def _time_model(self, config: Any, core: TargetModule | None, context: int) -> tuple[float, int]:
        model, replaced = self._analysis.model, 0
        if config is not None:
            model = self._analysis.rewrite(config, verify=False)
            replaced = len(model.swapformer_report.replaced)
        with torch.no_grad(), _threads(self.threads):
            if config is None:
                cache = random_dynamic_cache(model, context)
            else:  # a kept site's cache must hold the whole context
                bounded = (context > self.state_probe and replaced == len(_attention(self._analysis))
                           and core.state_bytes(self.state_probe) == core.state_bytes(context))
                cache = _prefilled_cache(model, self.state_probe if bounded else context)
            token = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
            keyword = "cache" if "cache" in _parameters(model) else "past_key_values"
            seconds = self._steps(lambda: model(input_ids=token, use_cache=True, **{keyword: cache}))
        log.info("ModelTimedCost: %s decodes at %d tokens in %.1f ms/token (%d sites replaced)",
                 "the original" if config is None else type(core).__name__, context, 1e3 * seconds, replaced)
        return seconds, replaced

    def _steps(self, step: Callable[[], Any]) -> float:
        step()  # warm-up; every step appends one token (immaterial next to the context)
        return statistics.median(timed(step) for _ in range(self.steps))


def _attention(analysis: Any) -> list[AttentionSite]:
    return [s for s in analysis.sites if s.kind == "attention"]


def _core_config(core: TargetModule) -> Any:
    config = getattr(core, "config", None)
    if config is None:
        raise ConfigError(f"ModelTimedCost cannot time {type(core).__name__}: the core keeps no target config")
    return config


def random_dynamic_cache(model: nn.Module, length: int) -> Any:
    """A ``DynamicCache`` holding ``length`` random keys/values in every layer of ``model`` (a decode
    step's time and memory do not depend on the values; ``benchmarks/speed_smollm2.py`` decodes the
    original from one at long contexts)."""
    from transformers import DynamicCache

    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    param = next(model.parameters())
    cache = DynamicCache()
    for layer in range(cfg.num_hidden_layers):
        k, v = torch.randn(2, 1, kv_heads, length, head_dim, dtype=param.dtype, device=param.device)
        cache.update(k, v, layer)
    return cache


def _prefilled_cache(model: nn.Module, length: int) -> Any:
    """The cache ``model`` returns after a prefill of ``length`` random tokens."""
    param = next(model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=param.device)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in _parameters(model) else {}
    out = model(input_ids=ids, use_cache=True, **extra)
    return getattr(out, "cache", None) or out.past_key_values
