"""Helpers for the ``triton.py`` modules. Imports triton, so import this module lazily only.

:func:`autotune` is ``triton.autotune`` on a GPU and a fixed first-config launcher under
``TRITON_INTERPRET=1``, where the autotuner cannot benchmark (it asks the missing GPU driver).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

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


@triton.jit
def online_softmax_step(s, bv, m_i, l_i, acc, PREC: tl.constexpr):
    """Online-softmax update with base-2 logits ``s [BM, BN]`` (masked entries are -inf): the row
    max ``m_i``, the row sum ``l_i`` and the output accumulator ``acc`` after the block ``bv``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(bv.dtype), bv, input_precision=PREC)
    return m_new, l_i, acc


def dot_precision(x: torch.Tensor) -> str:
    """``tl.dot``'s ``input_precision`` for inputs like ``x``: fp32 inputs get exact fp32 products;
    half types use tensor cores anyway."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two ≥ max(n, lo): block sizes must be powers of two and ``tl.dot`` needs ≥ 16."""
    return max(lo, triton.next_power_of_2(n))
