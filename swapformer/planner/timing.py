"""A cost model from measured times: seconds per token of each candidate core on this machine.

:class:`MeasuredCost` is a :data:`~swapformer.planner.costs.CostFn` (pass it as ``cost_fn=`` to
``target="auto"``) that times, on the site's own shapes and with ``threads`` CPU threads:

* ``decode``: one decoding step of the core (one query token) after its state has been filled by a
  prefill of synthetic keys/values (random, the site's head counts and dims): the whole context when
  the core's state grows with it (the cores' ``state_bytes`` accounting says so), else the shortest
  prefix after which the state no longer grows (a window's sinks + window, a hybrid's window + memory);
  the original attention: one query against ``context`` cached keys/values by
  ``scaled_dot_product_attention`` (what the host's sdpa path computes);
* ``prefill``: the core's (or the original's) full causal forward over ``context`` tokens, per token;
  refused above ``max_prefill`` tokens, where a dense prefill takes minutes on a CPU;
* ``state``: bytes, as :func:`~swapformer.planner.costs.flop_cost` counts them (nothing to time).

The rest of the model (:meth:`MeasuredCost.fixed_cost`) is every ``nn.Linear`` on one token (decode)
or on ``PREFILL_ROWS`` tokens per token (prefill); norms, rotary and element-wise ops are left out.
Times are medians of ``repeats`` after a warm-up, cached per (core type, shapes, accounting, kind,
context): the 30 layers of one candidate are timed once.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from swapformer.errors import ConfigError
from swapformer.measure.speed import timed
from swapformer.planner.costs import flop_cost
from swapformer.sites import AttentionSite
from swapformer.targets.base import TargetModule

PREFILL_ROWS = 256
STATE_PROBE = 4096  # a state the same size after this many tokens as after the context is bounded


class MeasuredCost:
    """Seconds per token, measured (see the module docstring).

    Args:
        threads: torch CPU threads while timing (restored after).
        repeats: timed calls per measurement (the median counts).
        max_prefill: the longest prefill timed.
    """

    def __init__(self, threads: int = 1, repeats: int = 5, max_prefill: int = 8192) -> None:
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
        """Seconds per token of every ``nn.Linear`` of ``model`` (0 for a state budget)."""
        if kind == "state":
            return 0.0
        rows = 1 if kind == "decode" else PREFILL_ROWS
        total = 0.0
        with torch.no_grad(), _threads(self.threads):
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    x = torch.randn(rows, m.in_features, dtype=m.weight.dtype, device=m.weight.device)
                    total += self._time(lambda m=m, x=x: m(x)) / rows
        return total

    def _measure(self, site: AttentionSite, core: TargetModule | None, kind: str, context: int) -> float:
        with torch.no_grad(), _threads(self.threads):
            if kind == "prefill":
                q, k, v, hidden = _inputs(site, core, context)
                if core is None:
                    return self._time(lambda: _sdpa(site, q, k, v, causal=True)) / context
                return self._time(lambda: _call(core, q, k, v, hidden, None)) / context
            if core is None:
                q, _, _, _ = _inputs(site, None, 1)
                _, k, v, _ = _inputs(site, None, min(context, site.window or context))
                return self._time(lambda: _sdpa(site, q, k, v, causal=False))
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
