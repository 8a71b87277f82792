"""Backend selection and small numeric helpers shared by every kernel package.

Nothing here imports triton or touches CUDA: ``import swapformer.kernels`` must stay cheap and work on
machines without a GPU or without triton installed.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "naive", "triton")

#: Log-gates are clamped from below at this value before any cumulative sum. ``exp(-60)`` is ~1e-26,
#: so the clamp changes nothing measurable, but it keeps ``log(0) = -inf`` out of differences of
#: cumulative sums (``-inf - -inf = nan``).
LOG_GATE_MIN = -60.0


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Turn a user ``backend`` argument into ``"naive"`` or ``"triton"`` for tensor ``x``.

    ``"auto"`` honours the environment variable ``SWAPFORMER_KERNELS`` (``naive`` | ``triton``) and
    otherwise picks Triton for CUDA tensors (when triton is installed) and the reference elsewhere.
    ``"triton"`` on a CPU tensor needs ``TRITON_INTERPRET=1`` in the environment before triton is
    first imported.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: Triton requested but not usable for this tensor.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("SWAPFORMER_KERNELS", "").strip().lower()
        if env in ("naive", "triton"):
            backend = env
        else:
            backend = "triton" if x.is_cuda and triton_available() else "naive"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not installed")
        if not x.is_cuda and not interpreter_enabled():
            raise RuntimeError(
                "backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported"
            )
    return backend


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 when the inputs already are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_gate(g: torch.Tensor) -> torch.Tensor:
    """``log`` of a gate in (0, 1], in the accumulation dtype, clamped at :data:`LOG_GATE_MIN`."""
    return torch.log(g.to(acc_dtype(g.dtype))).clamp_min(LOG_GATE_MIN)
