"""Helpers for the ``triton.py`` modules. Imports triton, so import this module lazily only.

:func:`autotune` is ``triton.autotune`` on a GPU and a fixed first-config launcher under
``TRITON_INTERPRET=1``, where the autotuner cannot benchmark (it asks the missing GPU driver).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import triton

from swapformer.kernels.utils import interpreter_enabled


class _FirstConfig:
    """Launch a ``@triton.jit`` kernel with the meta-parameters of one fixed config."""

    def __init__(self, fn: Any, config: triton.Config) -> None:
        self.fn = fn
        self.config = config

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        meta = dict(self.config.kwargs)

        def launch(*args: Any, **kwargs: Any) -> Any:
            g = grid({**kwargs, **meta}) if callable(grid) else grid
            return self.fn[g](*args, **kwargs, **meta, num_warps=self.config.num_warps)

        return launch


def autotune(configs: Sequence[triton.Config], key: list[str]) -> Callable[[Any], Any]:
    """``triton.autotune(configs, key)``, or the first config alone under the interpreter."""

    def deco(fn: Any) -> Any:
        if interpreter_enabled():
            return _FirstConfig(fn, configs[0])
        return triton.autotune(configs=list(configs), key=key)(fn)

    return deco


def pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two ≥ max(n, lo): block sizes must be powers of two and ``tl.dot`` needs ≥ 16."""
    return max(lo, triton.next_power_of_2(n))
